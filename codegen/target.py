"""Target resolution: ``"llvm"`` means *this* CPU (detected, explicit triple), ``"cuda"`` a GPU. A
target that cannot be resolved is a BuildOptionError (a bad value of build's target option)."""

from __future__ import annotations

import json
import os
from typing import Any

import tvm

from compiler.errors import BuildOptionError, last_line

DEFAULT_CUDA_ARCH = "sm_90"


def _host_triple() -> str:
    return tvm.target.codegen.llvm_get_system_triple().replace("-conda-", "-")


def host_cpu_target(num_cores: int | None = None) -> tvm.target.Target:
    """The host CPU with its real features. ``mcpu=native`` silently degrades to generic x86-64,
    and the wheel's default triple is a conda one, so both are spelled out."""
    return tvm.target.Target({"kind": "llvm", "mtriple": _host_triple(),
                              "mcpu": tvm.target.codegen.llvm_get_system_cpu(),
                              "num-cores": num_cores or os.cpu_count() or 1})


def gpu_arch(dev) -> str:
    """``sm_90`` for a compute capability 9.0 device."""
    return "sm_" + dev.compute_version.replace(".", "")


def _cuda_device():
    try:
        dev = tvm.cuda(0)
        return dev if dev.exist else None
    except Exception:  # noqa: BLE001 - no CUDA runtime
        return None


def _cuda_arch() -> str:
    dev = _cuda_device()
    return gpu_arch(dev) if dev is not None else DEFAULT_CUDA_ARCH


# What MetaSchedule's GPU rules (AutoBind, cross-thread reduction, shared-memory tiling) read from
# the target; a bare {"kind": "cuda"} lacks them. The visible GPU's values, else Hopper's limits.
_CUDA_LIMITS = {"max_threads_per_block": 1024, "max_shared_memory_per_block": 49152, "thread_warp_size": 32}


def _complete_cuda(t: tvm.target.Target) -> tvm.target.Target:
    attrs = {k: v for k, v in json.loads(str(t)).items() if k != "host"}
    if any(k not in attrs for k in _CUDA_LIMITS):
        dev = _cuda_device()
        limits = _CUDA_LIMITS if dev is None else {"max_threads_per_block": dev.max_threads_per_block,
                                                   "max_shared_memory_per_block": dev.max_shared_memory_per_block,
                                                   "thread_warp_size": dev.warp_size}
        for key, value in limits.items():
            attrs.setdefault(key, value)
    host = t.host if t.host is not None else host_cpu_target()
    return tvm.target.Target(_make(attrs, json.dumps(attrs)), host=host)


def _make(spec: Any, what: str) -> tvm.target.Target:
    try:
        return tvm.target.Target(spec)
    except Exception as exc:  # noqa: BLE001 - TVM's own message, with what the user passed
        raise BuildOptionError(f"invalid target {what}: {last_line(exc)}") from None


def _complete_llvm(t: tvm.target.Target) -> tvm.target.Target:
    """Fill what an llvm target needs here: a real CPU, a non-conda triple, a core count."""
    attrs = {k: v for k, v in json.loads(str(t)).items() if k not in ("host", "features")}
    if str(attrs.get("mcpu", "")) in ("", "native"):
        attrs["mcpu"] = tvm.target.codegen.llvm_get_system_cpu()
    triple = str(attrs.get("mtriple", "")) or _host_triple()
    attrs["mtriple"] = triple.replace("-conda-", "-")
    attrs.setdefault("num-cores", os.cpu_count() or 1)
    return _make(attrs, json.dumps(attrs))


def resolve_target(target: Any) -> tvm.target.Target:
    """``"llvm"`` (this CPU), ``"cuda"`` (this GPU's arch, or sm_90 without one), a JSON string or
    dict, or a ``tvm.target.Target``. Only llvm and cuda are supported."""
    if isinstance(target, tvm.target.Target):
        t = target
    elif isinstance(target, dict):
        t = _make(target, repr(target))
    elif isinstance(target, str):
        s = target.strip()
        if s in ("llvm", "cpu", "host"):
            return host_cpu_target()
        if s in ("cuda", "gpu"):
            return _complete_cuda(tvm.target.Target({"kind": "cuda", "arch": _cuda_arch()}))
        if not s.startswith("{"):
            raise BuildOptionError(f"unknown target {target!r}; use 'llvm', 'cuda', a tvm.target.Target "
                             "or a JSON dict such as {'kind': 'llvm', 'mcpu': 'skylake-avx512'}")
        try:
            spec = json.loads(s)
        except json.JSONDecodeError as exc:
            raise BuildOptionError(f"target {target!r} is not valid JSON: {exc}") from None
        t = _make(spec, s)
    else:
        raise BuildOptionError(f"target must be a string, dict or tvm.target.Target, got {type(target).__name__}")
    if t.kind.name == "llvm":
        return _complete_llvm(t)
    if t.kind.name == "cuda":
        return _complete_cuda(t)
    raise BuildOptionError(f"target kind {t.kind.name!r} is not supported; Squeezer builds for 'llvm' and 'cuda'")
