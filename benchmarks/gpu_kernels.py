"""Kernel rows of the GPU check (issue 22): the CUDA kernels of codegen/kernels/cuda_kernels.py
(warp-per-row GEMVs; CSR at batch 64 also the Sputnik-style SpMM) at 4096² and 8192², batch 1
and 64, against cuBLAS fp32 and fp16 (torch ``F.linear``), cuSPARSE CSR (``torch.sparse.mm``) and
``torch.compile`` (CUDA graphs) of the same dense layer, on the same GPU; kind ``bconv``: the binary
3×3 conv of codegen/kernels/cuda_conv.py against cuDNN (benchmarks/gpu_conv_rows.py).

``prepare`` (here, TVM's compiler, no GPU) builds each kernel alone and exports it; the weights
are not exported (an 8192² CSR or LUT layer is 32-40 MB): ``run`` (GPU machine, TVM's runtime
alone) makes them from a seed with numpy and the numpy-only codegen/gpu_layouts.py, checks every
kernel against torch (float64 on the GPU, from the same dense weight) and times it with TVM's
time evaluator; the baselines are timed with CUDA events. A kernel that mismatches is a FAIL row.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np

from . import gpu_conv_rows

SIZES = (4096, 8192)
KERNEL_BATCHES = (1, 64)
DENSITY = 0.1                     # 90 % sparse
ATOL = 1e-4
# (kind, batch) -> variants (keyword arguments of the kernel factory); the best one is reported
VARIANTS = {
    ("binary", 1): [{"rpw": 2, "mb": 1}, {"rpw": 4, "mb": 1}, {"rpw": 8, "mb": 1}],
    ("binary", 64): [{"rpw": 2, "mb": 8}, {"rpw": 4, "mb": 4}, {"rpw": 1, "mb": 16}],
    ("csr", 1): [{"rpw": 1, "unroll": 4}, {"rpw": 2, "unroll": 4}, {"rpw": 1, "unroll": 8}],
    # batch 64: Sputnik-style SpMM (ck.csr_spmm) tiles, and the warp-per-row GEMV it replaces
    ("csr", 64): [{"spmm": True, "lanes": 16, "vec": 4}, {"spmm": True, "lanes": 32, "vec": 2},
                  {"spmm": True, "lanes": 8, "vec": 4}, {"spmm": True, "lanes": 32, "vec": 1}, {"rpw": 1, "unroll": 2}],
    ("lut", 1): [{"rpw": 2}, {"rpw": 4}],
    # batch 64: the tiled LUT GEMM (codegen/kernels/cuda_lut.py) register tiles, and the GEMV it replaces
    ("lut", 64): [{"gemm": True, "tm": 4, "tn": 4}, {"gemm": True, "tm": 2, "tn": 4}, {"gemm": True, "tm": 4, "tn": 2},
                  {"rpw": 4}],
}


KINDS = ("binary", "csr", "lut", "bconv")


def cases(kinds=KINDS) -> list[dict]:
    out = []   # ordered by layer, so the GPU machine makes each layer's weights once
    for kind in kinds:
        if kind == "bconv":
            out += gpu_conv_rows.cases()
            continue
        for n in SIZES:
            for (kind_, batch), variants in VARIANTS.items():
                for i, params in enumerate(variants if kind_ == kind else []):
                    out.append({"name": f"{kind}-{n}-b{batch}-v{i}", "kind": kind, "n": n, "k": n, "batch": batch,
                                "params": params})
    return out


def _kept(k: int) -> int:
    return int(round(k * DENSITY))


# ---- here: build and export ------------------------------------------------------------------------------
def kernel_func(case: dict):
    from codegen.kernels import cuda_kernels as ck

    kind, m, n, k, p = case["kind"], case["batch"], case["n"], case["k"], dict(case["params"])
    if kind == "bconv":
        return gpu_conv_rows.kernel_func(case)
    if kind == "binary":
        return ck.binary_gemv(m, k, n, True, **p)
    if kind == "csr":
        nnz = n * _kept(k)
        if p.pop("spmm", False):
            return ck.csr_spmm(m, n, k, nnz, "uint16", 0, True, **p)
        return ck.csr_gemv(m, n, k, nnz, "uint16", 0, True, **p)
    if p.pop("gemm", False):
        from codegen.kernels import cuda_lut

        return cuda_lut.lut_gemm(m, k, n, 4, 16, True, **p)
    return ck.lut_gemv(m, k, n, 4, 16, True, **p)


def prepare(directory: Path, kinds=KINDS) -> list[dict]:
    """Export every kernel case of ``kinds`` to ``directory/kernels``; returns the case list (also
    kernels.json)."""
    import tvm

    from codegen.artifact import cuda_source
    from codegen.target import resolve_target

    target = resolve_target("cuda")
    out = directory / "kernels"
    out.mkdir(parents=True, exist_ok=True)
    specs = cases(kinds)
    for case in specs:
        t = time.perf_counter()
        ex = tvm.compile(tvm.IRModule({"main": kernel_func(case)}), target=target)
        ex.export_library(str(out / f"{case['name']}.so"))
        case["source"] = cuda_source(ex.mod) or ""
        print(f"kernel {case['name']}: built in {time.perf_counter() - t:.1f} s", flush=True)
    (out / "kernels.json").write_text(json.dumps([{k: v for k, v in c.items() if k != "source"} for c in specs],
                                                 indent=1))
    return specs


# ---- GPU machine: weights, reference, timing -----------------------------------------------------------------
def make_weights(kind: str, n: int, k: int, seed: int = 0) -> dict:
    """The layer's kernel arrays (numpy) and its dense fp32 weight, from ``seed``."""
    from codegen import gpu_layouts as gl

    rng = np.random.default_rng(seed)
    bias = (rng.standard_normal(n) * 0.1).astype(np.float32)
    if kind == "binary":
        bits = rng.random((n, k), dtype=np.float32) >= 0.5
        alpha = (rng.random(n, dtype=np.float32) + 0.5).astype(np.float32)
        words = gl.binary_rows(np.packbits(bits, axis=1, bitorder="little"), k)
        return {"args": [words, alpha, bias], "sign": np.where(bits, 1.0, -1.0).astype(np.float32),
                "alpha": alpha, "bias": bias, "dense": np.where(bits, 1.0, -1.0).astype(np.float32) * alpha[:, None]}
    if kind == "csr":
        kr = _kept(k)
        cols = np.sort(np.argpartition(rng.random((n, k), dtype=np.float32), kr, axis=1)[:, :kr], axis=1)
        vals = rng.standard_normal((n, kr), dtype=np.float32)
        ptr = np.arange(n + 1, dtype=np.int32) * kr
        csr = gl.csr_narrow(ptr, cols.reshape(-1), vals.reshape(-1), k, None)
        dense = np.zeros((n, k), np.float32)
        np.put_along_axis(dense, cols, vals, axis=1)
        return {"args": [csr["values"], csr["col_idx"], csr["row_ptr"], np.zeros(1, np.float32), bias],
                "order": gl.row_order(ptr),
                "dense": dense, "bias": bias, "csr": (ptr, cols.reshape(-1), vals.reshape(-1))}
    idx = rng.integers(0, 16, (n, k), dtype=np.uint8)
    cb = np.sort(rng.standard_normal(16).astype(np.float32))
    return {"args": [gl.lut_rows(idx, 4), cb, bias], "dense": cb[idx], "bias": bias, "idx": idx}


