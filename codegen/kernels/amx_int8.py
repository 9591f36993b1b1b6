"""Integer GEMM on AMX-INT8 tiles: ``tdpbusd`` multiplies a 16 × 64 tile of unsigned activation
codes by a 64 × 16 tile of signed weights into 16 × 16 int32 — 16,384 multiply-adds per
instruction against ``vpdpbusd``'s 64 (kernels/vnni_kernels.py, same data, same epilogue).

* A (activations): ``(Mp + 1, words)`` uint32 with ``Mp`` = M padded to whole 16-row tiles and
  rows of at least ceil(K/4) words. The last 64-byte step of a row may run into the next row (or
  the spare last one): those bytes meet zero weights, so any codes there add 0. A linear layer's
  rows carry 64 spare bytes (:func:`row_words`): rows a power-of-two apart would share L1 sets.
* B (weights): :func:`vnni_kernels.pack_weights` of the codes padded to ``Kp`` — its 16 words of a
  column block at 16 consecutive K-words are exactly one contiguous 1 KB B tile.
* ``a_tiles`` × ``b_tiles`` accumulator tiles per step (2 × 2 for 32+ rows, 1 × 3 for 16), the
  reduction over ``Kp / 64`` tile steps; the accumulators are stored to a local int32 block and
  dequantized as the VNNI kernel does: ``y = float(acc - corr[n]) * scale[n] + bias[n]``.

Tile state: asked of Linux at every call (kernels/amx_kernels.py). Codegen picks this kernel where
``amx_kernels.amx_available`` holds for the target and the building process.
"""

from __future__ import annotations

import tvm
from tvm.script import tirx as T

from .amx_kernels import configure_tiles, request_tile_state, tile_op

ROWS = 16
K_BYTES = 64
MIN_ROWS = 16         # a whole A tile of rows
WEIGHT_MAJOR_BYTES = 1 << 20


