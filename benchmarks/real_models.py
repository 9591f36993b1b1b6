"""Suite "real-models": torchvision classifiers (random weights, nothing downloaded), compiled by
Squeezer for the CPU, against torch eager, ``torch.compile`` (inductor, default mode), ONNX
Runtime (CPU EP, all graph optimizations) and OpenVINO (CPU plugin, latency hint, fp32), dense
and channel-pruned to half the MACs, every backend on the same threads and timed side by side
in interleaved rounds.

It answers the question a user with a real architecture asks: is the compiled model faster
than the runtime I already have, and does pruning half the MACs remove half the latency?"""

from __future__ import annotations

import math
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, Sequence

import torch

from . import harness as h
from .contention import ContentionGuard

NAME = "real-models"
FILE_STEM = "real_models"

MODELS = ("resnet18", "resnet50", "mobilenet_v2", "mobilenet_v3_small", "mobilenet_v3_large", "efficientnet_b0",
          "efficientnet_b3", "regnet_x_400mf", "regnet_y_800mf", "shufflenet_v2_x1_0", "squeezenet1_1",
          "densenet121", "convnext_tiny", "swin_t", "vit_b_16", "maxvit_t")
QUICK_MODELS = ("squeezenet1_1", "mobilenet_v3_small")
IMAGE = 224
PEERS = ("eager", "compile", "ort", "openvino")

COLUMNS: list[tuple[str, str, str]] = [
    ("model", "model", "s"),
    ("batch", "batch", "d"),
    ("variant", "variant", "s"),
    ("vs_ort", "squeezer vs ort", ".2f"),
    ("vs_openvino", "vs openvino", ".2f"),
    ("vs_compile", "vs torch.compile", ".2f"),
    ("vs_eager", "vs eager", ".2f"),
    ("vs_dense_ort", "vs dense ort", ".2f"),
    ("realized_cut", "realized cut", ".2f"),
    ("squeezer_ms", "squeezer ms", ".2f"),
    ("ort_ms", "ort ms", ".2f"),
    ("openvino_ms", "openvino ms", ".2f"),
    ("compile_ms", "compile ms", ".2f"),
    ("eager_ms", "eager ms", ".2f"),
    ("gmacs", "GMAC/s", ".0f"),
    ("rel_err_str", "rel err", "s"),
    ("build_s", "build s", ".1f"),
]


def _log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def _note(row: dict, who: str, exc: BaseException) -> None:
    row["notes"].append(f"{who}: {h.exception_line(exc)}"[:300])


def _fail(row: dict, who: str, exc: BaseException) -> dict:
    """A note that also fails the run (``python -m benchmarks`` exits 1 on a row with an error)."""
    _note(row, who, exc)
    row["error"] = row["notes"][-1]
    return row


def _error_row(name: str, batch: int, variant: str, who: str, exc: BaseException) -> dict:
    return _fail({"model": name, "batch": batch, "variant": variant, "notes": [], "flagged": False}, who, exc)


def _lanes() -> int:
    import codegen
    from codegen.schedules.cpu import vector_lanes

    return vector_lanes(codegen.resolve_target("llvm"))


def _openvino_runner(model: torch.nn.Module | Path, x: torch.Tensor, threads: int) -> Callable[[], Any]:
    """OpenVINO on the torch model, or on an ONNX file (``model`` a path)."""
    import openvino as ov

    converted = ov.convert_model(str(model)) if isinstance(model, Path) else ov.convert_model(model, example_input=(x,))
    compiled = ov.Core().compile_model(converted, "CPU", {
        "PERFORMANCE_HINT": "LATENCY", "INFERENCE_NUM_THREADS": threads,
        "INFERENCE_PRECISION_HINT": "f32"})   # its default on AMX/bf16 CPUs is bf16: not the same numbers
    request, feed = compiled.create_infer_request(), x.numpy()
    return lambda: request.infer([feed])[0]


def _first_openvino_runner(sources: list, x: torch.Tensor, threads: int, row: dict) -> Callable[[], Any] | None:
    """OpenVINO from the first source it converts: the torch model, else the ONNX export (its
    TorchScript tracing fails on vit_b_16). The row's notes say which, and why the others failed."""
    failures = []
    for source in sources:
        if isinstance(source, Path) and not source.exists():
            continue
        try:
            runner = _openvino_runner(source, x, threads)
        except Exception as exc:  # noqa: BLE001 - the next source, or n/a with the reasons
            failures.append(exc)
            continue
        if failures:
            row["notes"].append(f"openvino: converted from the ONNX export ({type(failures[0]).__name__} from "
                                "its torch frontend)")
        return runner
    for exc in failures:
        _note(row, "openvino", exc)
    return None


