"""How the integer kernels (amx_int8.py, vnni_kernels.py) write their output rows.

Each kernel ends in the same epilogue: ``v = clamp(float(acc - corr) * scale + bias)``, the
dequantized product with the layer's ReLU/ReLU6 (``clamp``, fused by codegen/int_epilogue.py).
Then, by :class:`Output`:

* float32 ``v`` (the layer's own output), or
* ``requant`` = (1/s, z, top): the *next* integer layer's uint8 codes of ``v``, as its quantize
  computes them (:func:`code_of`, the same expression) — a quarter of the bytes, and
  no pass of its own over the float output;
* ``border`` = (B, OH, OW, ph, pw): rows are (b, oy, ox) output pixels written into a
  (B, OH + 2 ph, OW + 2 pw, N) NHWC buffer whose border holds the zero point: the padded input a
  depthwise conv after the layer reads (no pad pass either).
"""

from __future__ import annotations

import math
from typing import NamedTuple

from tvm import tirx
from tvm.script import tirx as T

LANES = 16


class Output(NamedTuple):
    shape: tuple[int, ...]                         # the output buffer's
    requant: tuple[float, int, int] | None = None  # (1/s, zero point, top code): uint8 codes
    border: tuple[int, int, int, int, int] | None = None   # (B, OH, OW, ph, pw), requant only

    @property
    def dtype(self) -> str:
        return "float32" if self.requant is None else "uint8"

    def to_json(self) -> list:
        return [list(self.shape), None if self.requant is None else list(self.requant),
                None if self.border is None else list(self.border)]

    @classmethod
    def from_json(cls, value: list) -> "Output":
        shape, requant, border = value
        return cls(tuple(shape), None if requant is None else tuple(requant), None if border is None else tuple(border))


def code_of(value, requant: tuple[float, int, int], may_be_nan: bool = True):
    """A float32 value's uint8 activation code, as compiler.ops.integer.quantize_codes computes it
    (NaN: the zero point) — the one definition the separate quantize and this epilogue share. The
    epilogue's values are never NaN: it leaves out the test (a select per vector in the hot loop)."""
    inv, zero, top = requant
    q = tirx.round(value * tirx.const(inv, "float32")) + tirx.const(float(zero), "float32")
    q = tirx.max(tirx.min(q, tirx.const(float(top), "float32")), tirx.const(0.0, "float32"))
    if may_be_nan:   # min/max would turn a NaN into a bound
        q = tirx.Select(tirx.isnan(value), tirx.const(float(zero), "float32"), q)
    return q.astype("uint8")


def _result(acc, corr, scale, bias, clamp, r, col, j_lane, requant):
    """Output element (row ``r`` of the tile, column ``col``; ``j_lane`` its column in the tile).
    A float32 ``acc`` holds the dequantized sum already (``corr``, ``scale`` unused: None)."""
    if corr is None:
        v = T.min(T.max(acc[r, j_lane] + bias[col], clamp[0]), clamp[1])
    else:
        v = T.min(T.max(T.Cast("float32", acc[r, j_lane] - corr[col]) * scale[col] + bias[col], clamp[0]), clamp[1])
    return v if requant is None else code_of(v, requant, may_be_nan=False)


def _offset(row, col, n: int, border):
    """Flat position of output row ``row``, column ``col``."""
    if border is None:
        return row * n + col
    _, oh, ow, ph, pw = border
    return ((row // (oh * ow) * (oh + 2 * ph) + row // ow % oh + ph) * (ow + 2 * pw) + row % ow + pw) * n + col


def store(n: int, out: Output):
    """The epilogue macro ``(acc, y, corr, scale, bias, clamp, r0, c0, m, rows, blocks)``: the
    tile's ``rows`` × ``blocks`` 16-column blocks at (``r0``, ``c0``), rows below M and columns below
    ``n``, into ``y`` (the output viewed flat). (Column expressions are spelled out: a ``col = ...``
    binding inside the vectorized loop miscompiled.)"""
    requant, border = out.requant, out.border

    @T.macro
    def epilogue(acc, y, corr, scale, bias, clamp, r0, c0, m: T.int32, rows: T.int32, blocks: T.int32):
        for r in T.unroll(rows):
            if r0 + r < m:
                for j in T.unroll(blocks):
                    if c0 + j * LANES + LANES <= n:
                        for lane in T.vectorized(LANES):
                            y[_offset(r0 + r, c0 + j * LANES + lane, n, border)] = _result(
                                acc, corr, scale, bias, clamp, r, c0 + j * LANES + lane, j * LANES + lane, requant)
                    else:
                        for lane in range(LANES):
                            if c0 + j * LANES + lane < n:
                                y[_offset(r0 + r, c0 + j * LANES + lane, n, border)] = _result(
                                    acc, corr, scale, bias, clamp, r, c0 + j * LANES + lane, j * LANES + lane,
                                    requant)
    return epilogue


def fill_border(n: int, out: Output):
    """Macro ``(y)``: the zero point into the border of a ``border`` output (nothing otherwise)."""
    border = out.border
    batch, oh, ow, ph, pw = border or (0, 0, 0, 0, 0)
    hp, wp = oh + 2 * ph, ow + 2 * pw

    @T.macro
    def fill(y):
        if border is not None:
            for by in T.parallel(batch * hp):
                for xx in range(wp):
                    if by % hp < ph or by % hp >= oh + ph or xx < pw or xx >= ow + pw:
                        for c in range(n):
                            y[(by * wp + xx) * n + c] = T.uint8(out.requant[1])
    return fill


def flat_size(out: Output) -> int:
    return math.prod(int(d) for d in out.shape)
