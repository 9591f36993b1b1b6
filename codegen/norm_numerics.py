"""Two-pass lowerings of layer, group and instance normalization.

TVM's topi computes a normalization's variance in one pass, as E[x²] − E[x]². In float32 that
cancels catastrophically when a channel's mean is large next to its spread: the fuzzer
(tests/test_fuzz.py, seed 8000) found a rank-1 low-rank conv followed by GroupNorm whose channel of
mean −0.37 and spread ~1e-3 came out 4e-4 off (torch: 6e-6 from float64). Like torch, we take the
mean first and then the mean of squared deviations; it costs one more read of the input.
"""

from __future__ import annotations

from typing import Callable, Sequence

from tvm import relax, te, tirx

_WIDE = {"float16": "float32", "bfloat16": "float32"}   # accumulate narrow floats in float32


def _norm(data: te.Tensor, gamma: te.Tensor, beta: te.Tensor, eps: float, stat_shape: Sequence,
          reduce_extents: Sequence, data_index: Callable, stat_index: Callable, param_index: Callable,
          name: str) -> te.Tensor:
    """``data_index(stat_idx, reduce_vars)`` -> the data element; ``stat_index(data_idx)`` -> its
    statistics; ``param_index(data_idx)`` -> its gamma/beta element."""
    acc = _WIDE.get(str(data.dtype), str(data.dtype))
    count = 1
    for extent in reduce_extents:
        count = count * extent

    def element(s, rv):
        return data[tuple(data_index(s, rv))].astype(acc)

    def sum_of(fn):
        def compute(*s):
            rv = [te.reduce_axis((0, e)) for e in reduce_extents]
            return te.sum(fn(s, [r.var for r in rv]), axis=rv)
        return compute

    total = te.compute(stat_shape, sum_of(element), name=f"{name}_sum")
    mean = te.compute(stat_shape, lambda *s: total[s] / tirx.const(1, acc) / count, name=f"{name}_mean")
    squares = te.compute(stat_shape, sum_of(lambda s, rv: (element(s, rv) - mean[s]) * (element(s, rv) - mean[s])),
                         name=f"{name}_squares")

    def out(*i):
        s = tuple(stat_index(i))
        p = tuple(param_index(i))
        scale = te.rsqrt(squares[s] / tirx.const(1, acc) / count + tirx.const(eps, acc))
        y = (data[i].astype(acc) - mean[s]) * scale * gamma[p].astype(acc) + beta[p].astype(acc)
        return y.astype(data.dtype)

    return te.compute(data.shape, out, name=name)


def _over_axes(data: te.Tensor, gamma: te.Tensor, beta: te.Tensor, axes: Sequence[int], eps: float,
               param_axes: Callable[[list[int]], list[int]], name: str) -> te.Tensor:
    """Normalized over ``axes``; gamma/beta indexed by the data axes ``param_axes(axes)``."""
    rank = len(data.shape)
    axes = sorted(a % rank for a in axes)
    kept = [i for i in range(rank) if i not in axes]
    params = param_axes(axes)

    def data_index(s, rv):
        idx = [None] * rank
        for pos, i in enumerate(kept):
            idx[i] = s[pos]
        for pos, i in enumerate(axes):
            idx[i] = rv[pos]
        return idx

    return _norm(data, gamma, beta, eps, [data.shape[i] for i in kept], [data.shape[i] for i in axes],
                 data_index, lambda i: [i[k] for k in kept], lambda i: [i[a] for a in params], name)


def layer_norm(data: te.Tensor, gamma: te.Tensor, beta: te.Tensor, axes: Sequence[int], eps: float,
               name: str = "layer_norm") -> te.Tensor:
    """Normalized over ``axes``; gamma/beta indexed by those axes (torch's LayerNorm)."""
    return _over_axes(data, gamma, beta, axes, eps, lambda normalized: normalized, name)


def instance_norm(data: te.Tensor, gamma: te.Tensor, beta: te.Tensor, channel_axis: int, axes: Sequence[int],
                  eps: float) -> te.Tensor:
    """Normalized over ``axes`` (the spatial ones); gamma/beta per channel."""
    channel = channel_axis % len(data.shape)
    return _over_axes(data, gamma, beta, axes, eps, lambda normalized: [channel], "instance_norm")


def group_norm(data: te.Tensor, gamma: te.Tensor, beta: te.Tensor, num_groups: int, channel_axis: int,
               axes: Sequence[int], eps: float) -> te.Tensor:
    """Normalized over each group's channels and ``axes``; gamma/beta per channel."""
    rank = len(data.shape)
    channel = channel_axis % rank
    axes = sorted(a % rank for a in axes if a % rank != channel)
    per_group = data.shape[channel] // num_groups
    kept = [i for i in range(rank) if i not in axes]   # the channel axis stays, as its group

    def data_index(s, rv):
        idx = [None] * rank
        for pos, i in enumerate(kept):
            idx[i] = s[pos] * per_group + rv[0] if i == channel else s[pos]
        for pos, i in enumerate(axes):
            idx[i] = rv[pos + 1]
        return idx

    def stat_index(i):
        return [i[k] // per_group if k == channel else i[k] for k in kept]

    return _norm(data, gamma, beta, eps, [num_groups if i == channel else data.shape[i] for i in kept],
                 [per_group, *[data.shape[i] for i in axes]], data_index, stat_index, lambda i: [i[channel]],
                 "group_norm")


def norm_legalizations() -> dict[str, Callable]:
    """``LegalizeOps(customize_legalize_map=...)`` entries: the two-pass normalizations."""
    def legalize_layer(bb: relax.BlockBuilder, call: relax.Call) -> relax.Expr:
        return bb.call_te(layer_norm, *call.args[:3], [int(a) for a in call.attrs.axes], float(call.attrs.epsilon),
                          primfunc_name_hint="layer_norm")

    def legalize_group(bb: relax.BlockBuilder, call: relax.Call) -> relax.Expr:
        a = call.attrs
        return bb.call_te(group_norm, *call.args[:3], int(a.num_groups), int(a.channel_axis),
                          [int(x) for x in a.axes], float(a.epsilon), primfunc_name_hint="group_norm")

    def legalize_instance(bb: relax.BlockBuilder, call: relax.Call) -> relax.Expr:
        a = call.attrs
        return bb.call_te(instance_norm, *call.args[:3], int(a.channel_axis), [int(x) for x in a.axes],
                          float(a.epsilon), primfunc_name_hint="instance_norm")

    return {"relax.nn.layer_norm": legalize_layer, "relax.nn.group_norm": legalize_group,
            "relax.nn.instance_norm": legalize_instance}
