"""Suite "kernel-profile": where a compiled model's time goes, kernel by kernel, against this
CPU's measured fp32 FMA roofline.

TVM 0.27's Relax VM has no profiler, so every scheduled PrimFunc of the model (what
``codegen.build`` would compile) is compiled on its own and timed on random inputs of its
buffer shapes, then multiplied by the number of times ``main`` calls it. Each kernel's work is
counted from its TIR: the iteration-domain size of every reducing block (multiply-accumulates
for matmul and conv, adds for pooling and norms). The roofline is a register-only FMA loop on
all threads (fma_roofline.py), so "% peak" is what a kernel leaves on the table, the number
that tells which schedule to fix first."""

from __future__ import annotations

import math
import sys
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from . import harness as h
from .fma_roofline import fma_roofline_gmacs

NAME = "kernel-profile"
FILE_STEM = "kernel_profile"
MODELS = ("resnet18", "mobilenet_v2", "squeezenet1_1", "convnext_tiny", "vit_b_16")
QUICK_MODELS = ("squeezenet1_1",)
TOP = 12  # kernels listed per model; the rest are summed in one row

COLUMNS = [("model", "model", "s"), ("batch", "batch", "d"), ("kernel", "kernel", "s"), ("calls", "calls", "d"),
           ("ms", "ms (all calls)", ".3f"), ("share", "% of model", ".1f"), ("mmacs", "M MAC", ".1f"),
           ("gmacs", "GMAC/s", ".1f"), ("peak", "% of FMA peak", ".0f")]


def reduction_work(func) -> int:
    """Iterations of the func's reducing blocks (MACs for matmul/conv): the product of each
    block's iteration domain, for blocks with a reduction axis."""
    import tvm_ffi
    from tvm import s_tir

    total = 0

    def visit(block) -> None:
        nonlocal total
        if not any(int(iv.iter_type) == 2 for iv in block.iter_vars):  # no init after decompose_reduction
            return
        extents = [iv.dom.extent for iv in block.iter_vars]
        if all(hasattr(e, "value") for e in extents):
            total += math.prod(int(e.value) for e in extents)

    tvm_ffi.structural_walk(func.body, [(s_tir.SBlock, visit)])
    return total


def _random_args(func, dev) -> list | None:
    import tvm

    rng = np.random.default_rng(0)
    args = []
    for param in func.params:
        buf = getattr(param, "ty", None)  # TVM 0.27: a buffer parameter's type carries shape and dtype
        if not hasattr(buf, "shape") or not all(hasattr(d, "value") for d in buf.shape):
            return None  # a scalar or dynamic-shape parameter: not timed alone
        shape = [int(d.value) for d in buf.shape]
        dtype = str(buf.dtype)
        data = rng.standard_normal(shape).astype(dtype) if "float" in dtype else np.zeros(shape, dtype)
        args.append(tvm.runtime.tensor(data, dev))
    return args


def time_kernel(func, target, *, min_repeat_ms: int = 50) -> float | None:
    """Median seconds per call of one PrimFunc on random inputs (None: not timeable alone)."""
    import tvm

    dev = tvm.cpu()
    args = _random_args(func, dev)
    if args is None:
        return None
    timer = compiled_kernel(func, target).mod.time_evaluator("main", dev, number=1, repeat=5, min_repeat_ms=min_repeat_ms)
    return float(np.median(timer(*args).results))


def scheduled_kernels(graph, target: Any = "llvm") -> tuple[Any, Any]:
    """``graph``'s Relax module with every kernel scheduled as ``codegen.build`` would, and the
    build options (their target compiles the kernels alone)."""
    from codegen.frontend import import_graph, lift_runtime_weights
    from codegen.lowering.context import RuntimeWeights
    from codegen.options import BuildOptions
    from codegen.relax_pipeline import scheduled_module

    options = BuildOptions.create(target)
    store = RuntimeWeights()
    mod, _, _ = import_graph(graph, options, store)
    mod, _, _ = lift_runtime_weights(mod, store)
    return scheduled_module(mod, options), options


