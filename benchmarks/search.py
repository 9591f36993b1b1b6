"""Suite "search": hardware-aware per-layer pruning on the demo model vs a uniform ratio.

The demo's trained LeNet-5 is searched (``squeezer.search.search_pruning``) for per-layer
channel-pruning ratios that make the compiled model (TVM, this CPU) ``--speedup`` times faster
(default 1.6; both latencies measured), ranked by accuracy on 500 validation images of the demo
dataset (no fine-tuning, so the comparison isolates the choice of ratios). The uniform ratio whose
compiled latency matches the chosen model's is measured alongside. Writes the recipe and the
sensitivity / latency-accuracy plots next to the results.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

from . import harness as h

COLUMNS = [("model", "model", "s"), ("latency_ms", "compiled ms", ".4f"), ("speedup", "speedup vs unpruned", ".2f"),
           ("accuracy", "accuracy (no fine-tune)", ".2%"), ("ratios", "per-layer ratios", "s")]


def run(models: Sequence[str] | None = None, batches: Sequence[int] | None = None, *, quick: bool = False,
        out: str | Path | None = None, threads: int | None = None, speedup: float = 1.6) -> dict[str, Any]:
    import codegen  # noqa: F401 - registers the latency provider
    import compiler
    from squeezer.data import mnist_subset
    from squeezer.demo import baseline_model
    from compiler.finetune import batches_of, evaluate
    from squeezer.search import search_pruning

    threads = threads or h.CPU_COUNT
    h.set_thread_counts(threads)
    model = baseline_model(progress=False, log=lambda *_: None)
    _, (xte, yte) = mnist_subset()
    graph = compiler.trace(model, (xte[:1],))
    val_x, val_y = xte[:500], yte[:500]
    result = search_pruning(graph, lambda m: evaluate(m, batches_of(val_x, val_y, 250)), speedup=speedup,
                            step=0.25 if quick else 0.125, rounds=3 if quick else 5)
    base = result.baseline.latency_ms
    rows = []
    for label, cand in (("unpruned", result.baseline), ("searched", result.chosen), ("uniform ratio", result.uniform)):
        if cand is None:
            continue
        ratios = ", ".join(f"{k}={v:g}" for k, v in sorted(cand.ratios.items())) or "-"
        rows.append({"model": label, "latency_ms": cand.latency_ms, "speedup": base / cand.latency_ms,
                     "accuracy": cand.accuracy, "ratios": ratios})
    out_dir = Path(out or Path(__file__).parent / "results")
    out_dir.mkdir(parents=True, exist_ok=True)
    name = "search_quick" if quick else "search"
    recipe = result.save_recipe(out_dir / f"{name}_recipe.txt")
    plots = result.plot(out_dir / f"{name}_plots")
    header = [f"## search (demo LeNet-5, target {speedup:g}x faster compiled; TVM llvm, {threads} thread(s))", "",
              f"{h.machine_info().get('date', '')}", "",
              f"recipe: `{result.recipe[0]}` ({recipe.name}); plots: {', '.join(p.name for p in plots)}; "
              f"{len(result.explored)} candidates compiled and measured.", ""]
    markdown = "\n".join(header) + h.markdown_table(rows, COLUMNS)
    data = {"suite": "search", "machine": h.machine_info(), "rows": rows, "recipe": result.recipe,
            "sensitivity": result.sensitivity, "markdown": markdown}
    h.write_results(name, data, markdown, out_dir)
    return data
