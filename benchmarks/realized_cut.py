"""Suite "realized-cut": why a pruned model's latency falls less than its MACs, kernel by kernel.

The real-models suite measures the realized cut end to end (latency cut / MAC cut). This suite
says where the shortfall comes from. The dense and the pruned model (``channel-pruning:
target_macs=0.5,round_to=<lanes>``, as real-models prunes) are scheduled as ``codegen.build``
would, their calls lined up (by position when both make as many, else in order by kernel kind),
and every kernel timed alone, hot, dense and pruned in interleaved rounds. With t_d, t_p a call's
times, r its own MAC ratio and R the whole model's, a matched call's *deficit* t_p - R·t_d splits
exactly into

* **efficiency**, t_p - r·t_d: the kernel got slower per MAC at its pruned width (a width
  that falls off a vector, a schedule that stops fitting), the kernels' fault;
* **allocation**, (r - R)·t_d: the pass pruned this layer less than the model as a whole, so
  its time was never meant to fall by R (a 16-channel group at ``round_to=16`` is not pruned at
  all). Expensive layers the pass spares lower the realized cut with perfect kernels;

and a call only one of the builds makes is all **structure** (vit_b_16 pruned runs three
attention projections where the dense model runs one fused QKV matmul and three slices).

The kernel-level realized cut is 1 - Σdeficit / (Σt_d·(1 - R)); each part's share of the
shortfall is reported. Time outside the kernels (the VM, data arriving cold from the previous
kernel) is not covered: real-models' paired cut includes it."""

from __future__ import annotations

import difflib
import re
import sys
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from . import harness as h
from .kernel_profile import _random_args, compiled_kernel, reduction_work, scheduled_kernels

NAME = "realized-cut"
FILE_STEM = "realized_cut"
MODELS = ("efficientnet_b0", "mobilenet_v2", "resnet18", "vit_b_16")
QUICK_MODELS = ("squeezenet1_1",)
TOP = 8  # calls listed per model, largest deficit first
NUMBER = 10  # runs per timed sample: one run of a small kernel is mostly timer overhead

SUMMARY_COLUMNS = [("model", "model", "s"), ("calls", "calls", "d"), ("dense_ms", "dense ms (kernels)", ".3f"),
                   ("pruned_ms", "pruned ms (kernels)", ".3f"), ("mac_ratio", "MAC ratio", ".3f"),
                   ("realized_cut", "kernel-level realized cut", ".3f"),
                   ("lost_efficiency", "cut lost to kernel efficiency", ".3f"),
                   ("lost_allocation", "cut lost to allocation", ".3f"),
                   ("lost_structure", "cut lost to calls one build lacks", ".3f")]
CALL_COLUMNS = [("model", "model", "s"), ("position", "call", "d"), ("kernel", "pruned kernel", "s"),
                ("dense_ms", "dense ms", ".3f"), ("pruned_ms", "pruned ms", ".3f"), ("mac_ratio", "its MAC ratio", ".2f"),
                ("deficit_ms", "deficit ms", ".3f"), ("efficiency_ms", "efficiency ms", ".3f"),
                ("allocation_ms", "allocation ms", ".3f"), ("structure_ms", "structure ms", ".3f")]


def kernel_kind(name: str) -> str:
    """A kernel's name without TVM's numbering and our prepacking mark (a width can change whether a
    weight is repacked): what lines a dense call up with its pruned twin."""
    return re.sub(r"\d+", "", name).removesuffix("_prepacked")


def line_up(dense: Sequence[str], pruned: Sequence[str]) -> list[tuple[int | None, int | None]]:
    """Pairs of call positions (dense, pruned), in order; None where only one build makes the call
    (a pruned attention split into three projections where the dense one runs one, a slice that
    became a no-op). Equally many calls pair by position: the same graph at other widths."""
    if len(dense) == len(pruned):
        return list(zip(range(len(dense)), range(len(pruned))))
    pairs: list[tuple[int | None, int | None]] = []
    matcher = difflib.SequenceMatcher(None, [kernel_kind(n) for n in dense], [kernel_kind(n) for n in pruned],
                                      autojunk=False)
    for op, i0, i1, j0, j1 in matcher.get_opcodes():
        if op == "equal" or (op == "replace" and i1 - i0 == j1 - j0):
            pairs += zip(range(i0, i1), range(j0, j1))
        else:
            pairs += [(i, None) for i in range(i0, i1)] + [(None, j) for j in range(j0, j1)]
    return pairs


