"""Suite "binary": bit-plane (xnor/and-popcount) kernels vs torch fp32, and binarized demo models.

* Kernels: a 4096×4096 Linear at batch 1 and 64, and a 3×3 conv 256→256 on 14×14 at batch 1, each
  as a binary XNOR-Net layer (sign weights and activations, scales in the epilogue) compiled by
  Squeezer, timed side by side (interleaved rounds, medians) with torch fp32 ``F.linear`` /
  ``F.conv2d`` on the same thread count. A ternary-weight / 2-bit-activation row shows how the
  bit-serial cost grows with planes. Where AMX can take a pure ±1 layer (the conv, the batch-64
  dense) both kernels are timed in the same interleaved rounds: xnor-popcount and AMX int8 tiles.
  Targets (issue): dense ≥ 50× at batch 1, ≥ 15× at batch 64; conv ≥ 10×.
* End to end: the demo's LeNet-5 binarized (XNOR-Net and BNN: first/last layer full precision,
  10 epochs of STE + distillation fine-tuning, packed), compiled, vs the fp32 model in torch
  eager: accuracy on the demo test set, weight bytes, latency at batch 1 and 64.
"""

from __future__ import annotations

import dataclasses
import warnings
from pathlib import Path
from typing import Any, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from . import harness as h

KERNEL_COLUMNS = [("kernel", "kernel", "s"), ("batch", "batch", "d"), ("format", "weights / activations", "s"),
                  ("code", "kernel code", "s"),
                  ("speedup", "speedup vs torch fp32", ".1f"), ("target", "target", "s"),
                  ("squeezer_ms", "squeezer ms", ".4f"), ("torch_ms", "torch fp32 ms", ".4f"),
                  ("max_abs_err", "max abs err vs torch op", ".1e")]
MODEL_COLUMNS = [("method", "method", "s"), ("accuracy", "accuracy", ".2%"), ("baseline", "fp32 accuracy", ".2%"),
                 ("bytes", "weight bytes", ",d"), ("fp32_bytes", "fp32 weight bytes", ",d"),
                 ("speedup_b1", "speedup b1 vs eager fp32", ".1f"), ("speedup_b64", "speedup b64 vs eager fp32", ".1f")]


def _torch_timer(fn, args):
    def run():
        with torch.no_grad():
            return h.time_loop(lambda: fn(*args), repeats=5)
    return run


def _kernel_rows(quick: bool) -> list[dict]:
    import codegen
    import compiler
    from codegen.kernels.amx_kernels import MIN_ROWS, amx_available
    from codegen.target import host_cpu_target
    from compiler.ops.bitserial import BitConv2d, BitLinear

    gen = torch.Generator().manual_seed(0)
    rows = []
    cases = []
    k = n = 4096
    w = torch.randn(n, k, generator=gen)
    for batch in ((1,) if quick else (1, 64)):
        x = torch.randn(batch, k, generator=gen)
        layer = BitLinear((w >= 0)[None], [2.0], -1.0, w.abs().mean(1), torch.zeros(n), "sign", xnor_scale=True)
        cases.append(("linear 4096x4096", batch, "binary / binary (XNOR)", layer, x,
                      lambda x, w=w: F.linear(x, w), "50x" if batch == 1 else "15x"))
    if not quick:
        tern = torch.stack([w > 0.7, w < -0.7])
        x = torch.rand(1, k, generator=gen)
        cases.append(("linear 4096x4096", 1, "ternary / 2-bit", BitLinear(tern, [1.0, -1.0], 0.0, torch.ones(n), None,
                                                                          "unsigned", 2), x,
                      lambda x, w=w: F.linear(x, w), ""))
    wc = torch.randn(256, 256, 3, 3, generator=gen)
    xc = torch.randn(1, 256, 14, 14, generator=gen)
    conv = BitConv2d((wc >= 0)[None], [2.0], -1.0, wc.abs().mean((1, 2, 3)), torch.zeros(256), (1, 1), (1, 1), (1, 1),
                     "sign", xnor_scale=True)
    cases.append(("conv3x3 256->256 @14x14", 1, "binary / binary (XNOR)", conv, xc,
                  lambda x, w=wc: F.conv2d(x, w, None, 1, 1), "10x"))
    amx = amx_available(host_cpu_target())
    for label, batch, fmt, layer, x, torch_fn, target in cases:
        g = compiler.trace(nn.Sequential(layer).eval(), (x,))
        pure = fmt.startswith("binary / binary")
        takes_amx = pure and (label.startswith("conv") or batch >= MIN_ROWS)
        # both kernels side by side where AMX can take the layer (its throughput swings here)
        variants = {"xnor-popcount": "popcount", "AMX tiles": "amx"} if amx and takes_amx else {"xnor-popcount": "popcount"}
        builds = {name: codegen.build(g, binary_kernels=policy) for name, policy in variants.items()}
        xn = x.numpy()
        n_, r_ = (20, 3) if quick else (50, 5)
        timers = {name: (lambda c=c: c.benchmark(xn, number=n_, repeat=r_)["median_ms"]) for name, c in builds.items()}
        med, _ = h.interleaved({**timers, "torch_ms": _torch_timer(torch_fn, (x,))}, rounds=3 if quick else 5)
        ref = g.run_example()
        for name, compiled in builds.items():
            err = h.max_abs_err(ref, compiled(x))
            rows.append({"kernel": label, "batch": batch, "format": fmt, "code": name,
                         "speedup": med["torch_ms"] / med[name], "target": target, "squeezer_ms": med[name],
                         "torch_ms": med["torch_ms"], "max_abs_err": err,
                         "flagged": err > 1e-3 * max(1.0, float(ref.abs().max()))})
    return rows


