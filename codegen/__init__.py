"""Codegen: Graph -> TVM Relax -> scheduled kernels -> deployable module.

``load`` and ``CompiledModule`` need only TVM's runtime and numpy; ``build`` (which needs torch)
is imported lazily so a deployment can ``import codegen`` without torch installed."""

from . import threads as _threads

_threads.set_default()   # before TVM's thread pool exists: it is sized once, on first use

from .artifact import CompiledModule, load  # noqa: E402


def _latency_timer(module, example_inputs, target: str = "llvm"):
    """compiler.latency's provider: trace and build once for ``target``; the timer returns the
    median ms of TVM's time evaluator."""
    from compiler import trace

    from .builder import build

    compiled = build(trace(module, tuple(example_inputs)), target)
    args = [x.detach().cpu().numpy() if hasattr(x, "detach") else x for x in example_inputs]
    return lambda: compiled.benchmark(*args, number=10, repeat=5, min_repeat_ms=20)["median_ms"]


def _register_latency_provider() -> None:
    from compiler.latency import register_latency_provider

    register_latency_provider(_latency_timer)


_register_latency_provider()

__all__ = ["CompiledModule", "load", "build", "resolve_target", "tune", "TuneResult"]


def __getattr__(name: str):
    if name == "build":
        from .builder import build
        return build
    if name in ("tune", "TuneResult"):
        from . import tuning
        return getattr(tuning, name)
    if name == "resolve_target":
        from .target import resolve_target
        return resolve_target
    raise AttributeError(f"module 'codegen' has no attribute {name!r}")
