"""Integer GEMM on AMX-INT8 tiles: ``tdpbusd`` multiplies a 16 × 64 tile of unsigned activation
codes by a 64 × 16 tile of signed weights into 16 × 16 int32 — 16,384 multiply-adds per
instruction against ``vpdpbusd``'s 64 (kernels/vnni_kernels.py, same data, same epilogue).

* A (activations): the ``(M, K)`` uint8 codes as the layer has them (an NHWC activation, an
  im2col), no padding: the last row group overlaps the one before it (its rows computed twice,
  stored the same). Where K is not a multiple of 64, the last 64-byte step of a row runs into
  the next row, whose codes meet zero weights; the last row group stages that step through a
  zero-filled local tile instead (no read past A).
* B (weights): :func:`vnni_kernels.pack_weights` of the codes padded to ``Kp`` — its 16 words of a
  column block at 16 consecutive K-words are exactly one contiguous 1 KB B tile.
* ``a_tiles`` × ``b_tiles`` accumulator tiles per step (2 × 2 for 32+ rows, 1 × 3 for 16), the
  reduction over ``ceil(K / 64)`` tile steps; the accumulators are stored to a local int32 block and
  written by the epilogue both integer kernels share (int_output.py).

Tile state: asked of Linux at every call (kernels/amx_kernels.py). Codegen picks this kernel where
``amx_kernels.amx_available`` holds for the target and the building process.
"""

from __future__ import annotations

import tvm
from tvm.script import tirx as T

from .amx_kernels import configure_tiles, request_tile_state, tile_op
from . import int_output
from .int_output import Output

ROWS = 16
K_BYTES = 64
MIN_ROWS = 16         # a whole A tile of rows
WEIGHT_MAJOR_BYTES = 1 << 20
GROUPS_PER_TASK = 8   # (row group, column group) blocks per parallel task


