"""The prepared GPU check: CUDA modules are built here (no GPU needed), then loaded on a GPU machine
with TVM's runtime alone, compared against PyTorch's CPU reference, and timed side by side with
PyTorch eager on the same GPU.

    python -m benchmarks.gpu_check prepare DIR      # here: build + export + references
    python -m benchmarks.gpu_check run DIR OUT      # on the GPU machine: check + time
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

BATCHES = (1, 32)
ATOL = 1e-4


def _lut_net():
    import torch
    from torch import nn

    from compiler.ops import LutLinear

    class LutMLP(nn.Module):
        """An MLP whose layers are 4-bit and 2-bit codebook linears (squeezer::lut_linear)."""

        def __init__(self) -> None:
            super().__init__()
            torch.manual_seed(0)
            self.a = LutLinear.from_linear(nn.Linear(512, 1024), 4)
            self.b = LutLinear.from_linear(nn.Linear(1024, 10), 2)

        def forward(self, x):
            return self.b(torch.relu(self.a(x)))

    return LutMLP().eval(), (512,)


def _deep_compressed():
    """LeNet-5 pruned 90 % and clustered to 4 bits (squeezer::sparse_conv2d / sparse_linear with
    codebooks): the CUDA CSR kernels (one thread per output) and im2col."""
    import torch

    import compiler
    from compiler import zoo
    from passes import Sparsify, WeightClustering

    entry = zoo.get("lenet5")
    g = compiler.trace(entry.build(), entry.example_inputs())
    g = WeightClustering(bits=4)(Sparsify(sparsity=0.9, scope="global")(g))
    return g.module.eval(), entry.input_shape


def _models():
    from compiler import zoo

    out = {name: (entry.build(), entry.input_shape) for name, entry in zoo.ZOO.items()}
    out["lut-mlp"] = _lut_net()
    out["lenet5-deep-compressed"] = _deep_compressed()
    return out


def prepare(directory: Path) -> None:
    import torch
    from safetensors.torch import save_file

    import codegen
    import compiler

    directory.mkdir(parents=True, exist_ok=True)
    for name, (model, shape) in _models().items():
        save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(directory / f"{name}.safetensors"))
        for batch in BATCHES:
            x = torch.randn(batch, *shape, generator=torch.Generator().manual_seed(batch))
            art = directory / f"{name}-b{batch}"
            t = time.perf_counter()
            codegen.build(compiler.trace(model, (x,)), "cuda").export(art)
            np.save(art / "x.npy", x.numpy())
            with torch.no_grad():
                np.save(art / "ref.npy", model(x).numpy())
            print(f"{name} b{batch}: built for cuda in {time.perf_counter() - t:.1f} s", flush=True)


def _torch_gpu_ms(model, x) -> float:
    import torch

    model, x = model.cuda().eval(), x.cuda()
    with torch.no_grad():
        for _ in range(10):
            model(x)
        torch.cuda.synchronize()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        times = []
        for _ in range(5):
            start.record()
            for _ in range(50):
                model(x)
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end) / 50)
    return float(np.median(times))


def run(directory: Path, out: Path) -> int:
    import torch
    from safetensors.torch import load_file

    import codegen

    rows, failures = [], 0
    models = _models()
    for name, (model, _) in models.items():
        model.load_state_dict(load_file(str(directory / f"{name}.safetensors")))
        for batch in BATCHES:
            art = directory / f"{name}-b{batch}"
            row = {"model": name, "batch": batch}
            try:
                t = time.perf_counter()
                m = codegen.load(art)
                row["load_s"] = time.perf_counter() - t
                x = np.load(art / "x.npy")
                got = m(x)
                row["max_abs_err"] = float(np.abs(got - np.load(art / "ref.npy")).max())
                tvm_ms = m.benchmark(x, number=50, repeat=5)["median_ms"]
                eager_ms = _torch_gpu_ms(model, torch.from_numpy(x))
                tvm_ms2 = m.benchmark(x, number=50, repeat=5)["median_ms"]  # interleaved: before and after
                row.update(tvm_ms=min(tvm_ms, tvm_ms2), eager_ms=eager_ms)
                row["speedup_vs_eager"] = eager_ms / row["tvm_ms"]
                row["ok"] = row["max_abs_err"] <= ATOL
            except Exception as exc:  # noqa: BLE001 - report every model, then fail at the end
                row.update(ok=False, error=f"{type(exc).__name__}: {str(exc)[:300]}")
            failures += not row["ok"]
            rows.append(row)
            print(json.dumps(row), flush=True)
    info = {"gpu": torch.cuda.get_device_name(0), "torch": torch.__version__, "rows": rows}
    out.mkdir(parents=True, exist_ok=True)
    (out / "gpu_check.json").write_text(json.dumps(info, indent=2))
    lines = [f"## gpu-check on {info['gpu']} (torch {info['torch']} eager vs Squeezer/TVM CUDA, same run)", "",
             "| model | batch | speedup vs eager | max abs err | eager ms | tvm ms |", "|---|---:|---:|---:|---:|---:|"]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['model']} | {r['batch']} | FAILED: {r['error'][:80]} | | | |")
        else:
            lines.append(f"| {r['model']} | {r['batch']} | {r['speedup_vs_eager']:.2f} | {r['max_abs_err']:.1e} | "
                         f"{r['eager_ms']:.3f} | {r['tvm_ms']:.3f} |")
    (out / "gpu_check.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 1 if failures else 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.gpu_check")
    sub = p.add_subparsers(dest="cmd", required=True)
    sub.add_parser("prepare").add_argument("dir", type=Path)
    r = sub.add_parser("run")
    r.add_argument("dir", type=Path)
    r.add_argument("out", type=Path)
    args = p.parse_args(argv)
    if args.cmd == "prepare":
        prepare(args.dir)
        return 0
    return run(args.dir, args.out)


if __name__ == "__main__":
    sys.exit(main())
