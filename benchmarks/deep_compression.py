"""Suite "deep-compression": sparse and lookup-table kernels vs torch fp32, and the Deep Compression
pipeline on the demo dataset.

* Kernels (same thread count, interleaved rounds, medians): a 4096×4096 Linear at 90 % unstructured
  sparsity (CSR) and at 90 % block sparsity (16×1 blocks, BSR), batch 1 and 32; a 4-bit clustered
  (lookup-table) Linear; and 90 % sparse + 4-bit clustered. Each compiled by Squeezer with
  ``sparse_kernels="sparse"`` and timed against ``F.linear`` with the dense fp32 weight. Targets
  (issue): CSR ≥ 5×, BSR ≥ 6× at batch 1; LUT 4-bit ≥ 1× at batch 1.
* Pipeline: LeNet-300-100 and LeNet-5 trained on the demo dataset, then prune (global magnitude) →
  fine-tune with fixed masks → cluster → fine-tune centroids → build (the build measures sparse vs
  dense per layer) → export (Huffman). Reported: accuracy of the exported module reloaded, and the
  deployable weight bytes (weights.bin + weights left in model.so) vs the fp32 weights. Target:
  ≥ 35× smaller, accuracy within 0.5 point.
"""

from __future__ import annotations

import tempfile
import warnings
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from . import harness as h

KERNEL_COLUMNS = [("kernel", "kernel", "s"), ("batch", "batch", "d"), ("speedup", "speedup vs torch fp32", ".1f"),
                  ("target", "target", "s"), ("squeezer_ms", "squeezer ms", ".4f"), ("torch_ms", "torch fp32 ms", ".4f"),
                  ("max_abs_err", "max abs err", ".1e")]
MODEL_COLUMNS = [("model", "model", "s"), ("config", "recipe", "s"), ("baseline", "fp32 accuracy", ".2%"),
                 ("accuracy", "compressed accuracy (exported module)", ".2%"), ("fp32_bytes", "fp32 weight bytes", ",d"),
                 ("deployable_bytes", "deployable bytes", ",d"), ("ratio", "smaller by", ".1f"),
                 ("dense_layers", "layers run dense (measured faster)", "s")]

PIPELINES = {  # the paper keeps 8 % of both nets' weights with 5-6 bit (fc) clusters
    "lenet-300-100": {"sparsity": 0.92, "bits": 5},
    "lenet5": {"sparsity": 0.93, "bits": 4},
}


def _kernel_rows(quick: bool) -> list[dict]:
    import codegen
    import compiler
    from passes import Sparsify, WeightClustering

    gen = torch.Generator().manual_seed(0)
    n = k = 4096
    lin = nn.Linear(k, n, bias=False)
    with torch.no_grad():
        lin.weight.copy_(torch.randn(n, k, generator=gen) * 0.02)
    dense = compiler.trace(nn.Sequential(lin).eval(), (torch.zeros(1, k),))
    variants = [("CSR 90 % unstructured", Sparsify(sparsity=0.9), "5x"),
                ("BSR 90 % (16x1 blocks)", Sparsify(sparsity=0.9, pattern="block", block="16x1"), "6x"),
                ("LUT 4-bit (16 clusters)", WeightClustering(bits=4), ">= 1x"),
                ("CSR 90 % + 4-bit clusters", None, "")]
    rows = []
    for label, p, target in variants:
        g = p(dense) if p is not None else WeightClustering(bits=4)(Sparsify(sparsity=0.9)(dense))
        weight = g.module.get_submodule("0").decoded_weight().detach()
        for batch in ((1,) if quick else (1, 32)):
            x = torch.randn(batch, k, generator=gen)
            gb = compiler.trace(g.module, (x,))
            compiled = codegen.build(gb, sparse_kernels="sparse")
            err = h.max_abs_err(F.linear(x, weight), compiled(x))
            xn = x.numpy()

            def torch_run(x=x, w=weight):
                with torch.no_grad():
                    return h.time_loop(lambda: F.linear(x, w), repeats=5)

            med, _ = h.interleaved({"squeezer_ms": lambda: compiled.benchmark(xn, number=20, repeat=5)["median_ms"],
                                    "torch_ms": torch_run}, rounds=3 if quick else 5)
            rows.append({"kernel": label, "batch": batch, "speedup": med["torch_ms"] / med["squeezer_ms"],
                         "target": target if batch == 1 else "", **med, "max_abs_err": err})
    return rows


def _model_rows(quick: bool) -> list[dict]:
    import codegen
    import compiler
    from codegen.kernel_choice import decisions as decisions_log
    from squeezer import zoo
    from squeezer.data import mnist_subset
    from squeezer.recipes.deep_compression import DeepCompressionConfig, deep_compress, dense_fp32_bytes
    from squeezer.demo import baseline_model
    from compiler.finetune import TrainConfig, batches_of, train

    (xtr, ytr), (xte, yte) = mnist_subset()
    rows = []
    for name, recipe in PIPELINES.items():
        if name == "lenet5":
            model = baseline_model(progress=False, log=lambda *_: None)
        else:
            model = zoo.get(name).build()
            train(model, batches_of(xtr, ytr, 64, shuffle=True), TrainConfig(epochs=8, lr=2e-3, progress=False))
        g = compiler.trace(model, (xte[:1],))
        cfg = DeepCompressionConfig(**recipe, prune_epochs=2 if quick else 6, cluster_epochs=1 if quick else 3)
        compressed, stats = deep_compress(g, (xtr, ytr), (xte, yte), cfg, log=lambda *_: None)
        start = len(decisions_log)
        compiled = codegen.build(compressed)
        with tempfile.TemporaryDirectory() as d:
            compiled.export(d)
            loaded = codegen.load(d)
            preds = np.array([int(np.argmax(loaded(xte[i:i + 1].numpy()))) for i in range(len(xte))])
        report = compiled.weight_report()
        fp32 = dense_fp32_bytes(model)
        dense_layers = [e["layer"] for e in decisions_log[start:] if e["chosen"] == "dense"]
        rows.append({"model": name, "config": f"{recipe['sparsity']:.0%} pruned, {recipe['bits']}-bit clusters",
                     "baseline": stats["accuracy_original"], "accuracy": float((preds == yte.numpy()).mean()),
                     "fp32_bytes": fp32, "deployable_bytes": report["deployable_bytes"],
                     "ratio": fp32 / report["deployable_bytes"], "dense_layers": ", ".join(dense_layers) or "none",
                     "stages": stats})
    return rows


def run(models: Sequence[str] | None = None, batches: Sequence[int] | None = None, *, quick: bool = False,
        out: str | Path | None = None, threads: int | None = None) -> dict[str, Any]:
    threads = threads or h.CPU_COUNT
    h.set_thread_counts(threads)
    warnings.filterwarnings("ignore", category=FutureWarning)
    kernel_rows = _kernel_rows(quick)
    model_rows = _model_rows(quick)
    return h.sectioned_report("deep-compression", f"deep-compression (TVM llvm vs torch fp32, {threads} thread(s) each)", [
        ("kernels (4096×4096 Linear)", kernel_rows, KERNEL_COLUMNS),
        ("prune → fine-tune → cluster → fine-tune → Huffman, on the demo dataset", model_rows, MODEL_COLUMNS)],
        quick=quick, out=out, rows=kernel_rows, models=model_rows)
