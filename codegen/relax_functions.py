"""Which Relax functions a graph-level rewrite may touch."""

from __future__ import annotations

from tvm import relax


def is_primitive(func: relax.Function) -> bool:
    """A fused kernel's function (``Primitive`` attribute): the graph rewrites (transpose sinking,
    BatchNorm folding, pooling moves) run on the model's own functions and leave these alone."""
    return func.attrs is not None and "Primitive" in func.attrs.keys() and func.attrs["Primitive"] != 0
