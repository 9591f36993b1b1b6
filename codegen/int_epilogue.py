"""CPU: what follows an integer layer folded into its kernel's epilogue (kernels/int_output.py).

The integer kernels are opaque to TVM's FuseOps, so whatever followed them ran as a pass of its
own over the layer's float output: the ReLU6 after each of mobilenet_v2's expanding 1×1 convs
(0.9 ms of 4.2), the next integer layer's quantize, the zero-point padding of a depthwise conv.
Each kernel describes itself (``SPEC_ATTR``: its generator and arguments) and takes its output
clamp ``(lo, hi)`` as its last input, unbounded as lowered. On a kernel output read nowhere else:

* ``maximum(y, c)``, ``minimum(y, c)``, ``relu(y)`` narrow the clamp (after layout_friendly_ops
  has written ``clip`` as minimum/maximum);
* the next layer's quantize (a function carrying ``QUANTIZE_ATTR``) makes the kernel write those
  uint8 codes instead of floats;
* then ``pad`` of those NHWC codes with the zero point around H and W makes it write them into
  the padded buffer, the border filled.

Each is the same function: the kernel's output is never NaN, and it computes the codes as the
quantize does."""

from __future__ import annotations

import json

import numpy as np
import tvm
from tvm import relax
from tvm.relax.expr_functor import PyExprMutator, mutator

from .kernels import amx_int8, int4_kernels, vnni_kernels
from .kernels.int_output import Output
from .transpose_sinking import use_counts

SPEC_ATTR = "squeezer.int_kernel"     # JSON [generator, args, kwargs, output]; last input: the clamp
QUANTIZE_ATTR = "squeezer.quantize"   # [1/s, zero point, top code] of an activation quantize
GENERATORS = {"amx_gemm": amx_int8.int8_gemm, "vnni_gemm": vnni_kernels.int8_gemm,
              "vnni_conv": vnni_kernels.int8_conv2d, "vnni_int4": int4_kernels.int4_conv2d}


def kernel_spec(generator: str, args: list, kwargs: dict, out: Output) -> str:
    return json.dumps([generator, list(args), dict(kwargs), out.to_json()])


def build_kernel(spec: str) -> tvm.tirx.PrimFunc:
    """The PrimFunc a spec describes, carrying the spec."""
    generator, args, kwargs, out = json.loads(spec)
    func = GENERATORS[generator](*args, **kwargs, out=Output.from_json(out))
    return func.with_attr(SPEC_ATTR, spec).with_attr("op_pattern", 8)


def _scalar(expr) -> float | None:
    value = getattr(expr, "value", None)
    if not hasattr(value, "numpy"):
        return None
    array = value.numpy()
    return float(array) if array.size == 1 and array.ndim == 0 and array.dtype == np.float32 else None