def _inference(model: Callable, x: torch.Tensor) -> Callable[[], Any]:
    def call():
        with torch.no_grad():
            return model(x)

    return call


def _peer_runners(model: torch.nn.Module, x: torch.Tensor, ref: torch.Tensor, row: dict, threads: int,
                  tmp: Path, tag: str) -> dict[str, Callable[[], Any]]:
    """Zero-argument callables per peer; a peer that fails is a note, never a stopped suite."""
    runners: dict[str, Callable[[], Any]] = {"eager": _inference(model, x)}
    try:
        compiled = _inference(torch.compile(model), x)
        compiled()   # compiles here, outside the timing
        runners["compile"] = compiled
    except Exception as exc:  # noqa: BLE001 - recorded as n/a with the reason
        _note(row, "torch.compile", exc)
    path = tmp / f"{tag}.onnx"
    try:
        h.export_onnx(model, (x,), path)
        runners["ort"] = h.ort_runner(h.ort_session(path, threads), (x,))
    except Exception as exc:  # noqa: BLE001
        _note(row, "ort", exc)
    openvino = _first_openvino_runner([model, path], x, threads, row)
    if openvino is not None:
        runners["openvino"] = openvino
    for name in list(runners):
        try:
            row[f"{name}_rel_err"] = h.rel_err(ref, runners[name]())
        except Exception as exc:  # noqa: BLE001
            _note(row, name, exc)
            del runners[name]
    return runners


Timers = dict[str, Callable[[], float]]


def _variant_row(name: str, batch: int, variant: str, graph, ref: torch.Tensor, x: torch.Tensor, *,
                 quick: bool, threads: int, tmp: Path) -> tuple[dict[str, Any], Timers, Callable[[], float] | None]:
    """Build ``graph`` and its peers; the row, its timers (timed later, interleaved with the other
    variant) and Squeezer's own timer without the settling pause (None when the build failed)."""
    import codegen
    import compiler

    row: dict[str, Any] = {"model": name, "batch": batch, "variant": variant, "notes": [], "flagged": False,
                           "macs": compiler.summarize(graph).total_macs}
    for key in ("squeezer_ms", *(f"{p}_ms" for p in PEERS), "rel_err", "build_s"):
        row[key] = None
    try:
        start = time.perf_counter()
        cm = codegen.build(graph, "llvm")
        row["build_s"] = time.perf_counter() - start
        row["rel_err"] = h.rel_err(ref, cm(x))
        row["flagged"] = row["rel_err"] > h.ERR_TOL
    except Exception as exc:  # noqa: BLE001 - a failing model must not stop the suite
        cm = None
        _fail(row, "squeezer", exc)
    runners = _peer_runners(graph.module, x, ref, row, threads, tmp, f"{name}_{batch}_{variant}")
    repeats, min_s = (3, 0.03) if quick else (5, 0.1)
    timers: Timers = {}
    own = None if cm is None else _own_timer(cm, x, repeats, min_s)
    if own is not None:
        timers["squeezer_ms"] = _settled(own)
    for peer, fn in runners.items():
        timers[f"{peer}_ms"] = _settled(lambda fn=fn: h.time_loop(fn, warmup=2, repeats=repeats,
                                                                  min_repeat_s=min_s / repeats))
    return row, timers, own


def _own_timer(cm, x: torch.Tensor, repeats: int, min_s: float) -> Callable[[], float]:
    """Median ms of ``repeats`` runs of TVM's time evaluator, each at least ``min_s / repeats`` long."""
    return lambda: cm.benchmark(x, number=1, repeat=repeats, min_repeat_ms=int(min_s * 1000 / repeats))["median_ms"]


PAIRED = "pair/pruned_over_dense"


def paired_ratio(dense: Callable[[], float], pruned: Callable[[], float]) -> float:
    """Pruned over dense latency from one dense-pruned-dense sample: the two timed back to back, so
    contention that lasts a sample's length slows both sides alike. Timed minutes apart as rows of
    their own, a burst on one side moved efficientnet_b3's realized cut from 0.91 to 0.40."""
    first = dense()
    middle = pruned()
    return middle / ((first + dense()) / 2)


SETTLE_S = 0.2   # every runtime's pool spins its threads for a while after a call; let them sleep


def _settled(timer: Callable[[], float]) -> Callable[[], float]:
    """``timer`` after a pause: the five runtimes share this process, and one's threads still
    spinning after its last call would take the cores from the next one's first calls."""
    def run() -> float:
        time.sleep(SETTLE_S)
        return timer()

    return run


def without_zero_layers(model: torch.nn.Module) -> torch.nn.Module:
    """Layers whose weight torchvision initializes to zero (vit_b_16's head) get small random
    weights: an all-zero output would make the numerics check against torch compare zeros."""
    for layer in model.modules():
        weight = getattr(layer, "weight", None)
        if isinstance(layer, torch.nn.Linear | torch.nn.Conv2d) and weight is not None and not weight.detach().any():
            with torch.no_grad():
                weight.normal_(0.0, 0.02)
    return model


