"""Suite "trace-coverage": does ``compiler.trace`` capture the vision models of timm, the most used
model library after torchvision (torchvision's 78 classifiers are traced by "pruning-coverage")?

One model per timm architecture module (the smallest by name, its parameters counted on the meta
device; random weights, nothing downloaded), at its default input size: traced with the example
input, then the graph's output compared with the eager model's on the same input (≤ 1e-4 × max
|ref|). A row records success, the error where tracing refuses (the line it names), and the time."""

from __future__ import annotations

import time
import warnings
from pathlib import Path
from typing import Any, Sequence

import torch

from . import harness as h

COLUMNS = [("model", "model", "s"), ("module", "timm module", "s"), ("params_m", "params (M)", ".1f"),
           ("traced", "traced", "s"), ("matches", "matches eager", "s"), ("s", "s", ".1f"), ("error", "error", "s")]
MAX_PARAMS = 100e6


def _timm():
    from squeezer.torchvision_compat import import_torchvision

    import_torchvision()   # timm imports torchvision
    import timm

    return timm


def _params(timm, name: str) -> int | None:
    try:
        with torch.device("meta"), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return sum(p.numel() for p in timm.create_model(name, pretrained=False).parameters())
    except Exception:  # noqa: BLE001 - a model that cannot be built on meta is skipped from the choice
        return None


_SMALL = ("atto", "femto", "pico", "nano", "xxtiny", "xxs", "tiny", "xs", "small", "_s", "mini", "lite", "050", "100")


def candidates() -> list[tuple[str, str, int]]:
    """(model, module, params): the smallest model of every timm architecture module, among the
    four whose names say they are small (building every model on meta to count would take long)."""
    timm = _timm()
    modules: dict[str, list[str]] = {}
    for name in timm.list_models():
        modules.setdefault(timm.models._registry._model_to_module.get(name, "?"), []).append(name)

    def smallness(name: str) -> int:
        return next((i for i, word in enumerate(_SMALL) if word in name), len(_SMALL))

    chosen = []
    for module, names in sorted(modules.items()):
        sized = [(p, n) for n in sorted(names, key=smallness)[:4] if (p := _params(timm, n)) is not None]
        if sized and min(sized)[0] <= MAX_PARAMS:
            params, name = min(sized)
            chosen.append((name, module, params))
    return chosen


def row(name: str, module: str = "?", params: int = 0) -> dict[str, Any]:
    import compiler

    timm = _timm()
    out: dict[str, Any] = {"model": name, "module": module, "params_m": params / 1e6}
    start = time.perf_counter()
    try:
        torch.manual_seed(0)
        model = timm.create_model(name, pretrained=False).eval()
        x = torch.randn(1, *model.pretrained_cfg.get("input_size", (3, 224, 224)))
        graph = compiler.trace(model, (x,))
        out["traced"] = "yes"
        with torch.no_grad():
            err = h.max_abs_err(model(x), graph.module(x))
            scale = float(model(x).abs().max()) or 1.0
        out["matches"] = "yes" if err <= 1e-4 * scale else f"no ({err:.1e})"
    except Exception as exc:  # noqa: BLE001 - a failure is a row of the table
        out.setdefault("traced", "no")
        out["error"] = f"{type(exc).__name__}: {str(exc).splitlines()[0][:160] if str(exc) else ''}"
    out["s"] = time.perf_counter() - start
    return out


def run(models: Sequence[str] | None = None, batches: Sequence[int] | None = None, *, quick: bool = False,
        out: str | Path | None = None, threads: int | None = None) -> dict[str, Any]:
    threads = threads or h.CPU_COUNT
    h.set_thread_counts(threads)
    chosen = [(m, "?", 0) for m in models] if models else candidates()[:8] if quick else candidates()
    rows = []
    for name, module, params in chosen:
        rows.append(row(name, module, params))
        print(f"{name}: {rows[-1].get('traced')} {rows[-1].get('matches', '')} {rows[-1].get('error', '')}", flush=True)
    traced = sum(1 for r in rows if r.get("traced") == "yes")
    matched = sum(1 for r in rows if r.get("matches") == "yes")
    markdown = "\n".join([f"## trace-coverage (timm, one model per architecture module; {threads} thread(s))", "",
                          f"{h.machine_info().get('date', '')}", "",
                          f"{traced}/{len(rows)} trace; {matched}/{len(rows)} match eager (≤ 1e-4 × max |ref|).", ""])
    markdown += h.markdown_table(rows, COLUMNS)
    result = {"suite": "trace-coverage", "machine": h.machine_info(), "rows": rows, "markdown": markdown}
    h.write_results("trace_coverage_quick" if quick else "trace_coverage", result, markdown,
                    out or Path(__file__).parent / "results")
    return result
