"""Suite "pruning-coverage": how far channel pruning reaches on the world's models.

Every torchvision classifier under 500 M parameters (random weights, nothing downloaded), traced
and pruned by Squeezer at ``ratio=0.5`` and at ``target_macs=0.5``; side by side, Torch-Pruning's
default recipe (``MetaPruner``, L1 magnitude, ``pruning_ratio=0.5``, the 1000-class head ignored)
on the same model, each in a child process with a time limit (Torch-Pruning stalls on some). A row
records success (the pruned model runs and keeps its output shape), parameters and MACs kept,
what stayed frozen and why (Squeezer), and the time taken.

Parameters are counted on the model each tool prunes: Squeezer's traced graph drops the auxiliary
classifiers googlenet and inception_v3 do not use in eval mode, so its ratios are against the
traced model's own parameters; Torch-Pruning's against the whole module.

The transformer rows (``hf-*``) are Hugging Face models at their base sizes built from configs
(random weights) with their task heads — BERT-base and ViT-B/16 classifiers, GPT-2 and a
Llama-style decoder with language-model heads — whose head's output size both tools keep.
``--models hf-bert,...`` (or torchvision names) reruns those rows and merges them into the saved
results."""

from __future__ import annotations

import collections
import importlib.util
import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Sequence

import torch

from . import harness as h

MAX_PARAMS = 500e6
TRANSFORMERS = ("hf-bert", "hf-gpt2", "hf-vit", "hf-llama")
TP_TIMEOUT_S = 120
TARGET_MACS_UP_TO = 30e6   # parameters: larger models are swept at ratio=0.5 only
QUICK = ["resnet18", "mobilenet_v3_small", "convnext_tiny", "efficientnet_b0", "shufflenet_v2_x1_0", "vit_b_16",
         "swin_t"]
COLUMNS = [("model", "model", "s"), ("sq_params_kept", "Squeezer params kept", ".3f"),
           ("sq_macs_kept", "Squeezer MACs kept", ".3f"), ("sq_target_params_kept", "target_macs=0.5: params kept", ".3f"),
           ("tp_params_kept", "Torch-Pruning params kept", ".3f"), ("vs_tp", "Squeezer / TP params", ".2f"),
           ("sq_s", "Squeezer s", ".1f"), ("tp_s", "TP s", ".1f"), ("frozen", "frozen (Squeezer), main reasons", "s")]


def _torchvision():
    from squeezer.torchvision_compat import import_torchvision

    return import_torchvision()


def _hugging_face(name: str) -> tuple[torch.nn.Module, torch.Tensor, dict]:
    """(model, example input, concrete_args): base-size configs, random weights, their task heads."""
    _torchvision()   # transformers imports torchvision
    import transformers as tf

    torch.manual_seed(0)
    ids = torch.randint(0, 1000, (1, 128))
    if name == "hf-bert":
        return tf.BertForSequenceClassification(tf.BertConfig(num_labels=2)).eval(), ids, {}
    if name == "hf-gpt2":
        return tf.GPT2LMHeadModel(tf.GPT2Config()).eval(), ids, {"use_cache": False}
    if name == "hf-vit":
        return tf.ViTForImageClassification(tf.ViTConfig(num_labels=1000)).eval(), torch.randn(1, 3, 224, 224), {}
    if name == "hf-llama":   # 12 layers of 768 (12 heads, no grouped-query sharing), 32k vocabulary
        config = tf.LlamaConfig(hidden_size=768, intermediate_size=2048, num_hidden_layers=12, num_attention_heads=12,
                                num_key_value_heads=12, max_position_embeddings=512)
        return tf.LlamaForCausalLM(config).eval(), ids, {"use_cache": False}
    raise KeyError(f"unknown transformer {name!r}; choose from {TRANSFORMERS}")


def model_and_input(name: str) -> tuple[torch.nn.Module, torch.Tensor]:
    if name.startswith("hf-"):
        return _hugging_face(name)[:2]
    torch.manual_seed(0)
    model = _torchvision().models.get_model(name, weights=None).eval()
    size = 299 if name == "inception_v3" else 224
    return model, torch.randn(1, 3, size, size)


