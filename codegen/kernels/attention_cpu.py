"""Scaled dot-product attention as one CPU kernel: ``softmax(Q Kᵀ · scale + mask) V`` per
(batch, head, tile of query rows), the scores of a tile kept in a stack buffer.

Decomposed by torch, attention is two batched matmuls around a "safe" softmax (a row of only
-inf gives zeros) and its -inf test: five kernels with the (L × S) score matrix written to memory
and read back four times. On vit_b_16 those took 20 % of the time of its linears (the Q Kᵀ
matmul with 64-deep rows at a third of the FMA peak; the -inf test padded and copied the scores).
Here a tile of ``ROWS`` query rows computes its scores against the pre-transposed keys (``Kᵀ``
columns vectorized, ``ROWS`` accumulators per key vector), takes the row max and the exponentials
in vector lanes, and accumulates ``P V`` with the softmax's division applied once per output.

Semantics follow torch's math path: an additive float mask (a boolean one arrives as 0/-inf),
``is_causal`` keeping key ``j <= i``, a row whose scores are all -inf yields zeros, NaN (and an
+inf score) yield NaN for that row. Keys are padded to whole vectors; padded keys score -inf."""

from __future__ import annotations

import math

import tvm
from tvm.script import tirx as T

NEG_INF = float("-inf")
ROWS = 8                 # query rows per tile: ROWS accumulators per key vector in the score loop
MAX_SCORE_BYTES = 1 << 17  # a tile's scores live on the worker's stack


def padded_keys(keys: int, lanes: int) -> int:
    return -(-keys // lanes) * lanes


def supported(keys: int, lanes: int) -> bool:
    """Whether a tile's scores fit the stack budget (longer sequences keep the decomposed form)."""
    return ROWS * padded_keys(keys, lanes) * 4 <= MAX_SCORE_BYTES


def attention_kernel(batch: int, heads: int, kv_heads: int, rows: int, keys: int, depth: int, value_depth: int,
                     scale: float, causal: bool, mask_shape: tuple[int, int, int, int], lanes: int) -> tvm.tirx.PrimFunc:
    """PrimFunc ``(q (B,H,L,D), kt (B,Hk,D,Sp), v (B,Hk,Sp,Dv), mask, out (B,H,L,Dv))``: keys transposed, zero-padded
    to Sp (whole vectors); an additive mask broadcastable to (B,H,L,S), -inf-padded to Sp if it has a key axis."""
    sp, vec, tiles, group, scale = padded_keys(keys, lanes), lanes, -(-rows // ROWS), heads // kv_heads, float(scale)
    jv = sp // vec
    ev = math.gcd(value_depth, 2 * lanes) if value_depth % lanes == 0 else value_depth   # output lanes per pass
    mb, mh, ml, ms = mask_shape
    fb, fh, fl, fs = (int(n > 1) for n in mask_shape)   # 0 where the mask broadcasts along that axis
    mask_cols = sp if ms > 1 else 1
    causal_reach = 0 if causal else sp   # key j is kept while j <= row + causal_reach

    @T.prim_func
    def attention(q: T.Buffer((batch, heads, rows, depth), "float32"),
                  kt: T.Buffer((batch, kv_heads, depth, sp), "float32"),
                  v: T.Buffer((batch, kv_heads, sp, value_depth), "float32"),
                  mask: T.Buffer((mb, mh, ml, mask_cols), "float32"),
                  out: T.Buffer((batch, heads, rows, value_depth), "float32")):
        T.func_attr({"tirx.noalias": True})
        for t in T.parallel(batch * heads * tiles):
            b = t // (heads * tiles)
            h = t // tiles % heads
            i0 = t % tiles * ROWS
            s = T.decl_buffer((ROWS, sp), "float32", scope="local")
            acc = T.decl_buffer((ROWS, vec), "float32", scope="local")
            mx = T.decl_buffer((ROWS, vec), "float32", scope="local")
            sm = T.decl_buffer((ROWS, vec), "float32", scope="local")
            rmax = T.decl_buffer((ROWS,), "float32", scope="local")
            rsum = T.decl_buffer((ROWS,), "float32", scope="local")
            oacc = T.decl_buffer((ROWS, ev), "float32", scope="local")
            for jo in range(jv):
                for ii in T.unroll(ROWS):
                    for x in T.vectorized(vec):
                        acc[ii, x] = T.float32(0)
                for d in range(depth):
                    for ii in T.unroll(ROWS):
                        for x in T.vectorized(vec):   # rows past the end compute the last row again, unstored
                            acc[ii, x] = acc[ii, x] + q[b, h, T.min(i0 + ii, rows - 1), d] * kt[b, h // group, d, jo * vec + x]
                for ii in T.unroll(ROWS):
                    for x in T.vectorized(vec):
                        s[ii, jo * vec + x] = T.Select(
                            jo * vec + x < keys and jo * vec + x <= T.min(i0 + ii, rows - 1) + causal_reach,
                            acc[ii, x] * T.float32(scale)
                            + mask[b * fb, h * fh, T.min(i0 + ii, rows - 1) * fl, (jo * vec + x) * fs],
                            T.float32(NEG_INF))
            for ii in range(ROWS):
                for x in T.vectorized(vec):
                    mx[ii, x] = s[ii, x]
                for jo in range(1, jv):
                    for x in T.vectorized(vec):
                        mx[ii, x] = T.max(mx[ii, x], s[ii, jo * vec + x])
                rmax[ii] = T.float32(NEG_INF)
                for x in range(vec):
                    rmax[ii] = T.max(rmax[ii], mx[ii, x])
                for x in T.vectorized(vec):
                    sm[ii, x] = T.float32(0)
                for jo in range(jv):
                    for x in T.vectorized(vec):
                        s[ii, jo * vec + x] = T.Select(s[ii, jo * vec + x] == T.float32(NEG_INF), T.float32(0),
                                                       T.exp(s[ii, jo * vec + x] - rmax[ii]))
                        sm[ii, x] = sm[ii, x] + s[ii, jo * vec + x]
                rsum[ii] = T.float32(0)
                for x in range(vec):
                    rsum[ii] = rsum[ii] + sm[ii, x]
            for eo in range(value_depth // ev):
                for ii in T.unroll(ROWS):
                    for x in T.vectorized(ev):
                        oacc[ii, x] = T.float32(0)
                for j in range(sp):
                    for ii in T.unroll(ROWS):
                        for x in T.vectorized(ev):
                            oacc[ii, x] = oacc[ii, x] + s[ii, j] * v[b, h // group, j, eo * ev + x]
                for ii in range(ROWS):
                    if i0 + ii < rows:
                        for x in T.vectorized(ev):
                            out[b, h, i0 + ii, eo * ev + x] = T.Select(rsum[ii] == T.float32(0), T.float32(0),
                                                                      oacc[ii, x] / rsum[ii])

    return attention.with_attr("tirx.is_scheduled", True)
