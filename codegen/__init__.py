"""Codegen: Graph -> TVM Relax -> scheduled kernels -> deployable module.

``load`` and ``CompiledModule`` need only TVM's runtime and numpy; ``build`` (which needs torch)
is imported lazily so a deployment can ``import codegen`` without torch installed."""

from . import threads as _threads

_threads.set_default()   # before TVM's thread pool exists: it is sized once, on first use

from .artifact import CompiledModule, load  # noqa: E402


def _register_latency_provider() -> None:
    from compiler.latency import register_latency_provider

    from .latency_provider import artifact_timer, compile_artifact, latency_timer

    register_latency_provider(latency_timer, compile_artifact=compile_artifact, time_artifact=artifact_timer)


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
