"""Lowerings of ``squeezer::*`` ops to TVM kernels, keyed by op name (the codegen side of the
compressed-op contract in compiler/ops/library.py).

A lowering is ``fn(node, importer) -> relax.Expr``: it reads the fx node's inputs from
``importer.env`` and emits a TE/TIR kernel through ``importer.block_builder``."""

from __future__ import annotations

from typing import Callable

from compiler.ops import compressed_ops

Lowering = Callable[..., object]
_LOWERINGS: dict[str, Lowering] = {}


def register_lowering(op_name: str) -> Callable[[Lowering], Lowering]:
    def deco(fn: Lowering) -> Lowering:
        _LOWERINGS[op_name] = fn
        return fn
    return deco


def custom_convert_map() -> dict[str, Lowering]:
    """``from_exported_program``'s ``custom_convert_map``: export key (``name.default``) -> lowering."""
    from . import lut_linear  # noqa: F401 - registers itself

    ops = compressed_ops()
    return {ops[name].export_key: fn for name, fn in _LOWERINGS.items() if name in ops}


def missing_lowerings() -> list[str]:
    custom_convert_map()
    return sorted(set(compressed_ops()) - set(_LOWERINGS))
