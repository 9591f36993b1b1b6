"""Target resolution: ``"llvm"`` means *this* CPU (detected, explicit triple), ``"cuda"`` a GPU."""

from __future__ import annotations

import json
import os
from typing import Any

import tvm

from compiler.errors import BuildError

DEFAULT_CUDA_ARCH = "sm_90"


def host_cpu_target(num_cores: int | None = None) -> tvm.target.Target:
    """The host CPU with its real features. ``mcpu=native`` silently degrades to generic x86-64,
    and the wheel's default triple is a conda one, so both are spelled out."""
    cpu = tvm.target.codegen.llvm_get_system_cpu()
    triple = tvm.target.codegen.llvm_get_system_triple().replace("-conda-", "-")
    return tvm.target.Target({"kind": "llvm", "mtriple": triple, "mcpu": cpu,
                              "num-cores": num_cores or os.cpu_count() or 1})


def _cuda_arch() -> str:
    try:
        dev = tvm.cuda(0)
        if dev.exist:
            return "sm_" + dev.compute_version.replace(".", "")
    except Exception:  # noqa: BLE001 - no CUDA runtime: fall back to the default arch
        pass
    return DEFAULT_CUDA_ARCH


def resolve_target(target: Any) -> tvm.target.Target:
    """Accepts ``"llvm"``, ``"cuda"``, ``"cuda -arch=sm_80"``-free JSON strings/dicts, or a Target."""
    if isinstance(target, tvm.target.Target):
        t = target
    elif isinstance(target, dict):
        t = tvm.target.Target(target)
    elif isinstance(target, str):
        s = target.strip()
        if s in ("llvm", "cpu", "host"):
            return host_cpu_target()
        if s in ("cuda", "gpu"):
            return tvm.target.Target({"kind": "cuda", "arch": _cuda_arch()}, host=host_cpu_target())
        if s.startswith("{"):
            try:
                t = tvm.target.Target(json.loads(s))
            except json.JSONDecodeError as exc:
                raise BuildError(f"target {target!r} is not valid JSON: {exc}") from None
        else:
            raise BuildError(f"unknown target {target!r}; use 'llvm', 'cuda', a tvm.target.Target "
                             "or a JSON dict such as {'kind': 'llvm', 'mcpu': 'skylake-avx512'}")
    else:
        raise BuildError(f"target must be a string, dict or tvm.target.Target, got {type(target).__name__}")
    if t.kind.name == "llvm":
        attrs = dict(t.export())
        if "num-cores" not in attrs:
            attrs["num-cores"] = os.cpu_count() or 1
        if str(attrs.get("mcpu", "")) in ("", "native"):
            attrs["mcpu"] = tvm.target.codegen.llvm_get_system_cpu()
        attrs.setdefault("mtriple", tvm.target.codegen.llvm_get_system_triple().replace("-conda-", "-"))
        t = tvm.target.Target({k: v for k, v in attrs.items() if k in ("kind", "mtriple", "mcpu", "mattr", "num-cores", "keys", "tag")} | {"kind": "llvm"})
    elif t.kind.name == "cuda" and t.host is None:
        t = tvm.target.Target(t, host=host_cpu_target())
    elif t.kind.name not in ("llvm", "cuda"):
        raise BuildError(f"target kind {t.kind.name!r} is not supported; Squeezer builds for 'llvm' and 'cuda'")
    return t
