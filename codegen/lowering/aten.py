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


def _select(node, importer) -> relax.Expr:
    """``select(x, dim, index)``, ``x[:, -1]``: a negative index counts from the end, as in torch.
    TVM's importer passed it to ``take`` as it was, and ``take`` read out of bounds (a silently
    wrong last time step of every RNN read as ``y[:, -1]``)."""
    x = importer.env[node.args[0]]
    dim, index = int(node.args[1]), int(node.args[2])
    size = int(x.ty.shape[dim])
    if not -size <= index < size:
        raise IndexError(f"select at {node.name}: index {index} is out of range for dimension {dim} of size {size}")
    return importer.block_builder.emit(relax.op.take(x, relax.const(index % size, "int64"), dim))


def _counted_from_the_end(importer, index: relax.Expr, size: int) -> relax.Expr:
    """``index + size`` where ``index < 0``: torch's meaning of a negative index."""
    dtype = index.ty.dtype
    zero, n = relax.const(0, dtype), relax.const(size, dtype)
    return importer.block_builder.emit(relax.op.where(relax.op.less(index, zero), relax.op.add(index, n), index))


def _with_wrapped_indices(translate: Callable, sizes_of: Callable) -> Callable:
    """Run the importer's own ``translate(node)`` with each integer index tensor of ``node`` wrapped
    (:func:`_counted_from_the_end`); ``sizes_of(node, importer)`` yields (index node, size) pairs.
    The importer gave negative indices to ``take`` as they were, which read out of bounds."""

    def lower(node, importer) -> relax.Expr:
        saved = {}
        for index_node, size in sizes_of(node, importer):
            expr = importer.env[index_node]
            if index_node not in saved and str(expr.ty.dtype).startswith("int"):
                saved[index_node] = expr
                importer.env[index_node] = _counted_from_the_end(importer, expr, size)
        try:
            return translate(importer, node)
        finally:
            importer.env.update(saved)

    return lower


def _index(node, importer) -> relax.Expr:
    """``index.Tensor(x, [i0, None, i2, ...])``, torch's advanced indexing: the index tensors
    broadcast together and pick elements jointly; their dimensions replace the indexed ones where
    these are adjacent, else go first. The importer took a non-adjacent pair as an outer product
    (a wrong shape) and passed negative indices on to ``take``. Here: the indexed dimensions
    permuted to the front, one ``index_tensor`` over them (negative indices counted from the
    end), the result's index dimensions moved back where torch puts them."""
    bb, data = importer.block_builder, importer.env[node.args[0]]
    shape = [int(d) for d in data.ty.shape]
    indexed = [(d, i) for d, i in enumerate(node.args[1]) if i is not None]
    exprs = [importer.env[i] for _, i in indexed]
    if not all(str(e.ty.dtype).startswith("int") for e in exprs):   # boolean masks: the importer's way
        return importer._index_tensor(node)
    exprs = [_counted_from_the_end(importer, e, shape[d]) for (d, _), e in zip(indexed, exprs)]
    dims = [d for d, _ in indexed]
    rest = [d for d in range(len(shape)) if d not in dims]
    if dims + rest != list(range(len(shape))):
        data = bb.emit(relax.op.permute_dims(data, dims + rest))
    y = bb.emit(relax.op.index_tensor(data, exprs))
    picked, first = y.ty.ndim - len(rest), dims[0]
    if dims == list(range(first, dims[-1] + 1)) and first > 0:   # adjacent, after `first` sliced dimensions
        order = [*range(picked, picked + first), *range(picked), *range(picked + first, y.ty.ndim)]
        y = bb.emit(relax.op.permute_dims(y, order))
    return y


def _take_sizes(node, importer):
    """``take(x, index)`` indexes ``x`` flattened."""
    size = 1
    for d in importer.env[node.args[0]].ty.shape:
        size *= int(d)
    return [(node.args[1], size)]


ATEN_LOWERINGS: dict[str, Callable] = {
    "index.Tensor": _index,
    "take.default": _with_wrapped_indices(lambda imp, node: imp._take(node), _take_sizes),
    "select.int": _select,
    "cumsum.default": _cumsum,
    "elu.default": _elu,
    "amax.default": _reduction(relax.op.max),
    "amin.default": _reduction(relax.op.min),
    "max.dim": _value_and_index(relax.op.max, relax.op.argmax),
    "min.dim": _value_and_index(relax.op.min, relax.op.argmin),
}
