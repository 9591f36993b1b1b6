"""Lowerings of ``squeezer::*`` ops to TVM kernels, keyed by op name (the codegen side of the
compressed-op contract in compiler/ops/library.py).

A lowering is ``fn(node, importer) -> relax.Expr``: it reads the fx node's inputs from
``importer.env`` and emits a TE/TIR kernel through ``importer.block_builder``."""

from __future__ import annotations

import contextlib
import contextvars
from typing import Any, Callable

from compiler.ops import compressed_ops

Lowering = Callable[..., object]
_LOWERINGS: dict[str, Lowering] = {}


def register_lowering(op_name: str) -> Callable[[Lowering], Lowering]:
    def deco(fn: Lowering) -> Lowering:
        _LOWERINGS[op_name] = fn
        return fn
    return deco


_CONSTANTS: contextvars.ContextVar[dict[str, Any]] = contextvars.ContextVar("squeezer_constants", default={})


@contextlib.contextmanager
def exported_constants(ep) -> Any:
    """While importing ``ep``: lowerings can read the values of its parameters/buffers by the
    placeholder's name (the importer hands them variables, bound to the weights only later)."""
    values = {}
    for spec in ep.graph_signature.input_specs:
        if spec.target is None:
            continue
        value = ep.state_dict.get(spec.target)
        if value is None:
            value = ep.constants.get(spec.target)
        if value is not None:
            values[spec.arg.name] = value
    token = _CONSTANTS.set(values)
    try:
        yield
    finally:
        _CONSTANTS.reset(token)


def constant_value(node) -> Any:
    """The tensor behind an exported-program placeholder (parameter, buffer or constant), or None."""
    return _CONSTANTS.get().get(getattr(node, "name", None))


def custom_convert_map() -> dict[str, Lowering]:
    """``from_exported_program``'s ``custom_convert_map``: export key (``name.default``) -> lowering."""
    from . import bitserial, lut_linear  # noqa: F401 - register themselves

    ops = compressed_ops()
    return {ops[name].export_key: fn for name, fn in _LOWERINGS.items() if name in ops}


def missing_lowerings() -> list[str]:
    custom_convert_map()
    return sorted(set(compressed_ops()) - set(_LOWERINGS))
