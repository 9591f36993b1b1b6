"""Codegen: Graph -> TVM Relax -> scheduled kernels -> deployable module.

``load`` and ``CompiledModule`` need only TVM's runtime and numpy; ``build`` (which needs torch)
is imported lazily so a deployment can ``import codegen`` without torch installed."""

from .artifact import CompiledModule, load

__all__ = ["CompiledModule", "load", "build", "resolve_target"]


def __getattr__(name: str):
    if name == "build":
        from .builder import build
        return build
    if name == "resolve_target":
        from .target import resolve_target
        return resolve_target
    raise AttributeError(f"module 'codegen' has no attribute {name!r}")