def padded_k(k: int) -> int:
    return -(-k // K_BYTES) * K_BYTES


def padded_rows(m: int) -> int:
    return -(-m // ROWS) * ROWS


def row_words(k: int) -> int:
    """uint32 words per A row (codes, then 64 spare bytes)."""
    return padded_k(k) // 4 + 16


def blocking(m: int) -> tuple[int, int]:
    """(A tiles, B tiles) per step: 2 × 2 (all eight tiles) with 32+ rows, 1 × 3 with 16."""
    return (2, 2) if m > ROWS else (1, 3)


@T.macro
def _store_rows(acc, y, corr, scale, bias, r0, nb0, m: T.int32, rows_c: T.int32, b_tiles: T.int32):
    for r in range(rows_c):
        if r0 + r < m:
            for j in range(b_tiles):
                for lane in T.vectorized(16):
                    y[r0 + r, (nb0 + j) * 16 + lane] = T.Cast(
                        "float32", acc[r, j * 16 + lane] - corr[(nb0 + j) * 16 + lane]
                    ) * scale[(nb0 + j) * 16 + lane] + bias[(nb0 + j) * 16 + lane]


def _nchw_store(n: int, oh: int, ow: int):
    """The epilogue of a conv whose rows are output pixels, written straight to its NCHW output
    (viewed as (B, N, OH*OW); channels below N): a tile whose rows lie in one image stores each
    channel's run of pixels as vectors, the others pixel by pixel."""
    hw = oh * ow

    @T.macro
    def store(acc, y, corr, scale, bias, r0, nb0, m: T.int32, rows_c: T.int32, b_tiles: T.int32):
        if r0 % hw + rows_c <= hw and r0 + rows_c <= m:
            for j in range(b_tiles):
                for lane in range(16):
                    if (nb0 + j) * 16 + lane < n:
                        for r in T.vectorized(rows_c):
                            y[r0 // hw, (nb0 + j) * 16 + lane, r0 % hw + r] = T.Cast(
                                "float32", acc[r, j * 16 + lane] - corr[(nb0 + j) * 16 + lane]
                            ) * scale[(nb0 + j) * 16 + lane] + bias[(nb0 + j) * 16 + lane]
        else:
            for j in range(b_tiles):
                for lane in range(16):
                    if (nb0 + j) * 16 + lane < n:
                        for r in range(rows_c):
                            if r0 + r < m:
                                y[(r0 + r) // hw, (nb0 + j) * 16 + lane, (r0 + r) % hw] = T.Cast(
                                    "float32", acc[r, j * 16 + lane] - corr[(nb0 + j) * 16 + lane]
                                ) * scale[(nb0 + j) * 16 + lane] + bias[(nb0 + j) * 16 + lane]
    return store


def int8_gemm(m: int, k: int, n_blocks: int, words: int | None = None,
              nchw: tuple[int, int, int, int] | None = None) -> tvm.tirx.PrimFunc:
    """PrimFunc ``(a (Mp + 1, words) u32, b (nbp, Kp/4, 16) u32, corr, scale, bias (nbp*16,),
    y)``, ``y`` (M, nbp*16) f32 or, with ``nchw`` = (B, N, OH, OW) for a conv whose M rows are its
    output pixels, the NCHW output itself as (B, N, OH*OW); ``words`` defaults to :func:`row_words`; ``nbp`` =
    ``n_blocks`` padded to whole groups of B tiles (:func:`padded_blocks`)."""
    a_tiles, b_tiles = blocking(m)
    mp, kp, words = padded_rows(m), padded_k(k), words or row_words(k)
    nbp = padded_blocks(m, n_blocks)
    groups_m, groups_n = -(-mp // (ROWS * a_tiles)), nbp // b_tiles
    steps, cols = kp // K_BYTES, nbp * 16
    stride = words * 4
    rows_c, cols_c = a_tiles * ROWS, b_tiles * 16
    # a large weight: column-group-major, each panel stays in L2 across the row groups; a small one
    # (a conv's): row-group-major, a row group's A tiles come from L1 for every column group
    weight_major = cols * kp > WEIGHT_MAJOR_BYTES
    y_shape = (m, cols) if nchw is None else (nchw[0], nchw[1], nchw[2] * nchw[3])
    store = _store_rows if nchw is None else _nchw_store(*nchw[1:])

    @T.prim_func
    def gemm(a: T.Buffer((mp + 1, words), "uint32"), b: T.Buffer((nbp, kp // 4, 16), "uint32"),
             corr: T.Buffer((cols,), "int32"), scale: T.Buffer((cols,), "float32"),
             bias: T.Buffer((cols,), "float32"), y: T.Buffer(y_shape, "float32")):
        T.func_attr({"tirx.noalias": True})
        assert request_tile_state() == T.int64(0), "Linux refused the AMX tile state (arch_prctl XTILEDATA)"
        for g in T.parallel(groups_n * groups_m):
            cfg = T.alloc_buffer((64,), "uint8", scope="local")
            acc = T.alloc_buffer((rows_c, cols_c), "int32", scope="local", align=64)
            configure_tiles(cfg)
            nb0 = (g // groups_m if weight_major else g % groups_n) * b_tiles
            r0 = (g % groups_m if weight_major else g // groups_n) * rows_c
            for c in T.unroll(a_tiles * b_tiles):
                T.evaluate(tile_op("tilezero", T.uint8(c)))
            for s in range(steps):
                for i in T.unroll(a_tiles):   # A tiles past the padded rows repeat the last tile, unstored
                    T.evaluate(tile_op("tileloadd64", T.uint8(a_tiles * b_tiles + i),
                                       T.address_of(a[T.min(r0 + i * ROWS, mp - ROWS), s * 16]), T.int64(stride)))
                for j in T.unroll(b_tiles):
                    T.evaluate(tile_op("tileloadd64", T.uint8(a_tiles * b_tiles + a_tiles + j),
                                       T.address_of(b[nb0 + j, s * 16, 0]), T.int64(64)))
                for i in T.unroll(a_tiles):
                    for j in T.unroll(b_tiles):
                        T.evaluate(tile_op("tdpbusd", T.uint8(i * b_tiles + j), T.uint8(a_tiles * b_tiles + i),
                                           T.uint8(a_tiles * b_tiles + a_tiles + j)))
            for i in T.unroll(a_tiles):
                for j in T.unroll(b_tiles):
                    T.evaluate(tile_op("tilestored64", T.uint8(i * b_tiles + j),
                                       T.address_of(acc[i * ROWS, j * 16]), T.int64(cols_c * 4)))
            store(acc, y, corr, scale, bias, r0, nb0, m, rows_c, b_tiles)
            T.evaluate(tile_op("tilerelease"))

    return gemm.with_attr("tirx.is_scheduled", True)


def padded_blocks(m: int, n_blocks: int) -> int:
    """Column blocks padded to whole groups of :func:`blocking`'s B tiles."""
    b_tiles = blocking(m)[1]
    return -(-n_blocks // b_tiles) * b_tiles