def _model_rows(quick: bool) -> list[dict]:
    import codegen
    import compiler
    from squeezer.data import mnist_subset
    from squeezer.demo import BASELINE, FINETUNE, baseline_model
    from compiler.finetune import batches_of, evaluate, train
    from passes import Binarize

    model = baseline_model(progress=False, log=lambda *_: None)
    (xtr, ytr), (xte, yte) = mnist_subset()
    original = compiler.trace(model, (xte[:1],))
    baseline = evaluate(original.module, batches_of(xte, yte, 250))
    config = dataclasses.replace(FINETUNE, epochs=2 if quick else 10, lr=2e-3, progress=False)
    rows = []
    for method in (("xnor",) if quick else ("xnor", "bnn")):
        trained = Binarize(method=method, stage="train")(original)
        train(trained.module, batches_of(xtr, ytr, BASELINE["batch"], shuffle=True, seed=1), config,
              teacher=original.module)
        packed = Binarize(method=method)(trained)
        accuracy = evaluate(packed.module, batches_of(xte, yte, 250))
        speed = {}
        for batch in (1, 64):
            x = xte[:batch]
            g = compiler.trace(packed.module, (x,))
            compiled = codegen.build(g)
            xn = x.numpy()
            med, _ = h.interleaved({"squeezer": lambda: compiled.benchmark(xn, number=50, repeat=5)["median_ms"],
                                    "eager": _torch_timer(original.module, (x,))}, rounds=3)
            speed[batch] = med["eager"] / med["squeezer"]
        rows.append({"method": method, "accuracy": accuracy, "baseline": baseline,
                     "bytes": compiler.summarize(packed).total_bytes,
                     "fp32_bytes": compiler.summarize(original).total_bytes,
                     "speedup_b1": speed[1], "speedup_b64": speed[64]})
    return rows


def run(models: Sequence[str] | None = None, batches: Sequence[int] | None = None, *, quick: bool = False,
        out: str | Path | None = None, threads: int | None = None) -> dict[str, Any]:
    threads = threads or h.CPU_COUNT
    h.set_thread_counts(threads)
    warnings.filterwarnings("ignore", category=FutureWarning)
    kernel_rows = _kernel_rows(quick)
    model_rows = _model_rows(quick)
    return h.sectioned_report("binary", f"binary (TVM llvm vs torch fp32, {threads} thread(s) each)", [
        ("kernels", kernel_rows, KERNEL_COLUMNS),
        ("the demo's LeNet-5 binarized (first/last layer fp32; STE + distillation fine-tuning)", model_rows,
         MODEL_COLUMNS)], quick=quick, out=out, rows=kernel_rows, models=model_rows)