@mutator
class _FoldIntoKernels(PyExprMutator):
    def __init__(self, mod: tvm.IRModule, uses: dict) -> None:
        super().__init__(mod)
        self.uses = uses
        self.call_tir = tvm.ir.Op.get("relax.call_tir")
        self.bounds = {tvm.ir.Op.get("relax.maximum"): 0, tvm.ir.Op.get("relax.minimum"): 1}
        self.relu, self.pad = tvm.ir.Op.get("relax.nn.relu"), tvm.ir.Op.get("relax.nn.pad")

    def _attr(self, call, name: str):
        if not isinstance(call, relax.Call) or call.op != self.call_tir:
            return None
        attrs = getattr(self.builder_.get()[call.args[0]], "attrs", None)   # the module's and the new kernels
        return attrs[name] if attrs is not None and name in attrs.keys() else None

    def _kernel(self, expr):
        """(call_tir, spec) of the kernel bound to ``expr``, read by this op only."""
        if not isinstance(expr, relax.Var) or self.uses.get(expr, 0) != 1:
            return None
        bound = self.lookup_binding(expr)
        spec = self._attr(bound, SPEC_ATTR)
        return (bound, json.loads(str(spec))) if spec is not None else None

    def visit_call_(self, call: relax.Call) -> relax.Expr:  # noqa: D102 - PyExprMutator hook
        call = super().visit_call_(call)
        if call.op == self.relu:
            found = self._kernel(call.args[0])
            return self._clamped(found, 0, 0.0) if found else call
        if call.op in self.bounds:
            for y, c in ((call.args[0], call.args[1]), (call.args[1], call.args[0])):
                found, value = self._kernel(y), _scalar(c)
                if found and value is not None:
                    return self._clamped(found, self.bounds[call.op], value)
        if call.op == self.call_tir and len(call.args[1].fields) == 1:
            quantize = self._attr(call, QUANTIZE_ATTR)
            found = self._kernel(call.args[1].fields[0])
            if quantize is not None and found and found[1][3][1] is None:
                return self._rewritten(found, requant=[float(v) for v in quantize])
        if call.op == self.pad:
            return self._padded(call)
        return call

    def _clamped(self, found, side: int, value: float) -> relax.Expr:
        kernel, _ = found
        args = list(kernel.args[1].fields)
        lo, hi = (float(v) for v in args[-1].value.numpy())
        lo, hi = (max(lo, value), hi) if side == 0 else (lo, min(hi, value))
        args[-1] = relax.const(np.array([lo, hi], np.float32))
        return relax.call_tir(kernel.args[0], args, kernel.ty_args[0])

    def _padded(self, call: relax.Call) -> relax.Expr:
        found = self._kernel(call.args[0])
        if not found:
            return call
        shape, requant, border = found[1][3]
        widths = [int(v) for v in call.attrs.pad_width]
        if requant is None or border is not None or len(shape) != 4 or call.attrs.pad_mode != "constant" \
                or float(call.attrs.pad_value) != requant[1] or widths[0:2] + widths[6:8] != [0, 0, 0, 0] \
                or widths[2] != widths[3] or widths[4] != widths[5]:
            return call
        return self._rewritten(found, requant=requant, border=[*shape[:3], widths[2], widths[4]])

    def _rewritten(self, found, requant, border=None) -> relax.Expr:
        kernel, (generator, args, kwargs, out) = found
        shape = list(out[0])
        if border is not None:
            shape = [shape[0], shape[1] + 2 * border[3], shape[2] + 2 * border[4], shape[3]]
        new_out = Output(tuple(shape), tuple(requant), None if border is None else tuple(border))
        spec = kernel_spec(generator, args, kwargs, new_out)
        name = f"{kernel.args[0].name_hint}_q"
        gv = self.builder_.add_func(build_kernel(spec).with_attr("global_symbol", name), name)
        return relax.call_tir(gv, list(kernel.args[1].fields), relax.TensorType(shape, "uint8"))


@tvm.transform.module_pass(opt_level=0, name="FoldIntoIntegerKernels")
def fold_into_integer_kernels(mod: tvm.IRModule, _ctx) -> tvm.IRModule:
    """The rewrites of the module docstring on every Relax function; the kernels they replaced dropped."""
    for gv, func in list(mod.functions.items()):
        if not isinstance(func, relax.Function):
            continue
        folder = _FoldIntoKernels(mod, use_counts(func))
        new = relax.analysis.remove_all_unused(folder.visit_expr(func))
        mod = folder.builder_.get()
        mod[gv] = new
    used = {str(v.name_hint) for f in mod.functions.values() if isinstance(f, relax.Function)
            for v in relax.analysis.all_global_vars(f)}
    return tvm.IRModule({gv: f for gv, f in mod.functions.items()
                         if not (isinstance(f, tvm.tirx.PrimFunc) and f.attrs is not None
                                 and SPEC_ATTR in f.attrs.keys() and gv.name_hint not in used)}, attrs=mod.attrs)