def case_weights(case: dict) -> dict:
    if case["kind"] == "bconv":
        return gpu_conv_rows.make_weights(case["n"], case["k"], gpu_conv_rows.tile(case))
    return make_weights(case["kind"], case["n"], case["k"])


def io_shapes(case: dict) -> tuple[tuple, tuple]:
    """The kernel's input and output shapes (a conv row: NCHW maps of ``hw``²)."""
    m, n, k = case["batch"], case["n"], case["k"]
    if case["kind"] == "bconv":
        return (m, k, case["hw"], case["hw"]), (m, n, case["hw"], case["hw"])
    return (m, k), (m, n)


def kernel_args(case: dict, w: dict) -> list[np.ndarray]:
    """The weight arrays the case's kernel takes (the SpMM also its row order, after row_ptr)."""
    if case["params"].get("spmm"):
        return [*w["args"][:3], w["order"], *w["args"][3:]]
    if case["params"].get("gemm"):     # the LUT GEMM's tiles (one layout per tile width, made once)
        from codegen import gpu_layouts as gl

        tile = 16 * case["params"]["tn"]
        if ("tiles", tile) not in w:
            w[("tiles", tile)] = gl.lut_gemm_tiles(w["idx"], 4, tile)
        return [w[("tiles", tile)], *w["args"][1:]]
    return w["args"]


