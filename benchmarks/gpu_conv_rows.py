"""The binary-conv kernel rows of the GPU check (issue 22): codegen/kernels/cuda_conv.py (implicit
GEMM over packed channels, XNOR-Net scale) on 256→256 3×3 convs, padding 1, at 14×14 and 28×28,
batch 1 and 16, against cuDNN (``F.conv2d``) in fp32 (TF32 off), TF32 (torch's default for
convolutions) and fp16, and torch.compile (reduce-overhead) of the fp32 conv. Weights are made
on the GPU machine from a seed with numpy and codegen/gpu_layouts.py, like the other rows."""

from __future__ import annotations

import numpy as np

CHANNELS = 256
MAPS = (14, 28)
BATCHES = (1, 16)
VARIANTS = [{"rpt": 2, "pp": 1}, {"rpt": 4, "pp": 1}, {"rpt": 8, "pp": 1}, {"rpt": 8, "pp": 2}]


def cases() -> list[dict]:
    return [{"name": f"bconv-{hw}-b{batch}-v{i}", "kind": "bconv", "n": CHANNELS, "k": CHANNELS, "hw": hw,
             "batch": batch, "params": params}
            for hw in MAPS for batch in BATCHES for i, params in enumerate(VARIANTS)]


def kernel_func(case: dict):
    from codegen.kernels import cuda_conv as cc

    hw, c = case["hw"], case["k"]
    return cc.binary_conv2d(case["batch"], c, hw, hw, case["n"], (3, 3), (1, 1), (1, 1), (1, 1), True,
                            **case["params"])


def make_weights(n: int, k: int, tile: int, seed: int = 0) -> dict:
    """±1 weights (n, k, 3, 3) as the op packs them (per tap, channels little-endian), in the
    kernel's layout for channel tiles of ``tile``; alpha, bias."""
    from codegen import gpu_layouts as gl

    rng = np.random.default_rng(seed)
    bits = rng.random((n, 3, 3, k), dtype=np.float32) >= 0.5                      # (out, kh, kw, in)
    packed = np.packbits(bits, axis=-1, bitorder="little").reshape(n, -1)
    alpha = (rng.random(n, dtype=np.float32) + 0.5).astype(np.float32)
    bias = (rng.standard_normal(n) * 0.1).astype(np.float32)
    sign = np.where(bits, 1.0, -1.0).astype(np.float32).transpose(0, 3, 1, 2)      # (out, in, kh, kw)
    return {"args": [gl.binary_conv_tiles(packed, 9, k, tile), alpha, bias], "sign": np.ascontiguousarray(sign),
            "alpha": alpha, "bias": bias, "dense": np.ascontiguousarray(sign * alpha[:, None, None, None])}


def tile(case: dict) -> int:
    """Channels per weight tile; from gpu_layouts, since the GPU machine's runtime-only TVM has no
    TVMScript to import cuda_conv with."""
    from codegen import gpu_layouts as gl

    return gl.BINARY_CONV_WARPS * case["params"]["rpt"]


def reference(w: dict, x):
    """torch float64 (on x's device): the op's pure ±1 XNOR conv (sign padding +1, the scale
    box-filtered over zero padding)."""
    import torch
    import torch.nn.functional as F

    dev, c = x.device, x.shape[1]
    s = F.pad(torch.where(x >= 0, 1.0, -1.0).double(), (1, 1, 1, 1), value=1.0)
    core = F.conv2d(s, torch.from_numpy(w["sign"]).to(dev).double())
    box = torch.full((1, 1, 3, 3), 1.0 / 9, dtype=torch.float64, device=dev)
    scale = F.conv2d(x.double().abs().mean(1, keepdim=True), box, padding=1)
    alpha = torch.from_numpy(w["alpha"]).to(dev).double()[None, :, None, None]
    return core * scale * alpha + torch.from_numpy(w["bias"]).to(dev).double()[None, :, None, None]


def measure(base, w: dict, x, cuda_ms) -> dict:
    """cuDNN fp32 / TF32 / fp16 and torch.compile of the dense conv, each once per input shape
    (``base``: gpu_kernels.Baselines, ``cuda_ms`` its timer)."""
    import torch
    import torch.nn.functional as F

    key = ("conv", *x.shape)
    wd, b = torch.from_numpy(w["dense"]).cuda(), torch.from_numpy(w["bias"]).cuda()

    def timed(tf32: bool, half: bool = False):
        def go():
            old = torch.backends.cudnn.allow_tf32
            torch.backends.cudnn.allow_tf32 = tf32
            try:
                xx, ww, bb = (x.half(), wd.half(), b.half()) if half else (x, wd, b)
                return cuda_ms(lambda: F.conv2d(xx, ww, bb, padding=1))
            finally:
                torch.backends.cudnn.allow_tf32 = old
        return go

    out = {"cublas_fp32_ms": base._once((*key, "fp32"), timed(False)),
           "cudnn_tf32_ms": base._once((*key, "tf32"), timed(True)),
           "cublas_fp16_ms": base._once((*key, "fp16"), timed(False, half=True))}
    if base.compile_open():
        def compiled():
            f = torch.compile(lambda a: F.conv2d(a, wd, b, padding=1), mode="reduce-overhead", dynamic=False)
            return cuda_ms(lambda: f(x))
        out["compile_ms"] = base._once((*key, "compile"), compiled)
    return {k: v for k, v in out.items() if v is not None}
