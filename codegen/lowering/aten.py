"""Lowerings of torch (aten) ops that TVM 0.27's exported-program importer lacks. Each maps onto
a Relax op, so it gets the same legalization (NaN rules included) and schedules as the rest."""

from __future__ import annotations

from typing import Callable

from tvm import relax


def _reduction(op: Callable) -> Callable:
    """``amax``/``amin(x, dim=(), keepdim=False)``: an empty ``dim`` reduces every axis, as in torch."""

    def lower(node, importer) -> relax.Expr:
        x = importer.env[node.args[0]]
        dims = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim", ())
        keepdim = node.args[2] if len(node.args) > 2 else node.kwargs.get("keepdim", False)
        dims = [dims] if isinstance(dims, int) else list(dims)
        return importer.block_builder.emit(op(x, axis=dims or None, keepdims=bool(keepdim)))

    return lower


def _value_and_index(value_op: Callable, index_op: Callable) -> Callable:
    """``max.dim``/``min.dim`` -> (values, indices) as a reduction and an arg-reduction; TVM's importer
    used ``topk``, whose sort does not treat NaN as torch does."""

    def lower(node, importer) -> relax.Expr:
        x = importer.env[node.args[0]]
        dim = node.args[1] if len(node.args) > 1 else node.kwargs["dim"]
        keepdim = bool(node.args[2] if len(node.args) > 2 else node.kwargs.get("keepdim", False))
        values = importer.block_builder.emit(value_op(x, axis=[dim], keepdims=keepdim))
        indices = importer.block_builder.emit(index_op(x, axis=dim, keepdims=keepdim))
        return importer.block_builder.emit(relax.Tuple([values, indices]))

    return lower


def _elu(node, importer) -> relax.Expr:
    """``elu(x, alpha, scale, input_scale)``: torch.export's form of ELU and SELU. TVM's importer
    drops ``scale`` and ``input_scale``, so SELU came out 1.0507x too small. ``x > 0`` is false
    for NaN and ``exp(NaN)`` is NaN, so NaN passes through the negative branch."""
    x = importer.env[node.args[0]]
    alpha, scale, input_scale = (float(v) for v in ([*node.args[1:4]] + [1.0, 1.0, 1.0])[:3])
    kw = node.kwargs
    alpha, scale, input_scale = kw.get("alpha", alpha), kw.get("scale", scale), kw.get("input_scale", input_scale)
    dtype = x.ty.dtype
    const = lambda v: relax.const(float(v), dtype)  # noqa: E731
    negative = relax.op.multiply(const(alpha), relax.op.subtract(
        relax.op.exp(relax.op.multiply(const(input_scale), x)), const(1.0)))
    out = relax.op.where(relax.op.greater(x, const(0.0)), x, negative)
    return importer.block_builder.emit(relax.op.multiply(const(scale), out) if scale != 1.0 else out)


def _cumsum(node, importer) -> relax.Expr:
    """``cumsum(x, dim, dtype=None)`` with torch's result type: a bool or integer input sums in
    int64. TVM's importer kept bool, and LLVM refused the bool additions (Llama's attention mask)."""
    x = importer.env[node.args[0]]
    dim = node.args[1] if len(node.args) > 1 else node.kwargs["dim"]
    dtype = node.kwargs.get("dtype")
    dtype = str(dtype).replace("torch.", "") if dtype is not None else str(x.ty.dtype)
    if dtype == "bool" or dtype.startswith(("int", "uint")):
        dtype = "int64" if node.kwargs.get("dtype") is None else dtype
    if str(x.ty.dtype) != dtype:
        x = importer.block_builder.emit(relax.op.astype(x, dtype))
    return importer.block_builder.emit(relax.op.cumsum(x, axis=dim, dtype=dtype))


ATEN_LOWERINGS: dict[str, Callable] = {
    "cumsum.default": _cumsum,
    "elu.default": _elu,
    "amax.default": _reduction(relax.op.max),
    "amin.default": _reduction(relax.op.min),
    "max.dim": _value_and_index(relax.op.max, relax.op.argmax),
    "min.dim": _value_and_index(relax.op.min, relax.op.argmin),
}
