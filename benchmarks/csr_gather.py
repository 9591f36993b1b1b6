"""Diagnostic "csr-gather": where the batch-1 CSR kernel's time goes, and the best speedup the
gathers leave.

The deep-compression suite's 90 % sparse 4096×4096 Linear at batch 1 runs the ``csr_chunk``
kernel: per chunk of 16 stored weights one 16-lane AVX-512 gather of ``x`` and one FMA, with
the values (fp32) and column offsets (uint8) streamed from memory. This suite times, side by
side in interleaved rounds, three variants of that kernel on the layer's real chunk layout:

* ``full``   — the kernel as the compiler builds it (codegen/kernels/sparse_kernels.py);
* ``gather`` — the same gathers of ``x`` with the real offsets, the streams read from a small
  L1-resident slice instead (what the gathers alone cost);
* ``stream`` — the same streams, but ``x`` read with one contiguous load instead of a gather
  (what streaming the layout alone costs),

and torch fp32 dense. ``torch / gather`` is the speedup the kernel would reach if all the
streaming hid behind the gathers. It explains the deep-compression suite's CSR row (target 5×);
it is not a speed claim (the ``gather`` and ``stream`` variants compute wrong results on purpose).
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
import tvm
from tvm.script import tirx as T

from codegen.kernels import sparse_kernels as K

from . import harness as h

N_OUT = K_IN = 4096
SPARSITY = 0.9
L1_CHUNKS = 64          # the gather variant's stream slice: 64 chunks × 16 × 5 bytes = 5 KB
COLUMNS = [("variant", "variant", "s"), ("ms", "median ms", ".4f"), ("speedup", "torch fp32 / variant", ".1f"),
           ("what", "what it measures", "s")]


def _probe(n: int, k: int, n_chunks: int, mode: str, rb: int = 128):
    """``csr_chunk`` (fp32 values, batch 1) with the gather or the streams replaced (see above)."""
    nb = (n + rb - 1) // rb
    nv = n_chunks * 16
    gather_only = mode == "gather"

    @T.prim_func
    def f(X: T.Buffer((1, k), "float32"), V: T.Buffer((nv,), "float32"), OFF: T.Buffer((nv,), "uint8"),
          BASE: T.Buffer((n_chunks,), "int32"), P: T.Buffer((n + 1,), "int32"), Y: T.Buffer((1, n), "float32")):
        T.func_attr({"tirx.noalias": True})
        for blk in T.parallel(nb):
            acc = T.decl_buffer((16,), "float32", scope="local")
            s = T.decl_buffer((1,), "float32", scope="local")
            for rr in range(rb):
                if blk * rb + rr < n:
                    acc[T.Ramp(0, 1, 16)] = T.Broadcast(T.float32(0), 16)
                    for e in range(P[blk * rb + rr], P[blk * rb + rr + 1]):
                        if gather_only:
                            acc[T.Ramp(0, 1, 16)] = acc[T.Ramp(0, 1, 16)] + V[T.Ramp(e % L1_CHUNKS * 16, 1, 16)] * K._gather(
                                T.address_of(X[0, 0]), T.Broadcast(BASE[e % L1_CHUNKS], 16)
                                + T.Cast("int32x16", OFF[T.Ramp(e % L1_CHUNKS * 16, 1, 16)]))
                        else:
                            acc[T.Ramp(0, 1, 16)] = acc[T.Ramp(0, 1, 16)] + V[T.Ramp(e * 16, 1, 16)] * X[
                                0, T.Ramp(T.min(BASE[e], k - 16), 1, 16)] + T.Cast(
                                "float32x16", OFF[T.Ramp(e * 16, 1, 16)])
                    K._store_lane_sum(acc, s, Y, Y, 0, blk * rb + rr, False)
    return f


def _sparse_weight(seed: int = 0):
    """The deep-compression suite's layer: N(0, 0.02) weights, the smallest 90 % set to zero."""
    from codegen.weight_codec import SparseWeights

    w = torch.randn(N_OUT, K_IN, generator=torch.Generator().manual_seed(seed)) * 0.02
    w[w.abs() < w.abs().flatten().kthvalue(int(SPARSITY * w.numel())).values] = 0.0
    dense = w.numpy()
    rows, cols = np.nonzero(dense)
    row_ptr = np.concatenate([[0], np.cumsum(np.bincount(rows, minlength=N_OUT))]).astype(np.int32)
    return w, SparseWeights.canonical((N_OUT, K_IN), row_ptr, cols.astype(np.int32), dense[rows, cols])


def run(models=None, batches=None, *, quick: bool = False, out=None, threads: int | None = None, **_) -> dict:
    from codegen.target import host_cpu_target
    from codegen.weight_codec import csr_chunked

    threads = threads or h.CPU_COUNT
    h.set_thread_counts(threads)
    target = host_cpu_target()
    if not K.has_avx512(target):
        return {"markdown": "no AVX-512 on this host: the gather kernel is not used here, nothing to measure"}
    w, sw = _sparse_weight()
    lay = csr_chunked(sw, K.LANES)
    n_chunks = len(lay["base"])
    dev = tvm.cpu()
    x = torch.randn(1, K_IN, generator=torch.Generator().manual_seed(1))
    xv, v, off, base, cnt, ptr, cb, bias, y = [tvm.runtime.tensor(a, dev) for a in (
        x.numpy(), lay["values"], lay["offsets"], lay["base"], lay["count"], lay["row_ptr"], np.zeros(1, np.float32),
        np.zeros(N_OUT, np.float32), np.zeros((1, N_OUT), np.float32))]
    funcs = {"full": K.csr_chunk(1, N_OUT, K_IN, n_chunks, 0, False),
             "gather": _probe(N_OUT, K_IN, n_chunks, "gather"), "stream": _probe(N_OUT, K_IN, n_chunks, "stream")}
    timers = {}
    for name, func in funcs.items():
        lib = tvm.compile(tvm.IRModule({name: func.with_attr("global_symbol", name)}), target=target)
        call = [xv, v, off, base, cnt, ptr, cb, bias, y] if name == "full" else [xv, v, off, base, ptr, y]
        timer = lib.mod.time_evaluator(name, dev, number=20, repeat=5, min_repeat_ms=50)
        timers[name] = (lambda t=timer, a=call: float(np.median(t(*a).results)) * 1e3)
        if name == "full":   # the real kernel must be right before its time means anything
            lib.mod[name](*call)
            err = float(np.abs(call[-1].numpy() - F.linear(x, w).numpy()).max())
            if err > h.ERR_TOL:
                raise AssertionError(f"csr_chunk differs from torch by {err}")

    def torch_ms() -> float:
        with torch.no_grad():
            return h.time_loop(lambda: F.linear(x, w), repeats=5)

    med, _ = h.interleaved({**timers, "torch": torch_ms}, rounds=3 if quick else 9)
    what = {"full": "the kernel as built (gathers + streams)", "gather": "16-lane gathers of x only",
            "stream": f"streaming the layout only ({(lay['values'].nbytes + lay['offsets'].nbytes + lay['base'].nbytes) / 1e6:.1f} MB)",
            "torch": "torch fp32 F.linear, dense weight"}
    rows = [{"variant": name, "ms": med[name], "speedup": med["torch"] / med[name], "what": what[name]}
            for name in ("full", "gather", "stream", "torch")]
    return h.sectioned_report(
        "csr-gather", f"CSR batch-1 kernel, 90 % sparse {N_OUT}×{K_IN} ({n_chunks} chunks of 16), {threads} thread(s)",
        [("variants timed side by side (interleaved rounds, medians)", rows, COLUMNS)], quick=quick, out=out)