def classifier_params() -> dict[str, int]:
    """Every torchvision classifier's parameter count (counted without building them where possible)."""
    tv = _torchvision()
    counts = {}
    for name in tv.models.list_models(module=tv.models):
        try:
            with torch.device("meta"):
                counts[name] = sum(p.numel() for p in tv.models.get_model(name, weights=None).parameters())
        except NotImplementedError:   # a model whose constructor copies data: built for real
            counts[name] = sum(p.numel() for p in tv.models.get_model(name, weights=None).parameters())
    return counts


def candidates() -> list[str]:
    """torchvision's classifiers under MAX_PARAMS parameters."""
    return [name for name, params in classifier_params().items() if params <= MAX_PARAMS]


def _kind(reason: str) -> str:
    """A frozen group's reason, shortened to what froze it (node names dropped)."""
    reason = reason.split(": ", 1)[1] if ": " in reason and not reason.startswith("model") else reason
    return reason.replace("'", "")[:60]


def squeezer_row(name: str) -> dict[str, Any]:
    import compiler
    from passes import ChannelPruning

    from compiler.finetune import logits_of

    model, x, fixed = _hugging_face(name) if name.startswith("hf-") else (*model_and_input(name), {})
    start = time.perf_counter()
    row: dict[str, Any] = {"model": name}
    try:
        graph = compiler.trace(model, (x,), concrete_args=fixed)
        before = compiler.summarize(graph)
        pruned = ChannelPruning(ratio=0.5)(graph)
        if logits_of(pruned.run_example()).shape != logits_of(graph.run_example()).shape:
            raise AssertionError("output shape changed")
        after = compiler.summarize(pruned)
        row.update(sq_ok=True, sq_params_kept=after.total_params / before.total_params,
                   sq_macs_kept=after.total_macs / before.total_macs)
        reasons = collections.Counter(_kind(part) for _, why in pruned.reports[-1].skipped
                                      for part in why.split("; ") if "model output" not in part)
        row["frozen"] = "; ".join(f"{n}× {why}" for why, n in reasons.most_common(2)) or "-"
        if before.total_params <= TARGET_MACS_UP_TO:   # its ratio search costs ~20 plans: the smaller models
            target = ChannelPruning(target_macs=0.5)(graph)
            row["sq_target_params_kept"] = compiler.summarize(target).total_params / before.total_params
    except Exception as exc:  # noqa: BLE001 - a failure is a row of the table
        row.update(sq_ok=False, sq_error=h.exception_line(exc)[:250])
    row["sq_s"] = time.perf_counter() - start
    return row


def torch_pruning_one(name: str) -> dict[str, Any]:
    """Torch-Pruning's default recipe on ``name`` (run in a child process by ``torch_pruning_row``)."""
    import torch_pruning as tp

    from compiler.finetune import logits_of

    model, x, fixed = _hugging_face(name) if name.startswith("hf-") else (*model_and_input(name), {})
    params = sum(p.numel() for p in model.parameters())
    if name.startswith("hf-"):   # the task head keeps its outputs
        heads = [getattr(model, "classifier", None) or model.get_output_embeddings()]
        example: Any = {"input_ids" if x.dtype == torch.int64 else "pixel_values": x, **fixed}
    else:
        heads = [m for m in model.modules() if isinstance(m, torch.nn.Linear) and m.out_features == 1000
                 or isinstance(m, torch.nn.Conv2d) and m.out_channels == 1000]   # (squeezenet's classifier is a conv)
        example = x
    with torch.no_grad():
        shape = tuple(logits_of(model(x, **fixed)).shape)
    pruner = tp.pruner.MetaPruner(model, example, importance=tp.importance.MagnitudeImportance(p=1),
                                  pruning_ratio=0.5, ignored_layers=heads)
    pruner.step()
    with torch.no_grad():
        out = logits_of(model(x, **fixed))
    if tuple(out.shape) != shape:
        raise AssertionError(f"output shape {tuple(out.shape)}, not {shape}")
    return {"tp_params_kept": sum(p.numel() for p in model.parameters()) / params}


