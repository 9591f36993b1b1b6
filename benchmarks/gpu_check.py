"""The prepared GPU check: CUDA modules are built here (no GPU needed), then loaded on a GPU machine
with TVM's runtime alone, compared against PyTorch's CPU reference, and timed side by side with
PyTorch eager on the same GPU.

    python -m benchmarks.gpu_check prepare DIR      # here: build + export + references + fatbins
    python -m benchmarks.gpu_check run DIR OUT      # on the GPU machine: check + time

``prepare`` also exports the kernel rows of benchmarks/gpu_kernels.py (issue 22: our CUDA kernels
at 4096² and 8192² against cuBLAS, cuSPARSE and torch.compile) and compiles every CUDA source to
a fatbin with nvcc here (``DIR/fatbins``), so the GPU machine loads without compiling.
    python -m benchmarks.gpu_check tune OUT         # on the GPU machine, full TVM: CUDA tuning
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

BATCHES = (1, 32)
KERNEL_BATCHES = {"binary-linear-4096": (1, 64), "int8-linear-4096": (1, 8), "int4g128-linear-4096": (1, 8)}
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
    from squeezer import zoo
    from passes import Sparsify, WeightClustering

    entry = zoo.get("lenet5")
    g = compiler.trace(entry.build(), entry.example_inputs())
    g = WeightClustering(bits=4)(Sparsify(sparsity=0.9, scope="global")(g))
    return g.module.eval(), entry.input_shape


def _xnor_lenet():
    """The demo's LeNet-5 binarized as XNOR-Net (first/last layer fp32): the bit-plane kernels."""
    import compiler
    from squeezer import zoo
    from passes import Binarize

    entry = zoo.get("lenet5")
    g = compiler.trace(entry.build(), entry.example_inputs())
    return Binarize(method="xnor")(g).module.eval(), entry.input_shape


def _kernels():
    """The issues' kernel shapes, each against torch fp32 dense of the same shape on the GPU
    (issue 6: binary 4096² linear and 3×3 256→256 conv at 14×14; issue 5: 90 % sparse 4096²)."""
    import torch
    from torch import nn

    from compiler.ops.bitserial import BitConv2d, BitLinear
    from compiler.ops.sparse import SparseLinear

    gen = torch.Generator().manual_seed(0)
    w = torch.randn(4096, 4096, generator=gen)
    dense = nn.Linear(4096, 4096, bias=False)
    dense.weight.data = w.clone()
    binary = BitLinear((w >= 0)[None], [2.0], -1.0, w.abs().mean(1), torch.zeros(4096), "sign", xnor_scale=True)
    wc = torch.randn(256, 256, 3, 3, generator=gen)
    conv = nn.Conv2d(256, 256, 3, padding=1, bias=False)
    conv.weight.data = wc.clone()
    bconv = BitConv2d((wc >= 0)[None], [2.0], -1.0, wc.abs().mean((1, 2, 3)), torch.zeros(256), (1, 1), (1, 1),
                      (1, 1), "sign", xnor_scale=True)
    keep = w.abs() >= w.abs().flatten().kthvalue(int(0.9 * w.numel())).values
    sparse = SparseLinear.from_dense(w, None, keep)
    return {**_integer_kernels(w, dense),
        "binary-linear-4096": (nn.Sequential(binary).eval(), (4096,), dense.eval()),
        "binary-conv3x3-256": (nn.Sequential(bconv).eval(), (256, 14, 14), conv.eval()),
        "sparse90-linear-4096": (nn.Sequential(sparse).eval(), (4096,), dense.eval()),
    }


def _integer_kernels(w, dense) -> dict:
    """The dp4a GEMV (issue 20): int8 per channel and 4-bit in groups of 128 of the same weight."""
    import torch
    from torch import nn

    from compiler.ops import Int4Linear, IntLinear

    per_row = w.abs().amax(1) / 127
    int8 = IntLinear(torch.round(w / per_row[:, None]).to(torch.int8), per_row, None, x_scale=0.03, x_zero=128)
    groups = w.abs().reshape(4096, 32, 128).amax(2) / 7
    codes = torch.round(w / groups.repeat_interleave(128, 1)).clamp(-7, 7).to(torch.int8)
    int4 = Int4Linear(codes, groups, None, x_scale=0.03, x_zero=128, group_size=128)
    return {"int8-linear-4096": (nn.Sequential(int8).eval(), (4096,), dense.eval()),
            "int4g128-linear-4096": (nn.Sequential(int4).eval(), (4096,), dense.eval())}