def reference(kind: str, w: dict, x):
    """torch float64 on the GPU: what the kernel must compute."""
    import torch

    dev = x.device
    if kind == "bconv":
        return gpu_conv_rows.reference(w, x)
    if kind == "binary":
        s = torch.where(x >= 0, 1.0, -1.0).double()
        core = s @ torch.from_numpy(w["sign"]).to(dev).double().T
        scale = x.double().abs().sum(1, keepdim=True) / x.shape[1]
        return core * scale * torch.from_numpy(w["alpha"]).to(dev).double() + torch.from_numpy(w["bias"]).to(dev).double()
    return x.double() @ torch.from_numpy(w["dense"]).to(dev).double().T + torch.from_numpy(w["bias"]).to(dev).double()


def cuda_ms(fn, iters: int = 200, repeats: int = 5) -> float:
    """Median ms per call of ``fn`` (CUDA events around ``iters`` back-to-back calls)."""
    import torch

    for _ in range(10):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(iters):
            fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end) / iters)
    return float(np.median(times))


class Baselines:
    """Dense and sparse torch timings per (kind, n, batch), each measured once."""

    def __init__(self, compile_budget_s: float) -> None:
        self.cache: dict[tuple, float] = {}
        self.compile_deadline = time.perf_counter() + compile_budget_s

    def compile_open(self) -> bool:
        return time.perf_counter() < self.compile_deadline

    def _once(self, key, fn) -> float | None:
        if key not in self.cache:
            try:
                self.cache[key] = fn()
            except Exception as exc:  # noqa: BLE001 - a baseline that fails is reported as missing
                print(f"baseline {key} failed: {type(exc).__name__}: {str(exc)[:200]}", flush=True)
                self.cache[key] = None
        return self.cache[key]

    def measure(self, kind: str, w: dict, x) -> dict:
        import torch
        import torch.nn.functional as F

        if kind == "bconv":
            return gpu_conv_rows.measure(self, w, x, cuda_ms)
        n, k, m = w["dense"].shape[0], w["dense"].shape[1], x.shape[0]
        wd = torch.from_numpy(w["dense"]).cuda()
        b = torch.from_numpy(w["bias"]).cuda()
        out = {"cublas_fp32_ms": self._once(("fp32", n, m), lambda: cuda_ms(lambda: F.linear(x, wd, b)))}
        wh, xh, bh = wd.half(), x.half(), b.half()
        out["cublas_fp16_ms"] = self._once(("fp16", n, m), lambda: cuda_ms(lambda: F.linear(xh, wh, bh)))
        if kind == "csr":
            ptr, cols, vals = (torch.from_numpy(a).cuda() for a in w["csr"])
            sp = torch.sparse_csr_tensor(ptr.long(), cols.long(), vals, (n, k))
            xt = x.T.contiguous()
            out["cusparse_ms"] = self._once(("cusparse", n, m), lambda: cuda_ms(lambda: torch.sparse.mm(sp, xt)))
        if self.compile_open():
            def compiled():
                f = torch.compile(lambda a: F.linear(a, wd, b), mode="reduce-overhead", dynamic=False)
                return cuda_ms(lambda: f(x))
            out["compile_ms"] = self._once(("compile", n, m), compiled)
        return {key: v for key, v in out.items() if v is not None}


