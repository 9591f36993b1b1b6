"""Suite "survey-methods": the survey's remaining methods (issue 23) on the demo's task, one row each.

Every method starts from the demo's trained fp32 LeNet-5 (or, for training methods, from its
recipe), trains a few epochs on the demo's embedded MNIST subset (nothing downloaded), and is
compared with the fp32 model: test accuracy, parameters and stored bytes, and compiled speed —
both models built with TVM for this CPU and timed side by side (interleaved rounds), the ratio
fp32 ms / method ms being the headline.

To add a method, add a :class:`~.survey_common.Method` to :data:`METHODS` (or to the tuple
``METHODS`` of a family module listed in :data:`FAMILIES`): a name, its paper, and a function from
the :class:`~.survey_common.Context` to the compressed ``compiler.Graph`` (plus a note for the table).
"""

from __future__ import annotations

import time
from dataclasses import replace
from pathlib import Path
from typing import Any


from . import harness as h
from . import survey_binary, survey_sharing
from .survey_common import Context, Method

COLUMNS = [("method", "method", ""), ("paper", "paper", ""), ("accuracy", "accuracy", ".2%"),
           ("fp32_accuracy", "fp32 accuracy", ".2%"), ("params", "params", ",d"), ("fp32_params", "fp32 params", ",d"),
           ("stored_bytes", "stored bytes", ",d"), ("fp32_stored_bytes", "fp32 stored bytes", ",d"),
           ("speedup", "compiled speed vs fp32", ".2f"), ("ms", "ms", ".4f"), ("fp32_ms", "fp32 ms", ".4f"),
           ("train_s", "train s", ".1f"), ("max_abs_err", "max abs err (tvm vs torch)", ".1e"), ("note", "note", "")]


def _ssl(ctx: Context) -> tuple[Any, str]:
    from passes import StructuredSparsity

    p = StructuredSparsity(epochs=2 if ctx.quick else 5, train_data=ctx.train)
    r = p.apply(ctx.fp32)
    return r.graph, (f"{p.spec()}; groups zeroed {r.report.stats['groups_zeroed']}; "
                     f"removal change {r.report.stats['removal_max_abs_change']:.1e}")


def _sfp(ctx: Context) -> tuple[Any, str]:
    from passes import SoftFilterPruning

    p = SoftFilterPruning(rate=0.3, epochs=2 if ctx.quick else 5, train_data=ctx.train)
    r = p.apply(ctx.fp32)
    s = r.report.stats
    return r.graph, (f"{p.spec()}; {s['zeroings']} zeroings, {s['zeroed_then_kept']} zeroed filters came back; "
                     f"removal change {s['removal_max_abs_change']:.1e}")


def _terngrad(ctx: Context) -> tuple[Any, str]:
    """The demo's baseline recipe (LeNet-5 from its seed, 8 epochs) trained on ternary gradients."""
    import compiler
    from compiler.finetune import TrainConfig, batches_of, train
    from squeezer import zoo
    from squeezer.demo import BASELINE

    model = zoo.get("lenet5").build(seed=BASELINE["seed"])
    x, y = ctx.train
    epochs = 2 if ctx.quick else BASELINE["epochs"]
    train(model, batches_of(x, y, BASELINE["batch"], shuffle=True, seed=BASELINE["seed"]),
          TrainConfig(epochs=epochs, lr=BASELINE["lr"], seed=BASELINE["seed"], progress=False,
                      grad_compression="terngrad"))
    note = (f"trained from scratch like the fp32 model ({epochs} epochs) on TernGrad's ternary gradients "
            "(1 worker here; 2-rank gloo DDP hook in tests); gradient traffic 1 byte (int8 code) instead of 4 "
            "per weight, 2 bits packed")
    return compiler.trace(model.eval(), (ctx.test[0][:1],)), note


FAMILIES = (survey_binary, survey_sharing)   # binary / low-bit and weight-sharing / sparsity methods
METHODS: dict[str, Method] = {m.name: m for m in (
    Method("ssl", "Wen et al., Learning Structured Sparsity in Deep Neural Networks, NIPS 2016", _ssl),
    Method("soft-filter-pruning", "He et al., Soft Filter Pruning for Accelerating Deep CNNs, IJCAI 2018", _sfp),
    Method("terngrad", "Wen et al., TernGrad: Ternary Gradients to Reduce Communication in Distributed DL, "
                       "NIPS 2017", _terngrad),
    *(m for family in FAMILIES for m in family.METHODS),
)}


