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


@contextlib.contextmanager
def build_option(var: contextvars.ContextVar, value: str, choices: tuple[str, ...], option: str) -> Any:
    """Set a ``codegen.build`` kernel-choice option (``option=value``) for the lowerings while
    importing; a value outside ``choices`` is a BuildError naming the option."""
    from compiler.errors import BuildError

    if value not in choices:
        raise BuildError(f"{option}={value!r} is not one of {choices}")
    token = var.set(value)
    try:
        yield
    finally:
        var.reset(token)


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


class RuntimeWeights:
    """Weights of compressed layers kept out of the compiled library: each layer's canonical form is
    stored encoded (codegen/weight_codec.py) and the arrays its kernel reads become parameters of
    ``main``, rebuilt from the encoding at load time (so the artifact runs what it stores)."""

    def __init__(self) -> None:
        self.layers: dict[str, Any] = {}          # key -> canonical SparseWeights / LutWeights
        self.params: list[tuple[Any, dict]] = []  # (relax.Constant placeholder, spec)
        self._cache: dict[tuple, dict] = {}

    def add(self, key: str, canonical, layout: str, options: dict, arrays: dict) -> dict:
        """Register ``arrays`` (= weight_codec.layout(canonical, layout, **options)); returns relax
        constants standing for them, lifted to parameters of ``main`` after import. The same
        weights read the same way (a shared layer called twice) are stored once; different weights
        under one module path get distinct keys."""
        import hashlib

        import numpy as np
        from tvm import relax

        h = hashlib.sha1()
        for name, arr in sorted(arrays.items()):
            h.update(name.encode())
            h.update(np.ascontiguousarray(arr).tobytes())
        cache_key = (h.hexdigest(), layout, repr(sorted(options.items())))
        if cache_key in self._cache:
            return self._cache[cache_key]
        base, n = key, 2
        while key in self.layers:
            key, n = f"{base}#{n}", n + 1
        self.layers[key] = canonical
        exprs = {}
        for name, arr in arrays.items():
            const = relax.const(arr)
            self.params.append((const, {"name": f"{key}.{name}", "layer": key, "array": name, "layout": layout,
                                        "options": options, "shape": list(arr.shape), "dtype": str(arr.dtype)}))
            exprs[name] = const
        self._cache[cache_key] = exprs
        return exprs


_RUNTIME: contextvars.ContextVar[RuntimeWeights | None] = contextvars.ContextVar("squeezer_runtime_weights", default=None)


@contextlib.contextmanager
def collecting_runtime_weights() -> Any:
    store = RuntimeWeights()
    token = _RUNTIME.set(store)
    try:
        yield store
    finally:
        _RUNTIME.reset(token)


def runtime_weights() -> RuntimeWeights:
    store = _RUNTIME.get()
    if store is None:   # a lowering used outside codegen.build: weights simply stay constants
        store = RuntimeWeights()
    return store


def custom_convert_map() -> dict[str, Lowering]:
    """``from_exported_program``'s ``custom_convert_map``: export key (``name.default``) -> lowering."""
    from . import bitserial, lut_linear, sparse  # noqa: F401 - register themselves

    ops = compressed_ops()
    return {ops[name].export_key: fn for name, fn in _LOWERINGS.items() if name in ops}


def missing_lowerings() -> list[str]:
    custom_convert_map()
    return sorted(set(compressed_ops()) - set(_LOWERINGS))
