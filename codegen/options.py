"""`BuildOptions`: what ``codegen.build`` / ``codegen.tune`` were asked for, validated once where the
user's keywords arrive and passed down to the import, the lowerings, the kernel choice and the
pipeline. A bad value is a BuildOptionError (an OptionError and a BuildError) naming the option.
The target is resolved here, once."""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import tvm

from compiler.errors import BuildOptionError

SPARSE_KERNELS = ("auto", "sparse", "dense")
BINARY_KERNELS = ("auto", "amx", "popcount")
INT_KERNELS = ("auto", "amx", "vnni", "generic")


@dataclass(frozen=True)
class BuildOptions:
    """``target``: resolved (codegen/target.py). ``database``: tuning records to apply (a directory
    or a MetaSchedule database). ``sparse_kernels``: ``"auto"`` times each sparse / clustered
    layer's kernel against a dense matmul and keeps the faster; ``"sparse"`` / ``"dense"`` force
    one. ``binary_kernels``: ``"auto"`` times AMX tiles against xnor-popcount for the pure ±1
    layers AMX can take; ``"amx"`` / ``"popcount"`` force one. ``int_kernels`` (int8 layers):
    ``"auto"`` takes AMX tiles for 16+ rows where the target and process have AMX-INT8, else
    AVX512-VNNI, else the portable TE kernel; the others force one. ``default_schedules=False``: on
    CPU, operators without a record keep TVM's stock lowering."""

    target: tvm.target.Target
    database: Any = None
    sparse_kernels: str = "auto"
    binary_kernels: str = "auto"
    default_schedules: bool = True
    int_kernels: str = "auto"

    def __post_init__(self) -> None:
        if not isinstance(self.target, tvm.target.Target) or self.target.kind.name not in ("llvm", "cuda"):
            raise BuildOptionError(f"target must be a resolved llvm or cuda tvm.target.Target, got {self.target!r} "
                              "(use BuildOptions.create)")
        for option, value, choices in (("sparse_kernels", self.sparse_kernels, SPARSE_KERNELS),
                                       ("binary_kernels", self.binary_kernels, BINARY_KERNELS),
                                       ("int_kernels", self.int_kernels, INT_KERNELS)):
            if value not in choices:
                raise BuildOptionError(f"{option}={value!r} is not one of {choices}")
        if not isinstance(self.default_schedules, bool):
            raise BuildOptionError(f"default_schedules must be True or False, got {self.default_schedules!r}")

    @classmethod
    def create(cls, target: Any = "llvm", **options) -> "BuildOptions":
        """From what the user passed: ``target`` as ``codegen.build`` takes it (a name, JSON, dict or
        Target) and the keyword options."""
        from .target import resolve_target

        return cls(resolve_target(target), **options)

    @property
    def cpu(self) -> bool:
        return self.target.kind.name == "llvm"

    @property
    def cuda(self) -> bool:
        return self.target.kind.name == "cuda"

    @property
    def threads(self) -> int:
        """Worker threads a CPU kernel is written for (the target's core count, else this host's)."""
        return int(self.target.attrs.get("num-cores", 0) or 0) or os.cpu_count() or 1

    @property
    def is_this_host(self) -> bool:
        """The target is this machine's CPU, so a kernel built for it can be timed here."""
        return self.cpu and str(self.target.attrs.get("mcpu", "")) == tvm.target.codegen.llvm_get_system_cpu()