def _models():
    """name -> (model, input shape, batches, torch fp32 baseline timed on the GPU). The baseline of a
    zoo model is the model itself; of a compressed one, the fp32 architecture it came from."""
    from torch import nn

    from squeezer import zoo

    out = {name: (entry.build(), entry.input_shape, BATCHES, entry.build()) for name, entry in zoo.ZOO.items()}
    fp32_lenet = out["lenet5"][0]
    out["lut-mlp"] = (*_lut_net(), BATCHES, nn.Sequential(nn.Linear(512, 1024), nn.ReLU(), nn.Linear(1024, 10)))
    out["lenet5-deep-compressed"] = (*_deep_compressed(), BATCHES, fp32_lenet)
    out["lenet5-xnor"] = (*_xnor_lenet(), BATCHES, fp32_lenet)
    for name, (model, shape, baseline) in _kernels().items():
        out[name] = (model, shape, KERNEL_BATCHES.get(name, (1,)), baseline)
    return out


def _layer_spec(module) -> dict | None:
    """A single dense Linear/Conv2d baseline travels as its shape (a 4096² fp32 weight is 64 MB, and
    random weights time the same), a model as its pickled weights."""
    from torch import nn

    if isinstance(module, nn.Linear):
        return {"kind": "Linear", "args": [module.in_features, module.out_features], "bias": module.bias is not None}
    if isinstance(module, nn.Conv2d):
        return {"kind": "Conv2d", "args": [module.in_channels, module.out_channels, module.kernel_size],
                "stride": module.stride, "padding": module.padding, "bias": module.bias is not None}
    return None


def _baseline(directory: Path, name: str, case: dict):
    import torch
    from torch import nn

    spec = case.get("baseline_layer")
    if spec is None:
        return torch.load(directory / f"{name}.baseline.pt", weights_only=False)
    kw = {k: v for k, v in spec.items() if k not in ("kind", "args")}
    return getattr(nn, spec["kind"])(*spec["args"], **kw)


def _fatbins(directory: Path, sources: list[str], arch: str = "sm_90") -> None:
    """Each CUDA source compiled here for the GPU machine's architecture (H200: sm_90)."""
    from codegen.artifact import compile_fatbin, fatbin_name

    out = directory / "fatbins"
    out.mkdir(parents=True, exist_ok=True)
    for code in sources:
        path = out / fatbin_name(code, arch)
        if not path.exists():
            t = time.perf_counter()
            path.write_bytes(compile_fatbin(code, arch))
            print(f"fatbin {path.name[:20]}…: nvcc {time.perf_counter() - t:.1f} s", flush=True)


def prepare(directory: Path, only: list[str] | None = None, kernels: bool = True, models: bool = True,
            kinds=None) -> None:
    """Build every case for CUDA, export it with its input and CPU reference, and pickle its torch
    fp32 baseline (plain modules) for the GPU machine to time; export the kernel rows (of ``kinds``,
    default all); compile every CUDA source to a fatbin here. ``models=False``: the kernel rows
    alone (a small bundle, no cases.json). Kernels not yet run on a GPU are built in too
    (codegen/kernels/gpu_verified.py), so that this check is what verifies them."""
    import os
    import shutil

    import torch

    import codegen
    import compiler
    from codegen.kernels import gpu_verified

    from . import gpu_kernels

    os.environ.setdefault(gpu_verified.ENV, "1")
    directory.mkdir(parents=True, exist_ok=True)
    sources = [c["source"] for c in gpu_kernels.prepare(directory, kinds or gpu_kernels.KINDS)] if kernels else []
    cases = {}
    for name, (model, shape, batches, baseline) in (_models() if models else {}).items():
        if only and name not in only:
            continue
        spec = _layer_spec(baseline)
        if spec is None:   # a whole model: its (small) weights travel
            torch.save(baseline.eval(), directory / f"{name}.baseline.pt")
        for batch in batches:
            x = torch.randn(batch, *shape, generator=torch.Generator().manual_seed(batch))
            art = directory / f"{name}-b{batch}"
            t = time.perf_counter()
            built = codegen.build(compiler.trace(model, (x,)), "cuda")
            built.export(art)
            sources.append(built.kernel_source())
            np.save(art / "x.npy", x.numpy())
            with torch.no_grad():
                np.save(art / "ref.npy", model(x).numpy())
            print(f"{name} b{batch}: built for cuda in {time.perf_counter() - t:.1f} s", flush=True)
        cases[name] = {"batches": list(batches), "baseline": "fp32 " + (spec["kind"] if spec else "model"),
                       "baseline_layer": spec}
    if models:
        (directory / "cases.json").write_text(json.dumps(cases, indent=1))
    if shutil.which("nvcc"):
        _fatbins(directory, sources)


