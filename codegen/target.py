"""Target resolution: ``"llvm"`` means *this* CPU (detected, explicit triple), ``"cuda"`` a GPU. A
target that cannot be resolved is a BuildOptionError (a bad value of build's target option)."""

from __future__ import annotations

import difflib
import functools
import json
import os
from typing import Any

import tvm

from compiler.errors import BuildOptionError, last_line

DEFAULT_CUDA_ARCH = "sm_90"


def _host_triple() -> str:
    return tvm.target.codegen.llvm_get_system_triple().replace("-conda-", "-")


# CPU flags Linux reports (/proc/cpuinfo) -> the LLVM features they stand for: a VM may present
# a CPU model LLVM names without them (`rocketlake` on a Sapphire Rapids host with AMX)
_LINUX_FLAGS = {"amx_tile": "amx-tile", "amx_int8": "amx-int8", "amx_bf16": "amx-bf16", "avx512_vnni": "avx512vnni",
                "avx512_bf16": "avx512bf16", "avx_vnni": "avxvnni", "avx512_bitalg": "avx512bitalg"}


@functools.lru_cache(maxsize=1)
def _linux_cpu_flags() -> frozenset[str]:
    try:
        with open("/proc/cpuinfo") as f:
            flags = next((line.split(":", 1)[1] for line in f if line.startswith("flags")), "")
    except OSError:
        return frozenset()
    return frozenset(flags.split())


def cpu_has(target: tvm.target.Target | None, *features: str, x86: bool = False) -> bool:
    """Whether an LLVM target's CPU has every one of ``features`` (LLVM names: ``avx512f``). False
    for other targets, for a non-x86 triple when ``x86``, and for a CPU LLVM cannot query: the
    kernels that ask fall back to portable ones, which are always correct."""
    if target is None or target.kind.name != "llvm":
        return False
    if x86 and "x86" not in str(target.attrs.get("mtriple", "")):
        return False
    try:
        return all(bool(tvm.target.codegen.target_has_features(f, target)) for f in features)
    except Exception:  # noqa: BLE001 - an unknown CPU
        return False


def host_features(mcpu: str, triple: str) -> list[str]:
    """``mattr`` entries for features this host's CPU reports that LLVM's ``mcpu`` lacks."""
    flags = _linux_cpu_flags()   # read once per process
    probe = tvm.target.Target({"kind": "llvm", "mtriple": triple, "mcpu": mcpu})
    return [f"+{feature}" for flag, feature in sorted(_LINUX_FLAGS.items()) if flag in flags
            and not tvm.target.codegen.target_has_features(feature, probe)]


def host_cpu_target(num_cores: int | None = None) -> tvm.target.Target:
    """The host CPU with its real features. ``mcpu=native`` silently degrades to generic x86-64,
    and the wheel's default triple is a conda one, so both are spelled out; features the CPU
    reports beyond what LLVM's name for it implies are added (:func:`host_features`)."""
    triple, mcpu = _host_triple(), tvm.target.codegen.llvm_get_system_cpu()
    spec = {"kind": "llvm", "mtriple": triple, "mcpu": mcpu, "num-cores": num_cores or os.cpu_count() or 1}
    extra = host_features(mcpu, triple)
    return tvm.target.Target({**spec, "mattr": extra} if extra else spec)


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
    if host.kind.name == "llvm" and str(host.attrs.get("mcpu", "")) not in ("", "native"):
        check_mcpu(str(host.attrs["mcpu"]), str(host.attrs.get("mtriple", "")) or _host_triple())
    return tvm.target.Target(_make(attrs, json.dumps(attrs)), host=host)


def _make(spec: Any, what: str) -> tvm.target.Target:
    try:
        return tvm.target.Target(spec)
    except Exception as exc:  # noqa: BLE001 - TVM's own message, with what the user passed
        raise BuildOptionError(f"invalid target {what}: {last_line(exc)}") from None


def check_mcpu(mcpu: str, triple: str) -> None:
    """Refuse a CPU name LLVM does not know for ``triple`` before anything is built: LLVM itself
    only logs "is not a recognized processor" and compiles for a generic CPU (dozens of log lines,
    then success)."""
    codegen = tvm.target.codegen
    arches = [str(a) for a in codegen.llvm_get_targets()]
    if triple.split("-")[0] not in arches and not codegen.llvm_is_valid_cpu("generic", triple):
        # (asked before listing its CPUs: LLVM crashes listing those of a triple it cannot parse)
        raise BuildOptionError(f"target mtriple {triple!r} is not a triple LLVM builds for "
                               f"(architectures: {', '.join(arches)})")
    if codegen.llvm_is_valid_cpu(mcpu, triple):
        return
    known = [str(c) for c in codegen.llvm_get_cpu_archlist(tvm.target.Target({"kind": "llvm", "mtriple": triple}))]
    close = difflib.get_close_matches(mcpu, known, n=3)
    hint = f"did you mean {', '.join(close)}? " if close else ""
    raise BuildOptionError(f"target mcpu {mcpu!r} is not a CPU LLVM knows for mtriple {triple!r}; {hint}"
                           f"this host is {codegen.llvm_get_system_cpu()!r} ({len(known)} CPUs known)")


def _complete_llvm(t: tvm.target.Target) -> tvm.target.Target:
    """Fill what an llvm target needs here: a real CPU, a non-conda triple, a core count."""
    attrs = {k: v for k, v in json.loads(str(t)).items() if k not in ("host", "features")}
    host = str(attrs.get("mcpu", "")) in ("", "native")
    if host:
        attrs["mcpu"] = tvm.target.codegen.llvm_get_system_cpu()
    triple = str(attrs.get("mtriple", "")) or _host_triple()
    attrs["mtriple"] = triple.replace("-conda-", "-")
    if host and triple.split("-")[0] == _host_triple().split("-")[0]:
        extra = [f for f in host_features(attrs["mcpu"], attrs["mtriple"]) if f not in attrs.get("mattr", [])]
        if extra:
            attrs["mattr"] = [*attrs.get("mattr", []), *extra]
    check_mcpu(str(attrs["mcpu"]), attrs["mtriple"])
    attrs.setdefault("num-cores", os.cpu_count() or 1)
    return _make(attrs, json.dumps(attrs))


_LIST_FLAGS = ("mattr", "libs", "keys")


def _flag_form(text: str) -> dict:
    """``"llvm -mcpu=skylake -num-cores=4"`` (the form TVM dropped, still what people type) -> its
    JSON dict; a token that is not ``-key=value`` is refused."""
    kind, *flags = text.split()
    spec: dict[str, Any] = {"kind": kind}
    for flag in flags:
        key, eq, value = flag.lstrip("-").partition("=")
        if not flag.startswith("-") or not eq or not key or not value:
            raise BuildOptionError(f"target {text!r}: {flag!r} is not of the form -key=value")
        spec[key] = value.split(",") if key in _LIST_FLAGS else int(value) if value.isdigit() else value
    return spec


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
        if s.split(maxsplit=1)[0] in ("llvm", "cuda") and " -" in s:
            spec = _flag_form(s)
            return resolve_target(spec)
        if not s.startswith("{"):
            raise BuildOptionError(f"unknown target {target!r}; use 'llvm', 'cuda', 'llvm -mcpu=skylake-avx512', "
                                   "a tvm.target.Target or a JSON dict such as {'kind': 'llvm', 'mcpu': 'skylake-avx512'}")
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
