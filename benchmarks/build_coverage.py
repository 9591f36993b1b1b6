"""Suite "build-coverage": does every torchvision classifier compile and match torch?

The real-models suite times a chosen dozen; a user brings any of torchvision's classifiers. Here
each one under ``MAX_PARAMS`` parameters (random weights, nothing downloaded) is traced, built for
``llvm`` with the default options and run on one random image, dense and channel-pruned at
``ratio=0.5`` with no rounding (the odd widths a pruning pass leaves: 27 of 56 channels, not whole
vectors). Each output is compared with torch's on the same input (the pruned one with the pruned
torch model's). Each model runs in a child process with a time limit, so a crash, a hang or memory
exhaustion is a row of the table, not the end of the sweep. A row is *ok* when both builds ran and
both errors are within the 1e-4 relative contract."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Sequence

import torch

from . import harness as h

MAX_PARAMS = 150e6   # vit_l_16 (304 M) and regnet_y_32gf+ take most of an hour to build alone
TIMEOUT_S = 900
MIN_SENSITIVITY = 1e-2   # an output that moves less than this with the input checks nothing
MAX_TORCH_ERR = h.ERR_TOL / 2   # torch's own fp32 error (against fp64) must leave the kernels half the contract
QUICK = ["googlenet", "mnasnet0_5", "shufflenet_v2_x0_5", "resnext50_32x4d", "efficientnet_v2_s", "vit_b_32"]
COLUMNS = [("model", "model", "s"), ("params_m", "params (M)", ".1f"), ("ok", "ok", "s"), ("sensitivity", "input sensitivity", ".2f"),
           ("torch_fp32_err", "torch fp32 vs fp64", ".1e"),
           ("dense_err", "dense rel err", ".1e"), ("pruned_err", "pruned rel err", ".1e"),
           ("pruned_macs_kept", "pruned MACs kept", ".2f"), ("dense_build_s", "dense build s", ".1f"),
           ("pruned_build_s", "pruned build s", ".1f"), ("error", "error", "s")]


def conditioned(model: torch.nn.Module, example: torch.Tensor) -> torch.nn.Module:
    """He-normal weights in every conv and linear layer, and BatchNorm statistics measured on
    random images (as a trained model's are on its data); returned in eval mode. torchvision's own
    initializations make a vacuous check of some models: googlenet's features shrink to nothing
    (std 0.01 weights), so its logits are its classifier's bias whatever the kernels compute.
    He weights alone, unnormalized, grow 40 residual blocks of efficientnet_v2 to 1e6 and make it
    chaotic: torch's own fp32 output differed from its fp64 one by 70 %."""
    norms = [m for m in model.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    with torch.no_grad():
        for layer in model.modules():
            if isinstance(layer, torch.nn.Conv2d | torch.nn.Linear):
                layer.weight.normal_(0.0, (2.0 / layer.weight[0].numel()) ** 0.5)
        if norms:
            for norm in norms:
                norm.reset_running_stats()
                norm.momentum = None   # a cumulative average over the calibration batches
            model.train()
            for _ in range(2):
                model(torch.randn(4, *example.shape[1:]))
    return model.eval()


def _fp64_err(model: torch.nn.Module, x: torch.Tensor, ref: torch.Tensor) -> float:
    """torch's own fp32 error against fp64: the model's conditioning, the floor for any kernel's."""
    import copy

    with torch.no_grad():
        exact = copy.deepcopy(model).double()(x.double())
    return h.rel_err(exact, ref.double())


def one(name: str) -> dict[str, Any]:
    """Trace, build and compare ``name`` dense and pruned (run in a child process by ``row``)."""
    import codegen
    import compiler
    from passes import ChannelPruning

    from .pruning_coverage import model_and_input

    model, x = model_and_input(name)
    model = conditioned(model, x)
    with torch.no_grad():
        ref = model(x)
        # how much the output moves with the input: a check is only as good as this is large
        sensitivity = h.rel_err(ref, model(torch.randn_like(x)))
    row: dict[str, Any] = {"params_m": sum(p.numel() for p in model.parameters()) / 1e6, "sensitivity": sensitivity,
                           "torch_fp32_err": _fp64_err(model, x, ref)}
    stage = "trace"
    try:
        graph = compiler.trace(model, (x,))
        for variant in ("dense", "pruned"):
            if variant == "pruned":
                stage = "channel-pruning"
                pruned = ChannelPruning(ratio=0.5)(graph)
                row["pruned_macs_kept"] = compiler.summarize(pruned).total_macs / compiler.summarize(graph).total_macs
                with torch.no_grad():
                    ref = pruned.module(x)
                graph = pruned
            stage = f"{variant} build"
            start = time.perf_counter()
            cm = codegen.build(graph, "llvm")
            row[f"{variant}_build_s"] = time.perf_counter() - start
            stage = f"{variant} run"
            row[f"{variant}_err"] = h.rel_err(ref, cm(x))
    except Exception as exc:  # noqa: BLE001 - a failure is a row of the table
        row["error"] = f"{stage}: {h.exception_line(exc)}"[:300]
    return row


def row(name: str, timeout: float = TIMEOUT_S) -> dict[str, Any]:
    """``one(name)`` in a child process: a crash or a hang is reported, not fatal."""
    start = time.perf_counter()
    try:
        result, run = h.child_json("build_coverage", "--one", name, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"model": name, "ok": "no", "error": f"timed out (> {timeout:.0f} s)", "s": timeout}
    if result is None:
        tail = [line for line in run.stderr.splitlines() if line.strip()][-1:] or [f"exit code {run.returncode}"]
        result = {"error": f"child died (exit code {run.returncode}): {tail[0].strip()[:200]}"}
    errors = [result.get(f"{v}_err") for v in ("dense", "pruned")]
    passed = "error" not in result and all(e is not None and e <= h.ERR_TOL for e in errors) \
        and result.get("sensitivity", 0.0) >= MIN_SENSITIVITY and result.get("torch_fp32_err", 1.0) <= MAX_TORCH_ERR
    return {"model": name, **result, "ok": "yes" if passed else "no", "s": time.perf_counter() - start}


def candidates() -> list[str]:
    """torchvision's classifiers up to MAX_PARAMS parameters, smallest first."""
    from .pruning_coverage import classifier_params

    counts = classifier_params()
    return sorted((name for name, n in counts.items() if n <= MAX_PARAMS), key=counts.get)


def run(models: Sequence[str] | None = None, batches: Sequence[int] | None = None, *, quick: bool = False,
        out: str | Path | None = None, threads: int | None = None) -> dict[str, Any]:
    threads = threads or h.CPU_COUNT
    h.set_thread_counts(threads)
    names = list(models) if models else QUICK if quick else candidates()
    rows = []
    for name in names:
        rows.append(row(name))
        print(f"{name}: {json.dumps(rows[-1], default=str)}", flush=True)
    return h.write_sweep("build-coverage", rows, lambda rows: _report(rows, threads), rerun=bool(models),
                         quick=quick, out=out)


def _report(rows: list[dict[str, Any]], threads: int) -> str:
    ok = sum(1 for r in rows if r["ok"] == "yes")
    lines = [*h.sweep_header(f"build-coverage (torchvision classifiers, random weights, 1×3×224×224; {threads} thread(s))"),
             f"{ok}/{len(rows)} models build and match torch within {h.ERR_TOL:g} (relative to max |torch|), "
             "dense and pruned (`channel-pruning:ratio=0.5`, no rounding; compared with the pruned torch model). "
             "Weights: He-normal in every conv and linear layer, BatchNorm statistics measured on random images "
             "(`conditioned`: torchvision's own init makes googlenet's logits its classifier's bias whatever the "
             "body computes). *input sensitivity*: max |torch(x) − torch(x')| / max |torch(x)| for two random "
             f"images; a row needs ≥ {MIN_SENSITIVITY:g}. *torch fp32 vs fp64*: the model's own conditioning "
             f"(torch's fp32 output against its fp64 one); a row needs ≤ {MAX_TORCH_ERR:g}.", ""]
    return "\n".join(lines) + h.markdown_table(rows, COLUMNS)


if __name__ == "__main__" and sys.argv[1:2] == ["--one"]:
    print(json.dumps(one(sys.argv[2]), default=str))