CHECK_COLUMNS = [("model", "model", "s"), ("batch", "batch", "d"), ("baseline", "baseline", "s"),
                 ("speedup_vs_eager", "speedup", ".2f"), ("speedup_vs_compile", "vs torch.compile", ".2f"),
                 ("max_abs_err", "max abs err", ".1e"), ("eager_ms", "torch ms", ".3f"),
                 ("compile_ms", "compile ms", ".3f"), ("tvm_ms", "tvm ms", ".3f")]
TUNE_COLUMNS = [("model", "model", "s"), ("batch", "batch", "d"), ("speedup", "tuned vs untuned", ".2f"),
                ("untuned_ms", "untuned ms", ".4f"), ("tuned_ms", "tuned ms", ".4f"),
                ("eager_ms", "torch eager ms", ".4f"), ("trials", "trials", "d"), ("s_per_trial", "s / trial", ".2f"),
                ("max_abs_err", "max abs err", ".1e")]


def _table(rows: list[dict], columns) -> str:
    """The markdown table; a failed row shows its error in the first measured column."""
    from .harness import markdown_table

    first = next(key for key, _, spec in columns if spec not in ("s", "d"))
    return markdown_table([{**r, first: f"FAILED: {r['error'][:100]}"} if "error" in r else r for r in rows], columns)


def _torch_compiled_ms(model, x) -> float:
    """torch.compile in CUDA-graphs mode ("reduce-overhead") on the same GPU."""
    import torch

    from .gpu_kernels import cuda_ms

    model, x = model.cuda().eval(), x.cuda()
    compiled = torch.compile(model, mode="reduce-overhead", dynamic=False)
    with torch.no_grad():
        return cuda_ms(lambda: compiled(x), iters=50)


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


def run(directory: Path, out: Path, only: list[str] | None = None, compile_budget: float = 150.0,
        kernels_only: bool = False, kinds=None) -> int:
    """Check and time the kernel rows (of ``kinds``), then the models (``only``, in that order)
    unless ``kernels_only``: gpu_kernels.* and gpu_check.* in ``out``."""
    import os

    import torch

    import codegen

    if (directory / "fatbins").is_dir():
        os.environ["SQUEEZER_CUDA_FATBINS"] = str((directory / "fatbins").resolve())
    out.mkdir(parents=True, exist_ok=True)
    failures = 0
    if (directory / "kernels" / "kernels.json").exists():
        failures += _run_kernels(directory, out, compile_budget * (1.0 if kernels_only else 0.4), kinds)
    if kernels_only:
        print(f"{failures} failed kernel row(s)", flush=True)
        return 1 if failures else 0
    deadline = time.perf_counter() + compile_budget * 0.6
    rows = []
    cases = json.loads((directory / "cases.json").read_text())
    if only:   # in the order given (the torch.compile budget goes to the first)
        cases = {name: cases[name] for name in only if name in cases}
    for name, case in cases.items():
        timed = _baseline(directory, name, case)
        for batch in case["batches"]:
            art = directory / f"{name}-b{batch}"
            row = {"model": name, "batch": batch, "baseline": case["baseline"]}
            try:
                t = time.perf_counter()
                m = codegen.load(art)
                row["load_s"] = time.perf_counter() - t
                x = np.load(art / "x.npy")
                got, ref = m(x), np.load(art / "ref.npy")
                row["max_abs_err"] = float(np.abs(got - ref).max())
                tvm_ms = m.benchmark(x, number=50, repeat=5)["median_ms"]
                eager_ms = _torch_gpu_ms(timed, torch.from_numpy(x))
                tvm_ms2 = m.benchmark(x, number=50, repeat=5)["median_ms"]  # interleaved: before and after
                row.update(tvm_ms=min(tvm_ms, tvm_ms2), eager_ms=eager_ms)
                row["speedup_vs_eager"] = eager_ms / row["tvm_ms"]
                if time.perf_counter() < deadline:
                    try:
                        row["compile_ms"] = _torch_compiled_ms(timed, torch.from_numpy(x))
                        row["speedup_vs_compile"] = row["compile_ms"] / row["tvm_ms"]
                    except Exception as exc:  # noqa: BLE001 - the baseline, not our failure
                        row["compile_error"] = f"{type(exc).__name__}: {str(exc)[:200]}"
                row["ok"] = row["max_abs_err"] <= ATOL * max(1.0, float(np.abs(ref).max()))
            except Exception as exc:  # noqa: BLE001 - report every model, then fail at the end
                row.update(ok=False, error=f"{type(exc).__name__}: {str(exc)[:300]}")
            failures += not row["ok"]
            rows.append(row)
            print(json.dumps(row), flush=True)
    info = {"gpu": torch.cuda.get_device_name(0), "torch": torch.__version__, "rows": rows,
            "fatbin_cache": dict(_fatbin_stats())}
    (out / "gpu_check.json").write_text(json.dumps(info, indent=2))
    lines = [f"## gpu-check on {info['gpu']} (torch {info['torch']} eager vs Squeezer/TVM CUDA, same run)", "",
             "Each row is timed against a torch fp32 `baseline` in eager on the same GPU: the zoo models "
             "against themselves, compressed models against the fp32 architecture they came from, kernel rows "
             "(binary-*, sparse90-*) against the dense Linear/Conv2d of the same shape. Error: max abs vs "
             "the CPU reference of the compressed model; "
             f"a row passes at ≤ {ATOL:g} × max(1, max |ref|).", "",
             "torch.compile: mode=\"reduce-overhead\" (CUDA graphs) of the same baseline, timed while the "
             "run's compile budget lasts.", "",
             _table(rows, CHECK_COLUMNS)]
    (out / "gpu_check.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    print(f"fatbins: {info['fatbin_cache']} (hit: compiled ahead by prepare; nvcc: compiled here); "
          f"{failures} failed row(s)", flush=True)
    return 1 if failures else 0