def run_kernels(directory: Path, compile_budget_s: float = 90.0, kinds=KINDS) -> list[dict]:
    """Load, check and time every exported kernel case of ``kinds``, kind by kind in that order; one
    row per case."""
    import torch
    import tvm

    from codegen.artifact import load_kernel_library

    specs = [c for c in json.loads((directory / "kernels" / "kernels.json").read_text()) if c["kind"] in kinds]
    specs.sort(key=lambda c: list(kinds).index(c["kind"]))     # in the order of ``kinds`` (stable within)
    dev = tvm.cuda(0)
    base = Baselines(compile_budget_s)
    rows, weights = [], {}
    for case in specs:
        kind, n, k, m = case["kind"], case["n"], case["k"], case["batch"]
        row = {"case": case["name"], "kind": kind, "n": n, "batch": m, "params": case["params"],
               **({"hw": case["hw"]} if "hw" in case else {})}
        try:
            wkey = (kind, n, gpu_conv_rows.tile(case) if kind == "bconv" else 0)
            if wkey not in weights:
                weights.clear()          # one layer's weights at a time (8192² dense fp32 is 256 MiB)
                weights[wkey] = case_weights(case)
            w = weights[wkey]
            x_shape, y_shape = io_shapes(case)
            x = torch.from_numpy(np.random.default_rng(m).standard_normal(x_shape).astype(np.float32)).cuda()
            lib = load_kernel_library(directory / "kernels" / f"{case['name']}.so")
            args = [tvm.runtime.tensor(x.cpu().numpy(), dev)] + [tvm.runtime.tensor(a, dev) for a in kernel_args(case, w)]
            y = tvm.runtime.tensor(np.zeros(y_shape, np.float32), dev)
            lib["main"](*args, y)
            ref = reference(kind, w, x).cpu().numpy()
            row["max_abs_err"] = float(np.abs(y.numpy() - ref).max())
            row["ok"] = row["max_abs_err"] <= ATOL * max(1.0, float(np.abs(ref).max()))
            evaluator = lib.time_evaluator("main", dev, number=200, repeat=7)
            row["tvm_ms"] = float(np.median(evaluator(*args, y).results)) * 1e3
            row.update(base.measure(kind, w, x))
            for key in ("cublas_fp32", "cudnn_tf32", "cublas_fp16", "cusparse", "compile"):
                if f"{key}_ms" in row:
                    row[f"vs_{key}"] = row[f"{key}_ms"] / row["tvm_ms"]
            row["weight_mb"] = sum(a.nbytes for a in w["args"]) / 2 ** 20
            row["gb_per_s"] = sum(a.nbytes for a in w["args"]) / row["tvm_ms"] / 1e6
        except Exception as exc:  # noqa: BLE001 - report every case, fail at the end
            row.update(ok=False, error=f"{type(exc).__name__}: {str(exc)[:300]}")
        rows.append(row)
        print(json.dumps(row), flush=True)
    return rows


def best_rows(rows: list[dict]) -> list[dict]:
    """Per (kind, n, batch): the fastest variant that matched (or the first failure)."""
    best: dict[tuple, dict] = {}
    for r in rows:
        key = (r["kind"], r["n"], r["batch"], r.get("hw"))
        cur = best.get(key)
        if not r.get("ok"):
            if cur is None:
                best[key] = r
            continue
        if cur is None or not cur.get("ok") or r["tvm_ms"] < cur["tvm_ms"]:
            best[key] = r
    return list(best.values())


KERNEL_COLUMNS = [("kind", "kernel", "s"), ("n", "N=K", "d"), ("hw", "map", "d"), ("batch", "batch", "d"),
                  ("tvm_ms", "ours ms", ".4f"), ("vs_cublas_fp32", "vs cuBLAS/cuDNN fp32", ".2f"),
                  ("vs_cudnn_tf32", "vs cuDNN TF32", ".2f"), ("vs_cublas_fp16", "vs cuBLAS/cuDNN fp16", ".2f"),
                  ("vs_cusparse", "vs cuSPARSE", ".2f"), ("vs_compile", "vs torch.compile", ".2f"),
                  ("cublas_fp32_ms", "fp32 ms", ".4f"), ("gb_per_s", "weight GB/s", ".0f"),
                  ("max_abs_err", "max abs err", ".1e"), ("case", "variant", "s")]
