"""The CPU's vector unit, read from the target's features: how wide a register is, how many
there are, and so how large a register tile of accumulators may be.

TVM 0.27's ``llvm_get_vector_width`` answers 512 for every x86 CPU (haswell, znver3 and plain
x86-64 alike), so an AVX2 machine got tiles sized for AVX-512's 32 zmm registers: 8 rows × 2
"vectors" of 16 floats are 32 ymm accumulators on a machine with 16 ymm registers, all spilled.
resnet18 ran 1.6x slower than with tiles sized for the registers it has (znver3, 2 threads:
39.7 ms against 24.8 ms at 8 lanes and 21.2 ms with 6-row tiles)."""

from __future__ import annotations

from tvm.target import Target

from ..target import cpu_has

ZMM_TILE_ROWS = 8        # rows of one or two vectors: 8 or 16 of AVX-512's 32 registers (measured on znver4)
YMM_ACCUMULATORS = 12    # of 16 ymm, the rest for the weight vectors and a broadcast (BLIS's 6x16 tile)


def _is_x86(target: Target) -> bool:
    triple = str(target.attrs.get("mtriple", "") or "")
    return not triple or triple.startswith(("x86", "i386", "i686"))


def vector_bits(target: Target) -> int:
    """Width of the target's widest fp32 vector register: 512 with AVX-512, 256 with AVX, 128
    otherwise (SSE2, NEON; SVE is taken at its 128-bit minimum)."""
    if cpu_has(target, "avx512f"):
        return 512
    if cpu_has(target, "avx"):
        return 256
    return 128


def vector_lanes(target: Target, dtype_bits: int = 32) -> int:
    """Lanes of the target's widest vector register (16 fp32 on AVX-512, 8 on AVX2)."""
    return max(1, vector_bits(target) // dtype_bits)


def vector_registers(target: Target) -> int:
    """Architectural vector registers: 32 with AVX-512 and on AArch64, 16 on other x86 CPUs."""
    if cpu_has(target, "avx512f") or not _is_x86(target):
        return 32
    return 16


def tile_rows(jf: int, lanes: int, registers: int) -> int:
    """Rows of a register tile ``jf`` lanes wide: enough accumulators to hide the FMA latency,
    with registers left for the weight vectors and the broadcast input. On 16 ymm: 6 rows of two
    vectors, 12 of one (4 rows of one vector left mobilenet_v3_small 1.3x slower)."""
    if registers >= 32:
        return ZMM_TILE_ROWS if jf > lanes // 2 else 2 * ZMM_TILE_ROWS
    return max(1, YMM_ACCUMULATORS // -(-jf // lanes))


def most_accumulators(registers: int) -> int:
    """Accumulators a tile may take where no row count near :func:`tile_rows` divides the rows
    (14 of 32 zmm, measured on squeezenet's 13x13 maps; 13 of 16 ymm, one weight vector and one
    broadcast beside them: 13 rows of one vector instead of padding 13 to 18, squeezenet1_1 6.8 ->
    5.7 ms on znver3)."""
    return 14 if registers >= 32 else YMM_ACCUMULATORS + 1
