"""What a lowering is handed besides the fx node and TVM's importer: the build's options, the
exported program's weights, and the store of weights kept out of the compiled library."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np
import tvm

from compiler.errors import BuildError

from ..options import BuildOptions


class RuntimeWeights:
    """Weights of compressed layers kept out of the compiled library: each layer's canonical form is
    kept for encoding at export (codegen/weight_codec.py) and the arrays its kernel reads become parameters of
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
        from tvm import relax

        h = hashlib.sha1()
        for name, arr in sorted(arrays.items()):   # shape and dtype too: 2x2 and 4x1 zeros share bytes
            h.update(f"{name}:{arr.shape}:{arr.dtype}".encode())
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


def exported_constants(ep) -> dict[str, Any]:
    """The values of ``ep``'s parameters, buffers and constants by placeholder name (the importer
    hands lowerings variables, bound to the weights only later)."""
    values = {}
    for spec in ep.graph_signature.input_specs:
        if spec.target is None:
            continue
        value = ep.state_dict.get(spec.target)
        if value is None:
            value = ep.constants.get(spec.target)
        if value is not None:
            values[spec.arg.name] = value
    return values


@dataclass(frozen=True)
class LoweringContext:
    """``options``: the build's (target resolved); ``constants``: the exported program's weights by
    placeholder name; ``weights``: where sparse / clustered layers register their runtime weights."""

    options: BuildOptions
    constants: dict[str, Any] = field(default_factory=dict)
    weights: RuntimeWeights = field(default_factory=RuntimeWeights)

    @property
    def target(self):
        return self.options.target

    def constant(self, node) -> np.ndarray | None:
        """A copy of the tensor behind an exported-program placeholder (parameter, buffer or
        constant) as numpy, or None. A copy: encoded lazily at export, it must not follow later
        edits of the model."""
        value = self.constants.get(getattr(node, "name", None))
        return None if value is None else value.detach().cpu().numpy().copy()

    def layer_constant(self, importer, node, what: str, where: str) -> np.ndarray | None:
        """The value of a compressed layer's tensor argument (its buffer or parameter, or a constant
        the importer folded), as numpy; ``where`` names the op and layer for the error."""
        if node is None:
            return None
        expr = importer.env[node]
        if isinstance(expr, tvm.ir.expr.Constant):
            return expr.value.numpy()
        value = self.constant(node)
        if value is None:
            raise BuildError(f"{where}: {what} must be a parameter or buffer of the layer")
        return value

    def with_options(self, **changes) -> "LoweringContext":
        """The same weights under other options, with a store of its own (a timing build)."""
        return LoweringContext(replace(self.options, **changes), self.constants)