def torch_pruning_row(name: str, timeout: float = TP_TIMEOUT_S) -> dict[str, Any]:
    if importlib.util.find_spec("torch_pruning") is None:
        return {"tp_ok": None, "tp_error": "torch-pruning not installed (pip install torch-pruning==1.6.1)"}
    start = time.perf_counter()
    env = dict(os.environ, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "2"))
    try:
        result, run = h.child_json("pruning_coverage", "--torch-pruning", name, timeout=timeout, env=env)
    except subprocess.TimeoutExpired:
        return {"tp_ok": False, "tp_error": f"stalled (> {timeout:.0f} s)", "tp_s": timeout}
    errors = [line for line in run.stderr.splitlines() if "Error" in line.split(":")[0]] or run.stderr.splitlines()
    result = result or {"tp_error": (errors or ["no output"])[-1].strip()[:200]}
    result["tp_ok"] = "tp_params_kept" in result
    result["tp_s"] = time.perf_counter() - start
    return result


def run(models: Sequence[str] | None = None, batches: Sequence[int] | None = None, *, quick: bool = False,
        out: str | Path | None = None, threads: int | None = None) -> dict[str, Any]:
    threads = threads or h.CPU_COUNT
    h.set_thread_counts(threads)
    names = list(models) if models else QUICK if quick else candidates() + list(TRANSFORMERS)
    rows = []
    for name in names:
        row = squeezer_row(name) | torch_pruning_row(name)
        if row.get("sq_ok") and row.get("tp_ok"):
            row["vs_tp"] = row["sq_params_kept"] / row["tp_params_kept"]
        if not row.get("sq_ok"):
            row["frozen"] = f"FAILED: {row.get('sq_error')}"
        if row.get("tp_ok") is False:
            row["tp_params_kept"] = None
            row["frozen"] = f"{row.get('frozen', '')} (TP: {row.get('tp_error', '')[:80]})"
        rows.append(row)
        print(f"{name}: {json.dumps({k: v for k, v in row.items() if k != 'frozen'}, default=str)}", flush=True)
    return h.write_sweep("pruning-coverage", rows, lambda rows: _report(rows, threads), rerun=bool(models),
                         quick=quick, out=out)


def _report(rows: list[dict[str, Any]], threads: int) -> str:
    hf = [r for r in rows if r["model"].startswith("hf-")]
    rows = [r for r in rows if not r["model"].startswith("hf-")]
    ok = [r for r in rows if r.get("sq_ok")]
    both = [r for r in ok if r.get("tp_ok")]
    within = [r for r in both if r["vs_tp"] <= 1.1]
    geo = math.exp(sum(math.log(r["vs_tp"]) for r in both) / len(both)) if both else None
    lines = [f"## pruning-coverage (torchvision classifiers, random weights, ratio=0.5; {threads} thread(s))", "",
             f"{h.machine_info().get('date', '')}", "",
             f"Squeezer prunes {len(ok)}/{len(rows)} models; Torch-Pruning 1.6.1's default recipe "
             f"{sum(1 for r in rows if r.get('tp_ok'))}/{len(rows)}. Where both succeed, Squeezer keeps ≤ 1.1× "
             f"Torch-Pruning's parameters on {len(within)}/{len(both)}"
             + (f" (geometric mean of the ratio {geo:.2f})." if geo else "."), "",
             "Params kept: Squeezer against the traced model (googlenet's and inception_v3's unused auxiliary "
             "classifiers are not traced), Torch-Pruning against the whole module. *target_macs=0.5* is run on "
             f"the models up to {TARGET_MACS_UP_TO / 1e6:.0f} M parameters. *frozen*: the two most common "
             "reasons groups of channels stayed whole (the model's output excluded).", ""]
    table = "\n".join(lines) + h.markdown_table(rows, COLUMNS)
    if hf:
        table += ("\n\n### Hugging Face transformers (base sizes, random weights, task heads kept)\n\n"
                  f"Squeezer prunes {sum(1 for r in hf if r.get('sq_ok'))}/{len(hf)}; Torch-Pruning's default recipe "
                  f"{sum(1 for r in hf if r.get('tp_ok'))}/{len(hf)}.\n\n" + h.markdown_table(hf, COLUMNS))
    return table


if __name__ == "__main__" and sys.argv[1:2] == ["--torch-pruning"]:
    print(json.dumps(torch_pruning_one(sys.argv[2])))