def compiled_kernel(func, target) -> Any:
    """One PrimFunc compiled alone, as ``codegen.build`` compiles it."""
    import tvm

    from codegen import stack_buffers

    return tvm.compile(tvm.IRModule({"main": func.with_attr("global_symbol", "main")}), target=target,
                       tir_pipeline=stack_buffers.register())


def profile_graph(graph, target: Any = "llvm") -> list[dict]:
    """One row per kernel of ``graph`` as ``codegen.build`` schedules it, slowest first."""
    from codegen.relax_pipeline import kernel_calls
    from tvm import tirx

    mod, options = scheduled_kernels(graph, target)
    counts = kernel_calls(mod)
    rows = []
    for gvar, func in mod.functions.items():
        if not isinstance(func, tirx.PrimFunc) or gvar.name_hint not in counts:
            continue
        seconds = time_kernel(func, options.target)
        n = counts[gvar.name_hint]
        rows.append({"kernel": gvar.name_hint, "calls": n, "ms": None if seconds is None else seconds * n * 1e3,
                     "mmacs": reduction_work(func) * n / 1e6})
    return sorted(rows, key=lambda r: -(r["ms"] or 0.0))


def _summarise(model: str, batch: int, rows: list[dict], peak: float) -> list[dict]:
    total = sum(r["ms"] or 0.0 for r in rows)
    for r in rows:
        r.update(model=model, batch=batch)
        _summarise_one(r, total, peak)
    head, tail = rows[:TOP], rows[TOP:]
    if tail:
        rest = {"model": model, "batch": batch, "kernel": f"({len(tail)} others)", "calls": sum(r["calls"] for r in tail),
                "ms": sum(r["ms"] or 0.0 for r in tail), "mmacs": sum(r["mmacs"] for r in tail)}
        head.append(_summarise_one(rest, total, peak))
    whole = {"model": model, "batch": batch, "kernel": "**all kernels**", "calls": sum(r["calls"] for r in rows),
             "ms": total, "mmacs": sum(r["mmacs"] for r in rows)}
    head.append(_summarise_one(whole, total, peak))
    return head


def _summarise_one(r: dict, total: float, peak: float) -> dict:
    r["share"] = 100.0 * (r["ms"] or 0.0) / total if total else None
    r["gmacs"] = r["mmacs"] / r["ms"] if r["ms"] and r["mmacs"] else None
    r["peak"] = 100.0 * r["gmacs"] / peak if r["gmacs"] else None
    return r


def run(models: Sequence[str] | None = None, batches: Sequence[int] | None = None, *, quick: bool = False,
        out: str | Path | None = None, threads: int | None = None, **_: Any) -> dict:
    """Profile each model's kernels (torchvision, random weights, 224x224) against the roofline."""
    import torch

    import compiler
    from squeezer.torchvision_compat import import_torchvision

    h.set_thread_counts(threads or h.CPU_COUNT)
    tv = import_torchvision()
    names = list(models or (QUICK_MODELS if quick else MODELS))
    peak = fma_roofline_gmacs()
    print(f"fp32 FMA roofline: {peak:.1f} GMAC/s", file=sys.stderr, flush=True)
    rows: list[dict] = []
    for name in names:
        for batch in batches or [1]:
            model = getattr(tv.models, name)(weights=None).eval()
            graph = compiler.trace(model, (torch.randn(batch, 3, 224, 224),))
            rows += _summarise(name, batch, profile_graph(graph), peak)
            print(f"{name} batch {batch}: profiled", file=sys.stderr, flush=True)
    info = h.machine_info()
    md = (f"## kernel profile\n\n{info.get('llvm_cpu', '?')} · {h.CPU_COUNT} CPUs · fp32 FMA roofline "
          f"**{peak:.1f} GMAC/s** (register-only FMA loop, all threads)\n\n"
          "Each scheduled PrimFunc compiled alone and timed on random inputs, times its calls from `main`. "
          "M MAC: iterations of its reducing blocks (adds for pooling/norms).\n\n" + h.markdown_table(rows, COLUMNS))
    result = {"suite": NAME, "machine": info, "roofline_gmacs": peak, "rows": rows, "markdown": md}
    h.write_results(FILE_STEM + ("_quick" if quick else ""), result, md, out or Path(__file__).parent / "results")
    return result