def _bench_model(name: str, batch: int, *, quick: bool, threads: int, lanes: int, tmp: Path,
                 guard: ContentionGuard) -> list[dict[str, Any]]:
    import compiler
    from passes import ChannelPruning
    from squeezer.torchvision_compat import import_torchvision

    torch.manual_seed(0)
    model = without_zero_layers(getattr(import_torchvision().models, name)(weights=None).eval())
    x = torch.randn(batch, 3, IMAGE, IMAGE)
    with torch.no_grad():
        ref = model(x)
    dense = compiler.trace(model, (x,))
    rows, timers = [], {}
    r, t, dense_own = _variant_row(name, batch, "dense", dense, ref, x, quick=quick, threads=threads, tmp=tmp)
    rows.append(r)
    timers.update({f"dense/{k}": v for k, v in t.items()})
    try:   # widths rounded to whole vectors, as a deployment for this CPU would ask for
        pruned = ChannelPruning(target_macs=0.5, round_to=lanes)(dense)
        with torch.no_grad():
            pruned_ref = pruned.module(x)
        r, t, pruned_own = _variant_row(name, batch, "pruned", pruned, pruned_ref, x, quick=quick, threads=threads,
                                        tmp=tmp)
        timers.update({f"pruned/{k}": v for k, v in t.items()})
        if dense_own is not None and pruned_own is not None:
            timers[PAIRED] = _settled(lambda: paired_ratio(dense_own, pruned_own))
    except Exception as exc:  # noqa: BLE001
        r = _error_row(name, batch, "pruned", "channel-pruning", exc)
    rows.append(r)
    medians, samples = h.interleaved(guard.wrap(timers), 2 if quick else 5)
    for row in rows:
        prefix = f"{row['variant']}/"
        row.update({k[len(prefix):]: v for k, v in medians.items() if k.startswith(prefix)})
        row["samples_ms"] = {k[len(prefix):]: v for k, v in samples.items() if k.startswith(prefix)}
    if PAIRED in medians:
        rows[1]["paired_ratio"], rows[1]["paired_ratios"] = medians[PAIRED], samples[PAIRED]
    _ratios(rows)
    return rows


def _ratios(rows: list[dict[str, Any]]) -> None:
    dense = rows[0]
    for row in rows:
        ms = row.get("squeezer_ms")
        for peer in PEERS:
            row[f"vs_{peer}"] = h.ratio(row.get(f"{peer}_ms"), ms)
        row["vs_dense_ort"] = h.ratio(dense.get("ort_ms"), ms)
        row["gmacs"] = row["macs"] / (ms * 1e6) if ms and row.get("macs") else None   # macs: the whole batch
        row["realized_cut"] = None
        if row is not dense and ms and dense.get("squeezer_ms") and row.get("macs") and dense.get("macs"):
            mac_cut = 1 - row["macs"] / dense["macs"]
            row["mac_cut"] = mac_cut
            of_medians = ms / dense["squeezer_ms"]
            # the paired samples' ratio where there is one; the ratio of the two rows' medians is kept beside it
            for key, latency_ratio in (("realized_cut_of_medians", of_medians),
                                       ("realized_cut", row.get("paired_ratio", of_medians))):
                row[key] = (1 - latency_ratio) / mac_cut if mac_cut > 0 else None
        err = row.get("rel_err")
        row["rel_err_str"] = None if err is None else f"{err:.1e}" + (" (>1e-4!)" if row["flagged"] else "")


def _geomean(values: list[float | None]) -> float | None:
    got = [v for v in values if v]
    return math.exp(sum(math.log(v) for v in got) / len(got)) if got else None


