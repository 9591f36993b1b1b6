"""Measured latency for passes that decide by it (latency-aware low-rank splitting, hardware-aware
search), without the passes importing codegen: codegen registers the measuring function when it
is imported (the dependency floors in DESIGN.md: passes and codegen never import each other).

Torch-free on purpose, so ``codegen`` can register itself in a runtime-only deployment too."""

from __future__ import annotations

from typing import Any, Callable, Sequence

from .errors import OptionError

# (module, example_inputs, target) -> a timer: each call returns the median ms of one measurement
# of the module compiled once for ``target``
TimerFactory = Callable[[Any, Sequence[Any], str], Callable[[], float]]
_provider: TimerFactory | None = None


def register_latency_provider(factory: TimerFactory) -> None:
    global _provider
    _provider = factory


def latency_timer(module: Any, example_inputs: Sequence[Any], target: str = "llvm") -> Callable[[], float]:
    """Compile ``module`` for ``target`` once; the returned callable measures it (median ms)."""
    if _provider is None:
        raise OptionError("a latency-aware option needs a latency provider: `import codegen` first "
                          "(it registers one), or register your own with "
                          "compiler.latency.register_latency_provider(factory)")
    return _provider(module, example_inputs, target)

