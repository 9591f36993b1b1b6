"""Suite "low-rank": MACs, parameters and compiled latency vs rank, per layer and end to end, and
accuracy on the demo task after split + distillation.

* Per layer: a 3×3 conv (128→128 channels, 28×28, batch 1) split by Tucker-2, CP and spatially
  separable factorization, and a 1024×1024 Linear (batch 1 and 32) split by SVD, at several
  rank ratios. The dense layer and its split chain are compiled with TVM for this CPU and timed
  side by side (interleaved rounds, medians); relative output error vs the dense layer.
* End to end: the ResNet-style network of the "pruning" suite split with Tucker-2 at rank ratio
  0.25, with and without ``latency_aware`` (keep a split only where it measured faster).
* Accuracy: the demo's LeNet-5 split (the demo's ``low-rank`` variant: separable convs + SVD at
  80% energy), before and after 3 epochs of distillation from the unsplit model.

Speedup = dense ms / split ms (> 1: the split is faster). A row is flagged when the compiled
split disagrees with its torch module by more than 1e-4.
"""

from __future__ import annotations

import dataclasses
import warnings
from pathlib import Path
from typing import Any, Sequence

import torch
from torch import nn

from . import harness as h

LAYER_COLUMNS = [("layer", "layer", "s"), ("batch", "batch", "d"), ("method", "method", "s"), ("rank", "rank", "s"),
                 ("macs", "MACs vs dense", ".2f"), ("params", "params vs dense", ".2f"),
                 ("speedup", "speedup vs dense (compiled)", ".2f"), ("rel_err", "rel. output error", ".3f"),
                 ("dense_ms", "dense ms", ".4f"), ("split_ms", "split ms", ".4f")]
MODEL_COLUMNS = [("model", "model", "s"), ("split", "split", "s"), ("layers_split", "layers split", "d"),
                 ("macs", "MACs vs dense", ".2f"), ("speedup", "speedup vs dense (compiled)", ".2f"),
                 ("dense_ms", "dense ms", ".3f"), ("split_ms", "split ms", ".3f")]
ACC_COLUMNS = [("spec", "passes", "s"), ("macs", "MACs vs original", ".2f"), ("params", "params vs original", ".2f"),
               ("acc_split", "acc. split", ".2%"), ("acc_finetuned", "acc. split + KD", ".2%"),
               ("change", "change vs baseline (points)", "+.2f")]


def _time_pair(dense_graph, split_graph, x, quick: bool) -> tuple[dict, float]:
    import codegen

    cd, cs = codegen.build(dense_graph), codegen.build(split_graph)
    err = h.max_abs_err(split_graph.run_example(), cs(*x))
    n, r = (5, 3) if quick else (20, 5)
    med, _ = h.interleaved({"dense_ms": lambda: cd.benchmark(*x, number=n, repeat=r)["median_ms"],
                            "split_ms": lambda: cs.benchmark(*x, number=n, repeat=r)["median_ms"]},
                           rounds=3 if quick else 5)
    return med, err


def _layer_rows(quick: bool) -> list[dict]:
    import compiler
    from passes import LowRankSplit

    torch.manual_seed(0)
    cases = [("conv3x3 128->128 @28x28", nn.Conv2d(128, 128, 3, padding=1), (1, 128, 28, 28),
              ("tucker2", "cp", "separable"))]
    cases += [("linear 1024x1024", nn.Linear(1024, 1024), (b, 1024), ("svd",)) for b in ((1,) if quick else (1, 32))]
    ratios = (0.25,) if quick else (0.125, 0.25, 0.5)
    rows = []
    for label, layer, shape, methods in cases:
        model = nn.Sequential(layer).eval()
        x = (torch.randn(shape, generator=torch.Generator().manual_seed(1)),)
        dense = compiler.trace(model, x)
        before = compiler.summarize(dense)
        for method in methods:
            for ratio in ratios:
                full = min(layer.weight.shape[0], layer.weight.shape[1])
                rank = max(1, round(ratio * full))
                split = LowRankSplit(method="auto" if method == "svd" else method, rank=rank,
                                     only_if_fewer_macs=False)(dense)
                after = compiler.summarize(split)
                med, err = _time_pair(dense, split, x, quick)
                with torch.no_grad():
                    ref, got = dense.run_example(), split.run_example()
                rows.append({"layer": label, "batch": shape[0], "method": method,
                             "rank": f"{rank} ({ratio:g})", "macs": after.total_macs / before.total_macs,
                             "params": after.total_params / before.total_params,
                             "speedup": med["dense_ms"] / med["split_ms"],
                             "rel_err": float((got - ref).norm() / ref.norm()), **med, "max_abs_err": err,
                             "flagged": err > h.ERR_TOL})
    return rows


