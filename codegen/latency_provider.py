"""compiler.latency's provider: how long a model compiled for a target takes, by TVM's time
evaluator — in one process (compile, then time), or in two halves for a distributed search: the
module compiled and exported to bytes on one rank, loaded and timed on another (the timing rank).
Both halves time exactly as the whole does (same evaluator settings).

Torch-free at import (``import codegen`` registers it in a runtime-only deployment too)."""

from __future__ import annotations

import json
import tempfile
from pathlib import Path
from typing import Any, Callable, Sequence

from compiler.errors import ArtifactError

from .artifact import CompiledModule, load

# TVM's time evaluator: 5 repeats of >= 20 ms each, 10 calls a repeat; the timer returns their median
BENCHMARK = {"number": 10, "repeat": 5, "min_repeat_ms": 20}
_MAGIC = b"squeezer-artifact/1\n"   # then an 8-byte header length, the JSON header [[name, size]...], the files


def _timer(compiled: CompiledModule, example_inputs: Sequence[Any]) -> Callable[[], float]:
    args = [x.detach().cpu().numpy() if hasattr(x, "detach") else x for x in example_inputs]
    return lambda: compiled.benchmark(*args, **BENCHMARK)["median_ms"]


def _compile(module: Any, example_inputs: Sequence[Any], target: str) -> CompiledModule:
    from compiler import trace

    from .builder import build

    return build(trace(module, tuple(example_inputs)), target)


def latency_timer(module: Any, example_inputs: Sequence[Any], target: str = "llvm") -> Callable[[], float]:
    """Trace and build once for ``target``; the timer returns the median ms of TVM's time evaluator."""
    return _timer(_compile(module, example_inputs, target), example_inputs)


def compile_artifact(module: Any, example_inputs: Sequence[Any], target: str = "llvm") -> bytes:
    """The first half: the module built for ``target`` and exported (model.so, manifest, weights)
    as one byte string that can cross to the rank that times it. No pickle: files and a JSON index."""
    with tempfile.TemporaryDirectory(prefix="squeezer-timing-") as tmp:
        _compile(module, example_inputs, target).export(tmp)
        files = [(p.name, p.read_bytes()) for p in sorted(Path(tmp).iterdir()) if p.is_file()]
    header = json.dumps([[name, len(data)] for name, data in files]).encode()
    return b"".join([_MAGIC, len(header).to_bytes(8, "little"), header, *(data for _, data in files)])


def artifact_timer(payload: bytes, example_inputs: Sequence[Any]) -> Callable[[], float]:
    """The second half: ``compile_artifact``'s bytes loaded (the manifest's digests verified, as any
    load does) and timed as :func:`latency_timer` times. The files live as long as the timer."""
    if not payload.startswith(_MAGIC):
        raise ArtifactError("not a compiled-artifact payload (compile_artifact's output expected)")
    at = len(_MAGIC) + 8
    size = int.from_bytes(payload[len(_MAGIC):at], "little")
    index = json.loads(payload[at:at + size].decode())
    tmp = tempfile.TemporaryDirectory(prefix="squeezer-timing-")
    at += size
    for name, length in index:
        if not isinstance(name, str) or Path(name).name != name or name in ("", ".", ".."):
            raise ArtifactError(f"compiled-artifact payload: file name {name!r} is not a plain name")
        (Path(tmp.name) / name).write_bytes(payload[at:at + length])
        at += length
    timer = _timer(load(tmp.name), example_inputs)

    def timed(_files: tempfile.TemporaryDirectory = tmp) -> float:   # holds the directory (model.so)
        return timer()

    return timed
