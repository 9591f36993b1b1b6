"""CPU: transposes moved down through elementwise ops until they meet their inverse and cancel.

``ConvertLayout`` turns convolutions and pools to NHWC and puts a transpose wherever an op it has
no layout rule for reads or writes NCHW. Our integer convs (lowering/integer.py) run on NHWC and
say so with a transpose on each side, and ``NHWCMaxPool`` (pool_layout.py) does the same for a
pool left in NCHW. Between two such regions sit the ops of the graph: a ReLU, a residual add, a
bias. ``op(transpose(x, P))`` is ``transpose(op(x), P)`` for an elementwise op, so each transpose
moves down until it meets one that undoes it (``transpose(transpose(x, P), P⁻¹) = x``); what
reaches an op it cannot pass stays, one transpose as before. A transpose with other readers moves
only once they are gone, so none is ever duplicated. On mobilenet_v2 int8 this removes the
transposes around every layer (a pass over each activation, twice)."""

from __future__ import annotations

import numpy as np
import tvm
import tvm_ffi
from tvm import relax
from tvm.relax.expr_functor import PyExprMutator, PyExprVisitor, mutator, visitor

from .relax_functions import is_primitive

UNARY = ("relax.nn.relu", "relax.nn.gelu", "relax.nn.gelu_tanh", "relax.nn.silu", "relax.nn.leakyrelu",
         "relax.sigmoid", "relax.tanh", "relax.clip", "relax.astype", "relax.exp", "relax.negative", "relax.abs",
         "relax.sqrt", "relax.erf")
BINARY = ("relax.add", "relax.subtract", "relax.multiply", "relax.divide", "relax.maximum", "relax.minimum",
          "relax.power")
_MAX_ROUNDS = 64


def _axes(call: relax.Call) -> list[int]:
    axes = call.attrs.axes
    return list(range(call.args[0].ty.ndim))[::-1] if axes is None else [int(a) for a in axes]


@visitor
class _Uses(PyExprVisitor):
    def __init__(self) -> None:
        super().__init__()
        self.count: dict = {}

    def visit_var_(self, var) -> None:  # noqa: D102 - PyExprVisitor hook
        self.count[var] = self.count.get(var, 0) + 1

    def visit_dataflow_var_(self, var) -> None:  # noqa: D102
        self.count[var] = self.count.get(var, 0) + 1


@mutator
class _Sink(PyExprMutator):
    def __init__(self, mod: tvm.IRModule, uses: dict) -> None:
        super().__init__(mod)
        self.uses = uses
        self.changed = False
        self.permute = tvm.ir.Op.get("relax.permute_dims")
        self.unary = {tvm.ir.Op.get(name) for name in UNARY}
        self.binary = {tvm.ir.Op.get(name) for name in BINARY}

    def _transposed(self, expr: relax.Expr, single_use: bool = True):
        """(x, P) when ``expr`` is a var bound to ``permute_dims(x, P)`` (read once, if asked)."""
        if not isinstance(expr, relax.Var):
            return None
        bound = self.lookup_binding(expr)
        if not isinstance(bound, relax.Call) or bound.op != self.permute:
            return None
        if single_use and self.uses.get(expr, 0) != 1:
            return None
        return bound.args[0], _axes(bound)

    def visit_call_(self, call: relax.Call) -> relax.Expr:  # noqa: D102 - PyExprMutator hook
        call = super().visit_call_(call)
        if call.op == self.permute:
            return self._compose(call)
        if call.op in self.unary and all(not isinstance(a.ty, relax.TensorType) for a in call.args[1:]):
            found = self._transposed(call.args[0])
            if found:
                x, perm = found
                return self._moved(relax.Call(call.op, [x, *call.args[1:]], call.attrs), perm)
        if call.op in self.binary:
            return self._binary(call)
        return call

    def _moved(self, inner: relax.Call, perm: list[int]) -> relax.Expr:
        self.changed = True
        return relax.op.permute_dims(self.builder_.emit(inner), perm)

    def _compose(self, call: relax.Call) -> relax.Expr:
        found = self._transposed(call.args[0], single_use=False)
        if not found:
            return call
        x, first = found
        combined = [first[a] for a in _axes(call)]
        self.changed = True
        return x if combined == list(range(len(combined))) else relax.op.permute_dims(x, combined)

    def _binary(self, call: relax.Call) -> relax.Expr:
        a, b = call.args
        ta, tb = self._transposed(a), self._transposed(b)
        if ta and tb:
            same = ta[1] == tb[1] and tvm_ffi.structural_equal(ta[0].ty.shape, tb[0].ty.shape)
            return self._moved(relax.Call(call.op, [ta[0], tb[0]], call.attrs), ta[1]) if same else call
        if ta and isinstance(b, tvm.ir.expr.Constant):
            return self._with_constant(call, ta, b, first=True)
        if tb and isinstance(a, tvm.ir.expr.Constant):
            return self._with_constant(call, tb, a, first=False)
        return call

    def _with_constant(self, call: relax.Call, found, const: tvm.ir.expr.Constant, first: bool) -> relax.Expr:
        """``op(transpose(x, P), c)`` → ``transpose(op(x, c'), P)``, ``c'`` = c transposed by P⁻¹
        (a scalar as it is)."""
        x, perm = found
        if not hasattr(const.value, "numpy"):
            return call
        value = const.value.numpy()
        if value.ndim > len(perm):
            return call
        if value.ndim:
            value = value.reshape((1,) * (len(perm) - value.ndim) + value.shape)
            value = np.ascontiguousarray(value.transpose(np.argsort(perm)))
        c = relax.const(value, const.ty.dtype)
        return self._moved(relax.Call(call.op, [x, c] if first else [c, x], call.attrs), perm)


def use_counts(func: relax.Function) -> dict:
    """How many times each var of ``func`` is read."""
    uses = _Uses()
    uses.visit_expr(func)
    return uses.count


def _sink_once(func: relax.Function, mod: tvm.IRModule) -> tuple[relax.Function, bool]:
    sink = _Sink(mod, use_counts(func))
    return sink.visit_expr(func), sink.changed


@relax.transform.function_pass(opt_level=0, name="SinkTransposes")
class SinkTransposes:
    """Each transpose moved below the elementwise ops after it, pairs that cancel removed."""

    def transform_function(self, func: relax.Function, mod: tvm.IRModule, ctx) -> relax.Function:
        if is_primitive(func):
            return func
        for _ in range(_MAX_ROUNDS):
            func, changed = _sink_once(func, mod)
            func = relax.analysis.remove_all_unused(func)
            if not changed:
                break
        return func


def transpose_sinking_passes() -> list:
    """The sinking, then the var-to-var bindings a cancelled pair leaves resolved."""
    return [SinkTransposes(), relax.transform.CanonicalizeBindings()]