def _model_rows(quick: bool) -> list[dict]:
    import compiler
    from passes import LowRankSplit

    from .pruning import ResNetSmall

    torch.manual_seed(0)
    model = ResNetSmall().eval()
    x = (torch.randn(1, 3, 32, 32, generator=torch.Generator().manual_seed(1)),)
    dense = compiler.trace(model, x)
    rows = []
    for label, p in [("tucker2, rank ratio 0.25", LowRankSplit(method="tucker2", rank_ratio=0.25)),
                     ("tucker2, rank ratio 0.25, latency_aware", LowRankSplit(method="tucker2", rank_ratio=0.25,
                                                                               latency_aware=True))][: 1 if quick else 2]:
        split = p(dense)
        med, err = _time_pair(dense, split, x, quick)
        rows.append({"model": "ResNet-style 64/128/256, batch 1", "split": label,
                     "layers_split": len(split.reports[-1].changed),
                     "macs": compiler.summarize(split).total_macs / compiler.summarize(dense).total_macs,
                     "speedup": med["dense_ms"] / med["split_ms"], **med, "max_abs_err": err,
                     "flagged": err > h.ERR_TOL})
    return rows


def _accuracy_rows(quick: bool) -> tuple[float, list[dict]]:
    import compiler
    from squeezer.data import mnist_subset
    from squeezer.demo import BASELINE, FINETUNE, VARIANTS, baseline_model
    from compiler.finetune import batches_of, evaluate, train
    from passes import LowRankSplit

    model = baseline_model(progress=False, log=lambda *_: None)
    (xtr, ytr), (xte, yte) = mnist_subset()
    test = lambda m: evaluate(m, batches_of(xte, yte, 250))  # noqa: E731
    original = compiler.trace(model, (xte[:1],))
    baseline = test(original.module)
    config = dataclasses.replace(FINETUNE, epochs=1 if quick else FINETUNE.epochs, progress=False)
    rows = []
    for passes in (VARIANTS["low-rank"].passes, [LowRankSplit(method="tucker2", energy=0.8)]):
        specs = [p.spec() for p in passes]
        split = compiler.Pipeline(passes)(original)
        acc_split = test(split.module)
        train(split.module, batches_of(xtr, ytr, BASELINE["batch"], shuffle=True, seed=1), config,
              teacher=original.module)
        acc = test(split.module)
        a, b = compiler.summarize(original), compiler.summarize(split)
        rows.append({"spec": " + ".join(specs), "macs": b.total_macs / a.total_macs,
                     "params": b.total_params / a.total_params, "acc_split": acc_split, "acc_finetuned": acc,
                     "change": (acc - baseline) * 100})
    return baseline, rows


def run(models: Sequence[str] | None = None, batches: Sequence[int] | None = None, *, quick: bool = False,
        out: str | Path | None = None, threads: int | None = None) -> dict[str, Any]:
    threads = threads or h.CPU_COUNT
    h.set_thread_counts(threads)
    warnings.filterwarnings("ignore", module="tensorly")
    layer_rows = _layer_rows(quick)
    model_rows = _model_rows(quick)
    baseline, acc_rows = _accuracy_rows(quick)
    md = [f"## low-rank (TVM llvm, {threads} thread(s))", "", f"{h.machine_info().get('date', '')}", "",
          "### per layer: dense vs split, compiled and timed side by side", "",
          h.markdown_table(layer_rows, LAYER_COLUMNS), "",
          "### end to end", "", h.markdown_table(model_rows, MODEL_COLUMNS), "",
          f"### accuracy on the demo task (baseline {baseline:.2%}; KD fine-tune from the unsplit model)", "",
          h.markdown_table(acc_rows, ACC_COLUMNS)]
    markdown = "\n".join(md)
    result = {"suite": "low-rank", "machine": h.machine_info(), "rows": layer_rows + model_rows,
              "accuracy": {"baseline": baseline, "rows": acc_rows}, "markdown": markdown}
    h.write_results("low_rank_quick" if quick else "low_rank", result, markdown, out or Path(__file__).parent / "results")
    return result
