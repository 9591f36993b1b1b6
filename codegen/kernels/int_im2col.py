"""The im2col gather of an integer conv on CPU: the GEMM rows ``(b, oy, ox) x (ky, kx, c)`` of
uint8 codes, the zero point where a tap falls outside the input.

A TE gather leaves each byte's tap bounds to a select over 16-byte vectors (resnet18's first conv:
1.5 ms); here each tap is one bounds test and a copy of the pixel's channel run, which is
contiguous in NHWC."""

from __future__ import annotations

import tvm
from tvm.script import tirx as T

VECTOR = 64   # bytes per vector copy


def im2col(batch: int, hw: tuple[int, int], c: int, kernel: tuple[int, int], stride: tuple[int, int],
           pad: tuple[int, int], dilation: tuple[int, int], out_hw: tuple[int, int], zero: int) -> tvm.tirx.PrimFunc:
    """PrimFunc ``(q (B, H, W, C) u8, a (B·OH·OW, kh·kw·C) u8)``."""
    (h, w), (kh, kw), (sh, sw), (ph, pw), (dh, dw), (oh, ow) = hw, kernel, stride, pad, dilation, out_hw
    runs, rest = c // VECTOR, c % VECTOR

    @T.macro
    def fill(a, row, col, value):
        for r in range(runs):
            for ch in T.vectorized(VECTOR):
                a[row, col + r * VECTOR + ch] = value(r * VECTOR + ch)
        if rest > 0:
            for ch in T.vectorized(rest):
                a[row, col + runs * VECTOR + ch] = value(runs * VECTOR + ch)

    @T.prim_func(s_tir=True)   # a root block: RewriteDataflowReshape inspects one-input kernels' body
    def gather(q: T.Buffer((batch, h, w, c), "uint8"), a: T.Buffer((batch * oh * ow, kh * kw * c), "uint8")):
        T.func_attr({"tirx.noalias": True})
        with T.sblock("root"):
            T.reads(q[0:batch, 0:h, 0:w, 0:c])
            T.writes(a[0:batch * oh * ow, 0:kh * kw * c])
            for by in T.parallel(batch * oh):
                for ox, ky, kx in T.grid(ow, kh, kw):
                    if 0 <= by % oh * sh + ky * dh - ph < h and 0 <= ox * sw + kx * dw - pw < w:
                        fill(a, by * ow + ox, (ky * kw + kx) * c,
                             lambda ch: q[by // oh, by % oh * sh + ky * dh - ph, ox * sw + kx * dw - pw, ch])
                    else:
                        fill(a, by * ow + ox, (ky * kw + kx) * c, lambda ch: T.uint8(zero))

    return gather