def _row(ctx: Context, method: Method, fp32_compiled, quick: bool) -> dict[str, Any]:
    import codegen
    import compiler
    from compiler.finetune import batches_of, evaluate

    t = time.perf_counter()
    graph, note, *own = method.make(ctx)   # a method on another model returns its fp32 graph too
    train_s = time.perf_counter() - t
    fp32 = own[0] if own else ctx.fp32
    fp32_compiled = codegen.build(fp32) if own else fp32_compiled
    test = batches_of(*ctx.test, int(fp32.example_inputs[0].shape[0]) if own else 250)   # an RNN's graph: its shape
    x = ctx.test[0][:1]
    compiled = codegen.build(graph)
    err = h.max_abs_err(graph.module.eval()(x), compiled(x))
    n, r = (20, 3) if quick else (100, 5)
    med, _ = h.interleaved({"fp32_ms": lambda: fp32_compiled.benchmark(x, number=n, repeat=r)["median_ms"],
                            "ms": lambda: compiled.benchmark(x, number=n, repeat=r)["median_ms"]},
                           rounds=3 if quick else 7)
    size, base = compiler.summarize(graph), compiler.summarize(fp32)
    return {"method": method.name, "paper": method.paper, "accuracy": evaluate(graph.module, test),
            "fp32_accuracy": evaluate(fp32.module, test), "params": size.total_params,
            "fp32_params": base.total_params, "stored_bytes": size.total_bytes, "fp32_stored_bytes": base.total_bytes,
            "speedup": med["fp32_ms"] / med["ms"], **med, "train_s": train_s, "max_abs_err": err,
            "flagged": err > h.ERR_TOL, "note": note, "passes": list(graph.history)}


def run(models=None, batches=None, *, quick: bool = False, out: str | Path | None = None,
        threads: int | None = None) -> dict[str, Any]:
    """``models``: method names (default: all of :data:`METHODS`)."""
    import codegen
    import compiler
    from squeezer.data import mnist_subset
    from squeezer.demo import baseline_model

    threads = threads or h.CPU_COUNT
    h.set_thread_counts(threads)
    unknown = sorted(set(models or ()) - set(METHODS))
    if unknown:
        raise KeyError(f"unknown method(s) {unknown}; choose from {sorted(METHODS)}")
    train_data, test_data = mnist_subset()
    model = baseline_model(progress=False, log=lambda *_: None)
    ctx = Context(compiler.trace(model, (test_data[0][:1],)), train_data, test_data, quick)
    fp32_compiled = codegen.build(ctx.fp32)
    rows = [_row(replace(ctx), METHODS[name], fp32_compiled, quick) for name in (models or METHODS)]
    out_dir = Path(out or Path(__file__).parent / "results")
    name = "survey_methods_quick" if quick else "survey_methods"
    rows = _merged(out_dir / f"{name}.json", rows) if models else rows
    header = [f"## survey methods on the demo task (LeNet-5, embedded MNIST subset; TVM llvm, {threads} thread(s))", "",
              f"{h.machine_info().get('date', '')}", "",
              "accuracy on the 1,000 test images; speed = compiled fp32 ms / compiled method ms, batch 1, timed side "
              "by side (interleaved) in one run per row (a rerun of some methods replaces their rows only).", ""]
    markdown = "\n".join(header) + h.markdown_table(rows, COLUMNS)
    result = {"suite": "survey-methods", "machine": h.machine_info(), "rows": rows, "markdown": markdown}
    h.write_results(name, result, markdown, out_dir)
    return result


def _merged(path: Path, rows: list[dict]) -> list[dict]:
    """A run of some methods updates their rows in the recorded table and keeps the others (in
    :data:`METHODS` order; a row's own date is in the JSON)."""
    import json

    date = h.machine_info().get("date", "")
    fresh = {r["method"]: {**r, "date": date} for r in rows}
    old = {r["method"]: r for r in json.loads(path.read_text())["rows"]} if path.exists() else {}
    merged = {**old, **fresh}
    return [merged[m] for m in METHODS if m in merged]
