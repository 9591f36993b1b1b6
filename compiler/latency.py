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
# the same measurement in two halves, for a distributed search that compiles a candidate on one rank
# and times it on another: (module, example_inputs, target) -> the compiled module as self-contained
# bytes, and (those bytes, example_inputs) -> the provider's timer for it
ArtifactCompiler = Callable[[Any, Sequence[Any], str], bytes]
ArtifactTimer = Callable[[bytes, Sequence[Any]], Callable[[], float]]
_halves: tuple[TimerFactory, ArtifactCompiler, ArtifactTimer] | None = None


def register_latency_provider(factory: TimerFactory, *, compile_artifact: ArtifactCompiler | None = None,
                              time_artifact: ArtifactTimer | None = None) -> None:
    """``factory`` measures; ``compile_artifact`` and ``time_artifact``, when given, are the same
    measurement split where a module could cross to another process between compiling and timing."""
    global _provider, _halves
    _provider = factory
    _halves = (factory, compile_artifact, time_artifact) if compile_artifact and time_artifact else None


def artifact_halves() -> tuple[ArtifactCompiler, ArtifactTimer] | None:
    """The registered provider's two halves, or None: when it has none, or when another provider
    (a stand-in that counts MACs) took its place since, whose numbers must count, not the halves'."""
    if _halves is None or _halves[0] is not _provider:
        return None
    return _halves[1], _halves[2]


def latency_timer(module: Any, example_inputs: Sequence[Any], target: str = "llvm") -> Callable[[], float]:
    """Compile ``module`` for ``target`` once; the returned callable measures it (median ms)."""
    if _provider is None:
        raise OptionError("a latency-aware option needs a latency provider: `import codegen` first "
                          "(it registers one), or register your own with "
                          "compiler.latency.register_latency_provider(factory)")
    return _provider(module, example_inputs, target)