def summary(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Geometric means per (batch, variant) of every ratio column, over the models that have it."""
    out = []
    for batch in sorted({r["batch"] for r in rows}):
        for variant in ("dense", "pruned"):
            group = [r for r in rows if r["batch"] == batch and r["variant"] == variant]
            if group:
                out.append({"model": f"geomean of {len(group)}; cut: worst", "batch": batch, "variant": variant,
                            **{k: _geomean([r.get(k) for r in group])
                               for k in ("vs_ort", "vs_openvino", "vs_compile", "vs_eager", "vs_dense_ort")},
                            "realized_cut": min((r["realized_cut"] for r in group if r.get("realized_cut") is not None),
                                                default=None)})
    return out


def run(models: Sequence[str] | None = None, batches: Sequence[int] | None = None, *, quick: bool = False,
        out: str | Path | None = None, threads: int | None = None) -> dict[str, Any]:
    """Run the suite, write ``<out>/real_models.{json,md}`` and return the result dict (with "markdown")."""
    models = list(models or (QUICK_MODELS if quick else MODELS))
    unknown = [m for m in models if m not in MODELS]
    if unknown:
        raise KeyError(f"unknown model(s) {unknown}; choose from {list(MODELS)}")
    batches = list(batches or ([1] if quick else [1, 16]))
    from codegen.threads import available_cores

    threads = threads or available_cores()
    h.set_thread_counts(threads)
    machine_before = h.machine_info()
    warning = h.busy_warning(threads)
    if warning:
        _log(warning)
    lanes = _lanes()
    guard = ContentionGuard.for_threads(threads, SETTLE_S)   # samples overlapping a neighbour's burst are retaken
    rows: list[dict[str, Any]] = []
    result: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix="squeezer-real-") as tmp:
        for name in models:
            for batch in batches:
                _log(f"[{NAME}] {name} batch={batch} ...")
                try:
                    done = _bench_model(name, batch, quick=quick, threads=threads, lanes=lanes, tmp=Path(tmp),
                                        guard=guard)
                except Exception as exc:  # noqa: BLE001 - trace or timing failed: an error row, the suite goes on
                    done = [_error_row(name, batch, "dense", "suite", exc)]
                rows.extend(done)
                for row in done:
                    for note in row["notes"]:
                        _log(f"    {row['variant']}: {note}")
                result = _report(rows, quick=quick, threads=threads, lanes=lanes, models=models, batches=batches,
                                 machine_before=machine_before, out=out, guard=guard.stats())   # after every model: nothing lost
    return result


def _report(rows: list[dict[str, Any]], *, quick: bool, threads: int, lanes: int, models: list[str],
            batches: list[int], machine_before: dict, out: str | Path | None, guard: dict) -> dict[str, Any]:
    means = summary(rows)
    machine = {**h.machine_info(), "load_avg_1min_at_start": machine_before["load_avg_1min"], "contention": guard}
    notes = [f"- {r['model']} b{r['batch']} {r['variant']}: {n}" for r in rows for n in r["notes"]]
    md = "\n".join([
        f"## {NAME}{' (quick)' if quick else ''}",
        "",
        f"{machine['date']} · LLVM {machine['llvm_cpu']} · {machine['cpu_count']} CPUs, {threads} thread(s) per backend · "
        f"load avg {machine_before['load_avg_1min']:.2f} → {machine['load_avg_1min']:.2f} · torch {machine['torch']} · "
        f"tvm {machine['tvm']} · onnxruntime {machine['onnxruntime']}",
        "",
        f"torchvision models, random weights, {IMAGE}×{IMAGE}. *pruned*: `channel-pruning:target_macs=0.5,round_to={lanes}` "
        "(its peers run the same pruned torch model). Ratios: peer ms / Squeezer ms (>1: Squeezer is faster), "
        "measured side by side in one run; *vs dense ort*: the dense model on ORT / this row on Squeezer; "
        "*realized cut*: latency cut / MAC cut against the dense Squeezer row, the latency cut from the median of "
        "paired samples (the dense and the pruned model on Squeezer timed back to back, dense-pruned-dense, in one "
        "sample; the JSON keeps the cut from the two rows' medians too). "
        "rel err: max |Squeezer − torch| / max |torch|. "
        "A geometric mean covers the models that have that column; its realized cut is the worst model's. "
        "Squeezer is timed by TVM's time evaluator (C++, inputs resident), the peers by a Python loop around "
        "their run call: at small batch-1 latencies that overhead (a few µs) favours Squeezer. "
        f"Every sample of every backend passed the contention guard (`benchmarks/contention.py`): "
        f"{guard['retaken']} of {guard['samples']} were retaken because an FMA probe beside them ran below "
        f"{guard['slow_below']:.0%} of its best ({guard['probe_best']:.0f} GMAC/s), {guard['kept_slow']} kept after "
        "every try was slow.",
        "",
        h.markdown_table(rows + means, COLUMNS),
        *(["", "Notes:", *notes] if notes else []),
    ])
    result = {"suite": NAME, "quick": quick, "machine": machine,
              "options": {"models": models, "batches": batches, "threads": threads, "err_tol": h.ERR_TOL,
                          "image": IMAGE, "round_to": lanes},
              "columns": [c[0] for c in COLUMNS], "rows": rows, "geomeans": means}
    out_dir = Path(out) if out else Path(__file__).parent / "results"
    jpath, mpath = h.write_results(FILE_STEM + ("_quick" if quick else ""), result, md, out_dir)
    _log(f"wrote {jpath} and {mpath}")
    return {**result, "markdown": md, "paths": [str(jpath), str(mpath)]}