def _fatbin_stats() -> dict:
    from codegen import artifact

    return getattr(artifact, "FATBIN_STATS", {})


def _run_kernels(directory: Path, out: Path, compile_budget: float, kinds=None) -> int:
    """The kernel rows (benchmarks/gpu_kernels.py): gpu_kernels.json / .md in ``out``."""
    import torch

    from . import gpu_kernels
    from .harness import markdown_table

    rows = gpu_kernels.run_kernels(directory, compile_budget, kinds or gpu_kernels.KINDS)
    best = gpu_kernels.best_rows(rows)
    gpu = torch.cuda.get_device_name(0)
    (out / "gpu_kernels.json").write_text(json.dumps({"gpu": gpu, "torch": torch.__version__, "rows": rows,
                                                      "best": best}, indent=2))
    lines = [f"## CUDA kernels on {gpu} (torch {torch.__version__}; same run)", "",
             "Ours: codegen/kernels/cuda_kernels.py through TVM's runtime (time evaluator, 200 calls × 7); "
             "baselines with CUDA events (200 calls × 5) on the same dense weight: cuBLAS fp32 / fp16 "
             "(`F.linear`), cuSPARSE (`torch.sparse.mm` on CSR), torch.compile (reduce-overhead) of the "
             "fp32 layer. Ratios > 1: ours faster. The fastest matching variant per row; every variant "
             "in gpu_kernels.json. Error: max abs vs torch float64 on the GPU; a row fails at > "
             f"{ATOL:g} × max(1, max |ref|).", "",
             _table(best, gpu_kernels.KERNEL_COLUMNS), "",
             "All variants:", "", markdown_table(
                 [{**r, "tvm_ms": r.get("tvm_ms", float("nan"))} for r in rows],
                 [("case", "variant", "s"), ("tvm_ms", "ours ms", ".4f"), ("max_abs_err", "max abs err", ".1e")])]
    (out / "gpu_kernels.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines), flush=True)
    return sum(not r.get("ok") for r in rows)


def tune(out: Path, budget: float) -> int:
    """On the GPU machine, with TVM's compiler: the demo model (LeNet-5 pruned to half its MACs) and
    the zoo's ``residual`` net built for CUDA with the dlight defaults, then tuned by ``codegen.tune``
    (MetaSchedule, measured on this GPU) within ``budget`` seconds each, rebuilt with the records,
    checked against torch on the CPU and timed side by side with the untuned build and torch eager."""
    import tempfile

    import torch

    import codegen
    import compiler
    from squeezer import zoo
    from squeezer.demo import DEFAULT_PASSES

    cases = [("lenet5-pruned (demo)", "lenet5", 1, DEFAULT_PASSES), ("residual", "residual", 32, ())]
    rows, failures = [], 0
    for label, zoo_name, batch, passes in cases:
        entry = zoo.get(zoo_name)
        model = entry.build()
        x = torch.randn(batch, *entry.input_shape, generator=torch.Generator().manual_seed(0))
        graph = compiler.Pipeline(list(passes))(compiler.trace(model, (x,)))
        db = Path(tempfile.mkdtemp(prefix="squeezer-cuda-tune-"))
        row = {"model": label, "batch": batch}
        try:
            result = codegen.tune(graph, "cuda", trials=100000, time_budget=budget, database=db, progress=False,
                                  trials_per_round=16)   # a GPU trial costs ~3 s (nvcc): keep rounds short
            untuned, tuned = codegen.build(graph, "cuda"), codegen.build(graph, "cuda", database=db)
            ref = graph.run_example().detach().numpy()
            row["max_abs_err"] = float(max(np.abs(untuned(x.numpy()) - ref).max(), np.abs(tuned(x.numpy()) - ref).max()))
            xn = x.numpy()
            times = {"untuned": [], "tuned": []}
            for _ in range(3):   # interleaved rounds
                for key, m in (("untuned", untuned), ("tuned", tuned)):
                    times[key].append(m.benchmark(xn, number=100, repeat=5)["median_ms"])
            row.update(untuned_ms=float(np.median(times["untuned"])), tuned_ms=float(np.median(times["tuned"])),
                       eager_ms=_torch_gpu_ms(graph.module, x), trials=result.trials_run,
                       s_per_trial=result.seconds_per_trial or 0.0, tune_s=result.seconds, tasks=len(result.tasks))
            row["speedup"] = row["untuned_ms"] / row["tuned_ms"]
            row["ok"] = row["max_abs_err"] <= ATOL * max(1.0, float(np.abs(ref).max()))
        except Exception as exc:  # noqa: BLE001 - report, then fail at the end
            import traceback

            traceback.print_exc()
            row.update(ok=False, error=f"{type(exc).__name__}: {str(exc)[:300]}")
        failures += not row["ok"]
        rows.append(row)
        print(json.dumps(row), flush=True)
    gpu = torch.cuda.get_device_name(0)
    lines = [f"## CUDA tuning on {gpu} (codegen.tune, {budget:.0f} s budget per model; same run)", "",
             "untuned = dlight default schedules; tuned = MetaSchedule records measured on this GPU (database "
             "seeded with the defaults); eager = torch on the same GPU.", "",
             _table(rows, TUNE_COLUMNS)]
    out.mkdir(parents=True, exist_ok=True)
    (out / "gpu_tune.json").write_text(json.dumps({"gpu": gpu, "budget_s": budget, "rows": rows}, indent=2))
    (out / "gpu_tune.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 1 if failures else 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.gpu_check")
    sub = p.add_subparsers(dest="cmd", required=True)
    pr = sub.add_parser("prepare")
    pr.add_argument("dir", type=Path)
    pr.add_argument("--only", nargs="*", help="case names (default: all)")
    pr.add_argument("--no-kernels", action="store_true", help="skip the kernel rows (gpu_kernels.py)")
    pr.add_argument("--kernels-only", action="store_true", help="only the kernel rows (no models, no cases.json)")
    r = sub.add_parser("run")
    for sp in (pr, r):
        sp.add_argument("--kinds", nargs="*", choices=("binary", "csr", "lut", "bconv"), help="kernel-row kinds (default: all)")
    r.add_argument("dir", type=Path)
    r.add_argument("out", type=Path)
    r.add_argument("--only", nargs="*", help="model case names, run in this order (default: all prepared)")
    r.add_argument("--compile-budget", type=float, default=150.0,
                   help="seconds of torch.compile baselines (kernels 40 %%, models 60 %%)")
    r.add_argument("--kernels-only", action="store_true", help="only the kernel rows (all the compile budget)")
    t = sub.add_parser("tune")
    t.add_argument("out", type=Path)
    t.add_argument("--budget", type=float, default=90.0, help="tuning seconds per model")
    args = p.parse_args(argv)
    if args.cmd == "prepare":
        prepare(args.dir, args.only, kernels=not args.no_kernels, models=not args.kernels_only, kinds=args.kinds)
        return 0
    if args.cmd == "tune":
        return tune(args.out, args.budget)
    return run(args.dir, args.out, args.only, args.compile_budget, args.kernels_only, args.kinds)


if __name__ == "__main__":
    sys.exit(main())
