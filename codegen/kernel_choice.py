"""Which kernel computes a compressed layer.

Rules by storage, shape and target pick a kernel and its weight layout (:func:`sparse_plan`,
:func:`lut_plan`, :func:`use_amx`); where two kernels can both serve a layer and the build's
option says ``"auto"``, :func:`timed_choice` builds the layer alone with each, times them on this
host and keeps the faster. Measurements are kept per layer signature for the process, and every
timed decision is appended to :data:`decisions` (for reports and tests)."""

from __future__ import annotations

import warnings
from typing import Callable

import numpy as np

from compiler.errors import BuildOptionError, last_line

from . import stack_buffers
from . import weight_codec as wc
from .kernels import amx_kernels, cuda_kernels, cuda_lut, gpu_verified
from .kernels import sparse_kernels as K
from .options import BuildOptions

CUDA_GEMV_ROWS = 8     # up to this batch the CUDA sparse / LUT layers run as warp-per-row GEMVs (then SpMM / LUT GEMM)
Timer = Callable[[], list]                      # seconds per call, a few samples

decisions: list[dict] = []                       # {"option", "layer", "ms": {kernel: ms}, "chosen", ...}
_measured: dict[tuple, dict[str, float]] = {}    # (option, signature) -> median seconds per kernel


def timed_choice(option: str, layer: str, signature: str, timers: Callable[[str], Timer],
                 candidates: tuple[str, ...], *, rounds: int = 1, fallback: str | None = None, **report) -> str:
    """The fastest of ``candidates`` for this layer: ``timers(kernel)`` builds the layer with that
    kernel and returns its timer; the timers run ``rounds`` times in alternation and each kernel's
    median sample counts. A tie goes to the later candidate. Measured once per ``signature`` per
    process. With ``fallback``, a kernel that fails to build or run is a warning and ``fallback``
    is used (nothing recorded); without, the error propagates."""
    key = (option, signature)
    if key not in _measured:
        try:
            built = {kernel: timers(kernel) for kernel in candidates}
            samples: dict[str, list[float]] = {kernel: [] for kernel in candidates}
            for _ in range(rounds):   # alternating rounds: a shared unit's throughput drifts
                for kernel, timer in built.items():
                    samples[kernel].extend(timer())
        except Exception as exc:  # noqa: BLE001 - a kernel that fails to build or run
            if fallback is None:
                raise
            warnings.warn(f"{layer}: timing the {option} candidates failed ({type(exc).__name__}: "
                          f"{last_line(exc)}); using {fallback}")
            return fallback
        _measured[key] = {kernel: float(np.median(s)) for kernel, s in samples.items()}
    seconds = _measured[key]
    chosen = min(reversed(candidates), key=lambda kernel: seconds[kernel])
    decisions.append({"option": option, "layer": layer, "ms": {k: s * 1e3 for k, s in seconds.items()},
                      "chosen": chosen, **report})
    return chosen


def layer_timer(mod, options: BuildOptions, args: list[np.ndarray], *, repeat: int, min_repeat_ms: int) -> Timer:
    """Compile a one-layer Relax module for the build's target (default schedules, no records)
    and return a timer of its ``main`` on ``args`` on this host's CPU."""
    import tvm
    from tvm import relax

    from .relax_pipeline import pipeline_for

    timing = BuildOptions(options.target)
    ex = tvm.compile(mod, target=timing.target, relax_pipeline=pipeline_for(timing),
                     tir_pipeline=stack_buffers.register())
    dev = tvm.cpu()
    vm = relax.VirtualMachine(ex, dev)
    tensors = [tvm.runtime.tensor(a, dev) for a in args]
    evaluator = vm.time_evaluator("main", dev, number=5, repeat=repeat, min_repeat_ms=min_repeat_ms)
    return lambda: list(evaluator(*tensors).results)