def padded_k(k: int) -> int:
    return -(-k // K_BYTES) * K_BYTES


def blocking(m: int) -> tuple[int, int]:
    """(A tiles, B tiles) per step: 2 × 2 (all eight tiles) with 32+ rows, 1 × 3 with 16."""
    return (2, 2) if m >= 2 * ROWS else (1, 3)


@T.macro
def _stage_tail(tail, a, r0, k0, rows_c: T.int32, tail_bytes: T.int32):
    """The last K step's A rows: the row's last ``tail_bytes`` codes, zeros after them."""
    for r in range(rows_c):
        for c in T.vectorized(tail_bytes):
            tail[r, c] = a[r0 + r, k0 + c]
        for c in T.vectorized(K_BYTES - tail_bytes):
            tail[r, tail_bytes + c] = T.uint8(0)


def int8_gemm(m: int, k: int, n_blocks: int, n: int, out: Output, a_rows: int | None = None) -> tvm.tirx.PrimFunc:
    """PrimFunc ``(a (a_rows, K) u8, b (nbp, Kp/4, 16) u32, corr, scale, bias (nbp*16,), clamp (2,) f32,
    y)``: ``y`` the (M, n) product as ``out`` says (int_output.py: a conv's NHWC output, a linear
    layer's ``(..., N)``, float or the next layer's codes); ``nbp`` = ``n_blocks`` padded to whole groups of B tiles
    (:func:`padded_blocks`). ``a_rows`` (default M; at least :data:`MIN_ROWS`): A's rows, the
    first M of them stored."""
    a_rows = a_rows or m
    a_tiles, b_tiles = blocking(a_rows)
    kp, nbp = padded_k(k), padded_blocks(a_rows, n_blocks)
    rows_c, cols_c = a_tiles * ROWS, b_tiles * 16
    groups_m, groups_n = -(-a_rows // rows_c), nbp // b_tiles
    full_steps, tail_bytes, cols = k // K_BYTES, k % K_BYTES, nbp * 16
    # a large weight: column-group-major, each panel stays in L2 across the row groups; a small one
    # (a conv's): row-group-major, a row group's A tiles come from L1 for every column group
    weight_major = cols * kp > WEIGHT_MAJOR_BYTES
    store, fill = int_output.store(n, out), int_output.fill_border(n, out)
    n_tiles = a_tiles * b_tiles
    n_groups = groups_n * groups_m
    tasks = -(-n_groups // GROUPS_PER_TASK)

    @T.macro
    def step(src, row0, col0, src_stride, b, s, nb0):
        for i in T.unroll(a_tiles):
            T.evaluate(tile_op("tileloadd64", T.uint8(n_tiles + i), T.address_of(src[row0 + i * ROWS, col0]),
                               T.int64(src_stride)))
        for j in T.unroll(b_tiles):
            T.evaluate(tile_op("tileloadd64", T.uint8(n_tiles + a_tiles + j),
                               T.address_of(b[nb0 + j, s * 16, 0]), T.int64(64)))
        for i in T.unroll(a_tiles):
            for j in T.unroll(b_tiles):
                T.evaluate(tile_op("tdpbusd", T.uint8(i * b_tiles + j), T.uint8(n_tiles + i),
                                   T.uint8(n_tiles + a_tiles + j)))

    @T.prim_func
    def gemm(a: T.Buffer((a_rows, k), "uint8"), b: T.Buffer((nbp, kp // 4, 16), "uint32"),
             corr: T.Buffer((cols,), "int32"), scale: T.Buffer((cols,), "float32"),
             bias: T.Buffer((cols,), "float32"), clamp: T.Buffer((2,), "float32"),
             y: T.Buffer(out.shape, out.dtype)):
        T.func_attr({"tirx.noalias": True})
        flat = T.decl_buffer((int_output.flat_size(out),), out.dtype, data=y.data)
        fill(flat)
        assert request_tile_state() == T.int64(0), "Linux refused the AMX tile state (arch_prctl XTILEDATA)"
        for task in T.parallel(tasks):   # tile configuration (serializing) once per task, not per group
            cfg = T.alloc_buffer((64,), "uint8", scope="local")
            acc = T.alloc_buffer((rows_c, cols_c), "int32", scope="local", align=64)
            tail = T.alloc_buffer((rows_c, K_BYTES), "uint8", scope="local", align=64)
            configure_tiles(cfg)
            for gi in range(GROUPS_PER_TASK):
                g = task * GROUPS_PER_TASK + gi
                if g < n_groups:
                    nb0 = (g // groups_m if weight_major else g % groups_n) * b_tiles
                    r0 = T.min((g % groups_m if weight_major else g // groups_n) * rows_c, a_rows - rows_c)
                    for c in T.unroll(n_tiles):
                        T.evaluate(tile_op("tilezero", T.uint8(c)))
                    for s in range(full_steps):
                        step(a, r0, s * K_BYTES, k, b, s, nb0)
                    if tail_bytes > 0:   # the step past K reads into the next row (zero weights), not past A
                        if r0 + rows_c < a_rows:
                            step(a, r0, full_steps * K_BYTES, k, b, full_steps, nb0)
                        else:
                            _stage_tail(tail, a, r0, full_steps * K_BYTES, rows_c, tail_bytes)
                            step(tail, 0, 0, K_BYTES, b, full_steps, nb0)
                    for i in T.unroll(a_tiles):
                        for j in T.unroll(b_tiles):
                            T.evaluate(tile_op("tilestored64", T.uint8(i * b_tiles + j),
                                               T.address_of(acc[i * ROWS, j * 16]), T.int64(cols_c * 4)))
                    store(acc, flat, corr, scale, bias, clamp, r0, nb0 * 16, m, rows_c, b_tiles)
            T.evaluate(tile_op("tilerelease"))

    return gemm.with_attr("tirx.is_scheduled", True)


def padded_blocks(m: int, n_blocks: int) -> int:
    """Column blocks padded to whole groups of :func:`blocking`'s B tiles."""
    b_tiles = blocking(m)[1]
    return -(-n_blocks // b_tiles) * b_tiles

