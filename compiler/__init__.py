"""Squeezer's core: trace a model into a Graph, run passes on it, summarize it.

Nothing here imports ``passes`` or ``codegen`` (see DESIGN.md's floors). Names are resolved
lazily, so ``compiler.errors`` stays importable where torch is not installed (a deployed module
is loaded with TVM's runtime and numpy alone)."""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

_EXPORTS = {
    "errors": ["ArtifactError", "BuildError", "BuildOptionError", "InputError", "ModelRunError", "OptionError",
               "PassError", "SqueezerError", "TraceError", "VerificationError"],
    "graph": ["Graph"],
    "pass_infra": ["Pass", "PassReport", "PassResult"],
    "pipeline": ["DumpIR", "Instrument", "Pipeline", "Timing", "Verify"],
    "registry": ["get_pass", "load_recipe", "parse_pass_spec", "register_pass", "registered_passes"],
    "serialization": ["load", "save"],
    "summary": ["Summary", "summarize"],
    "tracing": ["trace"],
}
_WHERE = {name: module for module, names in _EXPORTS.items() for name in names}
__all__ = sorted(_WHERE) + ["__version__"]


def __getattr__(name: str) -> Any:
    if name in _WHERE:
        value = getattr(importlib.import_module(f".{_WHERE[name]}", __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'compiler' has no attribute {name!r}")


def __dir__() -> list[str]:
    return __all__