# ---- binary (±1) layers: AMX tiles or xnor-popcount ----------------------------------------------------------
def use_amx(options: BuildOptions, layer: str, qualifies: bool, signature: str, timers: Callable[[str], Timer],
            shape: tuple) -> bool:
    """Whether a pure ±1 layer runs on AMX tiles. ``qualifies``: AMX can take this layer (a conv
    with stride and dilation 1, a dense layer with a whole tile of rows). ``auto`` times both
    kernels where the target is this host's CPU (the AMX unit may be shared with other vCPUs,
    and while something keeps it busy popcount can win); elsewhere it keeps popcount."""
    policy = options.binary_kernels
    if policy == "popcount":
        return False
    if not options.cpu:
        if policy == "amx":
            raise BuildOptionError(f"binary_kernels='amx' at {layer}: AMX is a CPU (llvm) target feature, "
                              f"the target is {options.target.kind.name}")
        return False
    available = amx_kernels.amx_available(options.target)
    if policy == "amx" and not available:
        raise BuildOptionError(f"binary_kernels='amx' at {layer}: the target or this process has no AMX-INT8 "
                          "(use 'auto' or 'popcount')")
    if not (available and qualifies):
        return False
    if policy == "amx":
        return True
    if not options.is_this_host:
        return False
    return timed_choice("binary_kernels", layer, signature, timers, ("amx", "popcount"), rounds=3,
                        fallback="popcount", shape=shape) == "amx"


# ---- sparse and clustered layers: which kernel and layout ----------------------------------------------------
Plan = tuple[str, str, dict]    # (kernel, weight layout, layout options)


def sparse_plan(w: wc.SparseWeights, m: int, block: tuple[int, int], target) -> Plan:
    """The sparse kernel for this weight and batch."""
    if target is not None and target.kind.name == "cuda":   # kernels/cuda_kernels.py: GEMV, else Sputnik's SpMM
        return ("csr_warp", "csr16", {}) if m <= CUDA_GEMV_ROWS else ("csr_spmm", "csr16_rows", {})
    br, bc = block
    if br >= 4 and br % 4 == 0 and br <= 64 and w.codebook is None:
        return "bsr", "bsr", {"block": [br, bc]}
    if m < 8 and K.has_avx512(target):
        # chunked uint8 offsets unless the span limit splits chunks so often that padding costs more
        n_chunks = len(wc.chunk_bounds(w, K.LANES)[0])
        vbytes = 1 if w.codebook is not None else 4
        if w.codebook is not None and w.codebook.shape[-1] >= 256 or \
                n_chunks * (16 * (vbytes + 1) + 5) < wc.padded_entries(w, K.LANES) * (vbytes + 2):
            small = w.codebook is not None and w.codebook.shape[-1] <= 16
            return "csr_chunk", "csr_chunked", {"lanes": K.LANES, **({"codebook_size": 16} if small else {})}
        return "csr_gather", "csr_padded", {"lanes": K.LANES}
    return "csr_xt", "csr", {}


def lut_plan(w: wc.LutWeights, target, m: int = 1) -> Plan:
    """The kernel for a dense layer of cluster indices (``m``: the rows of activations)."""
    if target is not None and target.kind.name == "cuda":
        if m <= CUDA_GEMV_ROWS and cuda_kernels.lut_fits(w.shape[1], w.bits):
            return "lut_warp", "lut_rows", {}
        if w.bits in (1, 2, 4, 8) and gpu_verified.allowed("lut_gemm"):   # past the GEMV: kernels/cuda_lut.py
            return "lut_gemm", "lut_tiles", {"tile": cuda_lut.SIDE * cuda_lut.gemm_config(m)["tn"]}
        return "lut_te", "lut_packed_t", {}
    if K.has_avx512(target):
        size = 16 if w.bits <= 4 and w.codebook.ndim == 1 else w.codebook.shape[-1]
        width = 64 if w.shape[0] >= 64 else 16
        return "lut_tir", "lut_packed_t", {"pad_rows": width, "codebook_size": size, "tile": width}
    return "lut_te", "lut_packed_t", {}


def sparse_or_dense(options: BuildOptions, layer: str, signature: str, plan: Plan, dense: Plan,
                    timers: Callable[[Plan], Timer]) -> Plan:
    """``plan`` or the dense matmul of the decoded weight, by the ``sparse_kernels`` option; ``auto``
    times both on CPU targets."""
    if options.sparse_kernels == "sparse" or not options.cpu:
        return plan
    if options.sparse_kernels == "dense":
        return dense
    by_name = {plan[0]: plan, "dense": dense}
    chosen = timed_choice("sparse_kernels", layer, signature, lambda kernel: timers(by_name[kernel]),
                          (plan[0], "dense"))
    return by_name[chosen]