def decompose(dense: Sequence[tuple[str, float, float]], pruned: Sequence[tuple[str, float, float]]) -> dict[str, Any]:
    """Split the pruned model's shortfall from its MAC ratio over its calls.

    ``dense`` and ``pruned`` hold (kernel, ms, MACs) per call, in call order. A call without MACs
    (a transpose, an elementwise kernel) takes its own time ratio as r: it counts as allocation. A
    call only one build makes is its own part, *structure* (its whole deficit: t_p, or -R·t_d)."""
    t_d = sum(t for _, t, _ in dense)
    t_p = sum(t for _, t, _ in pruned)
    ratio = sum(m for _, _, m in pruned) / sum(m for _, _, m in dense)
    if ratio >= 1.0:
        raise ValueError(f"the pruned model has {ratio:.3f}x the dense model's MACs: there is no MAC cut to realize")
    calls = []
    for i, j in line_up([n for n, _, _ in dense], [n for n, _, _ in pruned]):
        if j is None:
            (name, td, md), (tp, mp), label = dense[i], (0.0, 0.0), " (dense only)"
        elif i is None:
            (name, tp, mp), (td, md), label = pruned[j], (0.0, 0.0), " (pruned only)"
        else:
            (_, td, md), (name, tp, mp), label = dense[i], pruned[j], ""
        row = {"position": j if i is None else i, "kernel": name + label, "dense_ms": td, "pruned_ms": tp,
               "deficit_ms": tp - ratio * td}
        if label:
            row.update(mac_ratio=None, efficiency_ms=0.0, allocation_ms=0.0, structure_ms=row["deficit_ms"])
        else:
            r = mp / md if md else (tp / td if td else 1.0)
            row.update(mac_ratio=r, efficiency_ms=tp - r * td, allocation_ms=(r - ratio) * td, structure_ms=0.0)
        calls.append(row)
    scale = t_d * (1.0 - ratio)   # the time the MAC cut promises to remove
    lost = {part: sum(c[f"{part}_ms"] for c in calls) / scale for part in ("efficiency", "allocation", "structure")}
    return {"dense_ms": t_d, "pruned_ms": t_p, "mac_ratio": ratio, "realized_cut": (t_d - t_p) / scale,
            **{f"lost_{part}": v for part, v in lost.items()}, "calls": calls}


def kernel_calls_timed(graphs: Sequence[Any], *, rounds: int, target: Any = "llvm") -> list[list[tuple[str, float, float]]]:
    """(kernel, ms, MACs) per call of each graph, every kernel timed alone on random inputs, the
    graphs' kernels in interleaved rounds (a burst of contention lands on all of them alike)."""
    import tvm
    from tvm import tirx

    from codegen.relax_pipeline import kernel_call_sequence

    dev = tvm.cpu()
    built = []
    for graph in graphs:
        mod, options = scheduled_kernels(graph, target)
        sequence = kernel_call_sequence(mod)
        kernels = {}
        for gvar, func in mod.functions.items():
            if isinstance(func, tirx.PrimFunc) and gvar.name_hint in sequence:
                args = _random_args(func, dev)
                timer = None if args is None else compiled_kernel(func, options.target).mod.time_evaluator(
                    "main", dev, number=NUMBER, repeat=1, min_repeat_ms=0)
                kernels[gvar.name_hint] = {"timer": timer, "args": args, "macs": reduction_work(func), "ms": []}
        built.append((sequence, kernels))
    for _ in range(rounds):
        for _, kernels in built:
            for k in kernels.values():
                if k["timer"] is not None:
                    k["ms"].append(k["timer"](*k["args"]).mean * 1e3)
    return [[(name, float(np.median(kernels[name]["ms"])) if kernels[name]["ms"] else 0.0, kernels[name]["macs"])
             for name in sequence] for sequence, kernels in built]


def profile_model(name: str, *, rounds: int, lanes: int) -> tuple[dict, list[dict]]:
    """The summary row and the largest-deficit calls of one torchvision model at batch 1."""
    import torch

    import compiler
    from passes import ChannelPruning
    from squeezer.torchvision_compat import import_torchvision

    torch.manual_seed(0)
    model = getattr(import_torchvision().models, name)(weights=None).eval()
    dense = compiler.trace(model, (torch.randn(1, 3, 224, 224),))
    pruned = ChannelPruning(target_macs=0.5, round_to=lanes)(dense)
    dense_calls, pruned_calls = kernel_calls_timed([dense, pruned], rounds=rounds)
    parts = decompose(dense_calls, pruned_calls)
    calls = sorted(parts.pop("calls"), key=lambda c: -c["deficit_ms"])[:TOP]
    for c in calls:
        c["model"] = name
    return {"model": name, "calls": len(dense_calls), **parts}, calls


def run(models: Sequence[str] | None = None, batches: Sequence[int] | None = None, *, quick: bool = False,
        out: str | Path | None = None, threads: int | None = None, **_: Any) -> dict:
    """Decompose each model's kernel-level realized cut (batch 1; ``batches`` is ignored)."""
    from .real_models import _lanes

    h.set_thread_counts(threads or h.CPU_COUNT)
    lanes = _lanes()
    summary, calls = [], []
    for name in models or (QUICK_MODELS if quick else MODELS):
        row, top = profile_model(name, rounds=3 if quick else 9, lanes=lanes)
        summary.append(row)
        calls += top
        print(f"{name}: kernel-level realized cut {row['realized_cut']:.3f}", file=sys.stderr, flush=True)
    info = h.machine_info()
    md = (f"## realized cut, kernel by kernel\n\n{info.get('llvm_cpu', '?')} · {h.CPU_COUNT} CPUs · batch 1 · "
          f"`channel-pruning:target_macs=0.5,round_to={lanes}`\n\n"
          "Every kernel of the dense and the pruned model timed alone (hot, interleaved rounds) and lined up call "
          "by call (in order by kernel kind where the two make different numbers of calls). *efficiency*: the pruned kernel is slower than its own MAC ratio predicts (the kernels' "
          "fault); *allocation*: the pass pruned this layer less than the model as a whole (R), so its time was "
          "never meant to fall by R; *structure*: calls only one build makes. The 'cut lost' columns add up to "
          "1 − the kernel-level realized cut.\n\n"
          + h.markdown_table(summary, SUMMARY_COLUMNS) + "\n\nThe calls with the largest deficit (t_p − R·t_d):\n\n"
          + h.markdown_table(calls, CALL_COLUMNS))
    result = {"suite": NAME, "machine": info, "rows": summary, "calls": calls, "markdown": md}
    h.write_results(FILE_STEM + ("_quick" if quick else ""), result, md, out or Path(__file__).parent / "results")
    return result
