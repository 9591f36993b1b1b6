"""The int8 suite's 4-bit section: grouped 4-bit weights (``Quantize(w_bits=4, group_size=128)``,
compiler/ops/int4.py) on the 4096² Linear — the shape of an LLM projection, where weight bytes set
the batch-1 time — against Squeezer int8 and fp32 and ONNX Runtime's own 4-bit layer
(``MatMulNBits``: symmetric 4-bit blocks of 128, ``accuracy_level=4`` = int8 activations, the
same arithmetic), and what grouping buys in accuracy on the demo data."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

from . import harness as h

GROUP = 128
SHAPE = 4096
SPEED_COLUMNS = [("case", "case", "s"), ("batch", "batch", "d"), ("vs_int8", "int4 vs squeezer int8", ".2f"),
                 ("vs_fp32", "int4 vs squeezer fp32", ".2f"), ("vs_ort_int4", "vs ort int4", ".2f"),
                 ("int4_ms", "squeezer int4 ms", ".3f"), ("int8_ms", "squeezer int8 ms", ".3f"),
                 ("fp32_ms", "squeezer fp32 ms", ".3f"), ("ort_int4_ms", "ort int4 ms", ".3f"),
                 ("int4_mb", "int4 weights MB", ".2f"), ("int8_mb", "int8 weights MB", ".2f"),
                 ("err_vs_fake", "rel err vs fake-quant", ".1e"), ("note", "notes", "s")]


def _ort_int4(model: nn.Module, x: torch.Tensor, threads: int, path: Path) -> Callable[[], Any]:
    """ORT's MatMulNBits on the same Linear (exported with a leading axis so it is a MatMul)."""
    import onnx
    from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

    x3 = x.unsqueeze(0)
    h.export_onnx(model, (x3,), path)
    quantizer = MatMulNBitsQuantizer(onnx.load(str(path)), bits=4, block_size=GROUP, is_symmetric=True,
                                     accuracy_level=4)
    quantizer.process()
    out = path.with_suffix(".int4.onnx")
    quantizer.model.save_model_to_file(str(out), use_external_data_format=False)
    return h.ort_runner(h.ort_session(out, threads), (x3,))


def _weight_mb(graph) -> float:
    from compiler.ops import CompressedLayer
    return sum(m.stored_bytes() for m in graph.module.modules() if isinstance(m, CompressedLayer)) / 2 ** 20


def speed_rows(batches, *, quick: bool, threads: int, tmp: Path) -> list[dict]:
    import codegen
    import compiler
    from passes import Quantize

    rows = []
    for batch in batches:
        torch.manual_seed(0)
        model, x = nn.Sequential(nn.Linear(SHAPE, SHAPE)).eval(), torch.randn(batch, SHAPE)
        row: dict[str, Any] = {"case": f"linear_{SHAPE}x{SHAPE}", "batch": batch, "ort_int4_ms": None, "notes": []}
        calibration = tuple(torch.randn(batch, SHAPE) for _ in range(4))
        graph = compiler.trace(model, (x,))
        fake4 = Quantize(stage="calibrate", w_bits=4, group_size=GROUP, calibration=calibration)(graph)
        int4, int8 = Quantize(stage="deploy")(fake4), Quantize(calibration=calibration)(graph)
        row["int4_mb"], row["int8_mb"] = _weight_mb(int4), _weight_mb(int8)
        built = {name: codegen.build(g, "llvm") for name, g in (("int4", int4), ("int8", int8), ("fp32", graph))}
        with torch.no_grad():
            row["err_vs_fake"] = h.max_abs_err(fake4.module(x), built["int4"](x)) / float(fake4.module(x).abs().max())
        repeats, min_ms = (3, 30) if quick else (5, 100)
        timers = {f"{name}_ms": (lambda m=m: m.benchmark(x, number=1, repeat=repeats,
                                                         min_repeat_ms=min_ms // repeats)["median_ms"])
                  for name, m in built.items()}
        try:
            ort = _ort_int4(model, x, threads, tmp / f"int4_{batch}.onnx")
            timers["ort_int4_ms"] = lambda: h.time_loop(ort, warmup=2, repeats=repeats,
                                                        min_repeat_s=min_ms / 1000 / repeats)
        except Exception as exc:  # noqa: BLE001 - a peer that fails is a note, not a stopped suite
            row["notes"].append(f"ort int4: {type(exc).__name__}: {str(exc).splitlines()[0][:160] if str(exc) else ''}")
        medians, _ = h.interleaved(timers, 2 if quick else 5)
        row.update(medians)
        for key, peer in (("vs_int8", "int8_ms"), ("vs_fp32", "fp32_ms"), ("vs_ort_int4", "ort_int4_ms")):
            row[key] = h.ratio(row.get(peer), row.get("int4_ms"))
        row["note"] = "; ".join(row["notes"])
        rows.append(row)
    return rows


def accuracy_rows(graph, calibration, test, base: float, name: str) -> list[dict]:
    """w4a8 and w3a8 with a scale per group of 32 input channels (the per-channel rows are the suite's)."""
    from compiler.finetune import evaluate
    from passes import Quantize

    rows = []
    for w_bits in (4, 3):
        q = Quantize(w_bits=w_bits, group_size=32, calibration=calibration)(graph)
        acc = 100 * evaluate(q.module, test)
        rows.append({"model": name, "variant": f"w{w_bits}a8 PTQ (minmax, groups of 32)", "accuracy": acc,
                     "drop": base - acc})
    return rows
