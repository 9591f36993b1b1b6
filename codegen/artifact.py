"""`CompiledModule` and `load`: run, time, export and reload compiled models.

This module must not import torch (nor compiler/): a deployed artifact loads with TVM's runtime and
numpy alone. Torch tensors passed in are recognised by duck typing."""

from __future__ import annotations

import hashlib
import importlib
import json
import os
import platform
import shutil
import subprocess
import tempfile
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import tvm
from tvm.runtime.vm import VirtualMachine

MANIFEST = "manifest.json"
LIBRARY = "model.so"
WEIGHTS = "weights.bin"
FORMAT = "squeezer-module/2"   # /2: the manifest carries the digest that covers it
SIGNATURE = "squeezer_signature"   # a function in model.so: the JSON signature it was built for


from compiler.errors import ArtifactError, InputError  # torch-free: compiler resolves names lazily

from . import threads, weight_codec


def manifest_digest(manifest: dict) -> str:
    """sha256 of the manifest's canonical JSON, its own ``digest`` entry left out. The manifest
    holds every file's sha256 and the weight index, so this one value covers the whole artifact:
    an edited offset or shape is refused, not decoded into wrong weights."""
    body = {k: v for k, v in manifest.items() if k != "digest"}
    return hashlib.sha256(json.dumps(body, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def signature_of(inputs: list[dict], outputs: list[dict], params: list[dict]) -> dict:
    """What ``main`` takes and returns: inputs and outputs (name, shape, dtype), then the trailing
    weight parameters (shape, dtype). Built into model.so, so a manifest that disagrees with its
    library is caught even when someone recomputed its digest."""
    def tensor(spec: dict, named: bool) -> dict:
        out = {"shape": [int(d) for d in spec["shape"]], "dtype": str(spec["dtype"])}
        return {"name": str(spec["name"]), **out} if named else out
    return {"inputs": [tensor(s, True) for s in inputs], "outputs": [tensor(s, True) for s in outputs],
            "params": [tensor(s, False) for s in params]}


def _describe(specs: list[dict]) -> str:
    return "[" + ", ".join(f"{s.get('name', '')}{':' if 'name' in s else ''}{s['dtype']}{tuple(s['shape'])}"
                           for s in specs) + "]"


def sha256_of(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _ensure_cuda_runtime() -> None:
    """TVM's CUDA runtime lives in a sidecar library that a runtime-only TVM (no compiler library,
    the deploy case) does not load by itself."""
    from tvm.base import _LOADED_LIBS

    if "tvm_runtime_cuda" in _LOADED_LIBS:
        return
    from tvm_ffi.libinfo import load_lib_ctypes

    runtime_dir = Path(_LOADED_LIBS["tvm_runtime"]._name).resolve().parent
    try:
        _LOADED_LIBS["tvm_runtime_cuda"] = load_lib_ctypes(package="tvm", target_name="tvm_runtime_cuda",
                                                           extra_lib_paths=[runtime_dir], mode="RTLD_LOCAL")
    except (OSError, RuntimeError) as exc:
        raise ArtifactError(f"TVM's CUDA runtime (libtvm_runtime_cuda) could not be loaded: {exc}") from None


FATBIN_CACHE_ENV = "SQUEEZER_CUDA_FATBINS"   # a folder of <arch>-<sha256 of the source>.fatbin
FATBIN_STATS = {"hit": 0, "nvcc": 0}          # kernel sources found compiled in that folder, compiled here


def fatbin_name(code: str, arch: str) -> str:
    return f"{arch}-{hashlib.sha256(code.encode()).hexdigest()}.fatbin"


def compile_fatbin(code: str, arch: str) -> bytes:
    """CUDA source -> fatbin for ``arch`` with nvcc (TVM's compiler library not needed)."""
    with tempfile.TemporaryDirectory(prefix="squeezer-cuda-") as tmp:
        src, out = Path(tmp) / "kernels.cu", Path(tmp) / "kernels.fatbin"
        src.write_text(code)
        proc = subprocess.run(["nvcc", "--fatbin", "-O3", f"-arch={arch}", "--expt-relaxed-constexpr",
                               "-o", str(out), str(src)], capture_output=True, text=True)
        if proc.returncode != 0:
            raise ArtifactError(f"nvcc failed to compile the module's CUDA kernels: {proc.stderr[-2000:]}")
        return out.read_bytes()


def _nvcc_compile(code: str) -> bytes:
    """CUDA source -> fatbin for the visible GPU: from the folder named by $SQUEEZER_CUDA_FATBINS
    when it holds this source compiled for this GPU's architecture (compiled ahead on a machine
    with nvcc and no GPU), else nvcc here."""
    from .target import gpu_arch

    arch = gpu_arch(tvm.cuda(0))
    cache = os.environ.get(FATBIN_CACHE_ENV)
    if cache and (Path(cache) / fatbin_name(code, arch)).is_file():
        FATBIN_STATS["hit"] += 1
        return (Path(cache) / fatbin_name(code, arch)).read_bytes()
    FATBIN_STATS["nvcc"] += 1
    return compile_fatbin(code, arch)


def load_kernel_library(path: Path):
    """A library exported by ``tvm.compile(...).export_library`` (standalone kernels), loaded with
    the CUDA runtime and kernel compiler that artifacts use."""
    _ensure_cuda_runtime()
    _register_cuda_compiler()
    return tvm.runtime.load_module(str(path))


def _register_cuda_compiler() -> None:
    """A CUDA module is exported as source and compiled for the GPU at load time. With the full
    TVM, tvm.support.nvcc does that; a runtime-only deploy lacks what it needs (targets), so
    there we compile with nvcc for the visible GPU's architecture."""
    from tvm import base

    if not base._RUNTIME_ONLY and not os.environ.get(FATBIN_CACHE_ENV):
        importlib.import_module("tvm.support.nvcc")
        return
    if shutil.which("nvcc") is None and not os.environ.get(FATBIN_CACHE_ENV):
        raise ArtifactError("loading a CUDA module with a runtime-only TVM needs nvcc on PATH to compile its kernels")
    import tvm_ffi

    tvm_ffi.register_global_func("tvm_callback_cuda_compile", _nvcc_compile, override=True)


def _device_for(target_kind: str):
    if target_kind == "cuda":
        _ensure_cuda_runtime()
        dev = tvm.cuda(0)
        if not dev.exist:
            raise ArtifactError("this module was built for CUDA but no CUDA GPU is visible on this machine")
        return dev
    return tvm.cpu(0)


def _to_numpy_list(out: Any) -> list[np.ndarray]:
    if hasattr(out, "numpy"):
        return [out.numpy()]
    return [a for o in out for a in _to_numpy_list(o)]


class RuntimeWeightSet:
    """The compressed layers' weights, kept out of ``model.so``: ``blobs`` is what the artifact
    stores (weight_codec encoding: relative-index CSR, cluster indices, Huffman), ``arrays`` the
    kernels' inputs rebuilt from it (``specs``: one per trailing parameter of ``main``).

    A fresh build keeps the layers' canonical forms and encodes them when first asked (``export``,
    ``weight_report``): a build that is only run or timed never pays for the Huffman coding."""

    def __init__(self, specs: list[dict], arrays: list[np.ndarray], *, blobs: dict | None = None,
                 layers: dict | None = None, embedded_bytes: int = 0) -> None:
        self.specs = specs
        self.arrays = arrays
        self.embedded_bytes = embedded_bytes      # weights still inside model.so (the uncompressed layers)
        self._blobs = blobs
        self._layers = layers

    @property
    def blobs(self) -> dict:
        if self._blobs is None:
            self._blobs = {key: weight_codec.encode_smallest(w) for key, w in self._layers.items()}
            self._layers = None
        return self._blobs

    @classmethod
    def from_build(cls, store, specs: list[dict], embedded_bytes: int) -> "RuntimeWeightSet":
        return cls(specs, [const.value.numpy() for const, _ in store.params], layers=dict(store.layers),
                   embedded_bytes=embedded_bytes)

    @classmethod
    def from_encoded(cls, specs: list[dict], blobs: dict, embedded_bytes: int) -> "RuntimeWeightSet":
        """Decode each layer, rebuild each kernel's arrays, and check them against the specs."""
        decoded = {key: weight_codec.decode(b) for key, b in blobs.items()}
        arrays, built = [], {}
        for spec in specs:
            if spec["layer"] not in decoded:
                raise ArtifactError(f"weights for layer {spec['layer']!r} are missing from {WEIGHTS}")
            k = (spec["layer"], spec["layout"], json.dumps(spec["options"], sort_keys=True))
            if k not in built:
                built[k] = weight_codec.layout(decoded[spec["layer"]], spec["layout"], **spec["options"])
            arr = built[k].get(spec["array"])
            if arr is None or list(arr.shape) != list(spec["shape"]) or str(arr.dtype) != spec["dtype"]:
                raise ArtifactError(f"decoded weight {spec['name']} does not match the compiled kernel "
                                    f"(expected {spec['dtype']}{spec['shape']})")
            arrays.append(np.ascontiguousarray(arr))
        return cls(specs, arrays, blobs=blobs, embedded_bytes=embedded_bytes)

    @property
    def encoded_bytes(self) -> int:
        return sum(b.nbytes for b in self.blobs.values())

    def report(self) -> dict:
        return {"encoded_bytes": self.encoded_bytes, "embedded_bytes": self.embedded_bytes,
                "deployable_bytes": self.encoded_bytes + self.embedded_bytes,
                "layers": {k: b.nbytes for k, b in self.blobs.items()}}


def cuda_source(module) -> str | None:
    """The CUDA C inside a compiled runtime module (found among its imports), or None."""
    stack = [module]
    while stack:
        m = stack.pop()
        if m.kind == "cuda":
            return m.inspect_source("cuda")
        stack.extend(m.imports)
    return None


@dataclass
class CompiledModule:
    """A compiled model: ``m(*inputs)`` -> numpy output (a tuple when the model has several)."""

    library: Any                         # tvm Executable (fresh build) or runtime Module (loaded)
    target: dict
    inputs: list[dict]
    outputs: list[dict]
    pipeline: list[str] = field(default_factory=list)
    versions: dict = field(default_factory=dict)
    source_path: str | None = None       # the model.so a loaded module came from (re-export copies it)
    weights: RuntimeWeightSet | None = None   # compressed layers' weights, passed to main after the inputs
    num_threads: int | None = None       # CPU threads per call (None: one per core this process may use)

    def __post_init__(self) -> None:
        self._device = None
        self._vm = None  # created on first use: a CUDA build exports fine on a machine without a GPU
        self._weight_tensors = None

    @property
    def device(self):
        if self._device is None:
            self._device = _device_for(self.target.get("kind", "llvm"))
        return self._device

    @property
    def vm(self) -> VirtualMachine:
        if self._vm is None:
            vm = VirtualMachine(self.library, self.device)
            if self.source_path is not None:   # loaded: the manifest must describe this library
                self._check_library(vm)
            self._vm = vm
        return self._vm

    def signature(self) -> dict:
        """The signature this module's manifest claims (``signature_of``)."""
        return signature_of(self.inputs, self.outputs, self.weights.specs if self.weights is not None else [])

    def _check_library(self, vm: VirtualMachine) -> None:
        """The manifest's inputs, outputs and weight parameters against the signature built into
        model.so (libraries built before it existed: ``main``'s parameter count)."""
        where = f"{Path(self.source_path).parent / MANIFEST} disagrees with {LIBRARY}"
        try:
            claimed = self.signature()
        except (KeyError, TypeError, ValueError) as exc:
            raise ArtifactError(f"{where}: malformed input/output/weight entry ({type(exc).__name__}: {exc})") from None
        if not vm.module.implements_function(SIGNATURE):
            arity, wanted = vm._get_function_arity("main"), len(claimed["inputs"]) + len(claimed["params"])
            if arity != wanted:
                raise ArtifactError(f"{where}: main takes {arity} argument(s), the manifest lists {wanted} "
                                    "(inputs + weights)")
            return
        try:
            built = json.loads(str(vm[SIGNATURE]()))
        except ValueError as exc:
            raise ArtifactError(f"{where}: its built-in signature is not JSON ({exc})") from None
        for key in ("inputs", "outputs", "params"):
            if built.get(key) != claimed[key]:
                raise ArtifactError(f"{where}: the manifest's {key} are {_describe(claimed[key])}, the library was "
                                    f"built for {_describe(built.get(key) or [])}")

    def kernel_source(self) -> str:
        """Generated device code: CUDA C for a CUDA build, LLVM IR for the CPU (for inspection)."""
        mod = self.library.mod if hasattr(self.library, "mod") else self.library
        cuda = cuda_source(mod)
        if cuda is not None:
            return cuda
        return mod.imports[0].inspect_source("ll") if mod.imports else ""

    # ---- running ---------------------------------------------------------------------------
    def _convert(self, args: Sequence[Any]) -> list:
        if len(args) != len(self.inputs):
            raise InputError(f"expected {len(self.inputs)} input(s) {[i['name'] for i in self.inputs]}, got {len(args)}")
        out = []
        for arg, spec in zip(args, self.inputs):
            if hasattr(arg, "detach") and hasattr(arg, "cpu"):  # a torch tensor
                arg = arg.detach().cpu().numpy()
            arr = np.ascontiguousarray(np.asarray(arg))
            if tuple(arr.shape) != tuple(spec["shape"]):
                raise InputError(f"input '{spec['name']}' has shape {tuple(arr.shape)}; this module was compiled "
                                 f"for {tuple(spec['shape'])}")
            if str(arr.dtype) != spec["dtype"]:
                raise InputError(f"input '{spec['name']}' has dtype {arr.dtype}; expected {spec['dtype']}")
            out.append(tvm.runtime.tensor(arr, self.device))
        return out

    def _weight_args(self) -> list:
        if self.weights is None:
            return []
        if self._weight_tensors is None:
            self._weight_tensors = [tvm.runtime.tensor(a, self.device) for a in self.weights.arrays]
        return self._weight_tensors

    def weight_report(self) -> dict:
        """Bytes of the deployable weights: the encoded compressed layers plus what model.so embeds."""
        if self.weights is None:
            return {"encoded_bytes": 0, "embedded_bytes": None, "deployable_bytes": None, "layers": {}}
        return self.weights.report()

    def __call__(self, *args: Any) -> np.ndarray | tuple[np.ndarray, ...]:
        threads.use_for(self.target.get("kind", "llvm"), self.num_threads)
        outs = _to_numpy_list(self.vm["main"](*self._convert(args), *self._weight_args()))
        return outs[0] if len(outs) == 1 else tuple(outs)

    def random_inputs(self, seed: int = 0) -> list[np.ndarray]:
        rng = np.random.default_rng(seed)
        return [rng.standard_normal(spec["shape"]).astype(spec["dtype"]) for spec in self.inputs]

    def benchmark(self, *args: Any, number: int = 20, repeat: int = 5, min_repeat_ms: int = 100) -> dict[str, float]:
        """TVM time evaluator on ``args`` (random inputs when none): per-call ms statistics."""
        for option, value, least in (("number", number, 1), ("repeat", repeat, 1), ("min_repeat_ms", min_repeat_ms, 0)):
            if isinstance(value, bool) or not isinstance(value, int) or value < least:
                raise InputError(f"benchmark: {option}={value!r} must be an integer >= {least}")
        tensors = self._convert(args or self.random_inputs())
        threads.use_for(self.target.get("kind", "llvm"), self.num_threads)
        timer = self.vm.time_evaluator("main", self.device, number=number, repeat=repeat, min_repeat_ms=min_repeat_ms)
        res = np.array(timer(*tensors, *self._weight_args()).results) * 1e3
        return {"median_ms": float(np.median(res)), "mean_ms": float(res.mean()), "min_ms": float(res.min()),
                "std_ms": float(res.std()), "repeat": repeat, "number": number}

    # ---- export ----------------------------------------------------------------------------
    def export(self, directory: str | Path) -> Path:
        """Write ``model.so`` (code + embedded weights), ``weights.bin`` (encoded compressed weights,
        when there are any) and ``manifest.json`` (each file's sha256, the weight index, and the
        digest that covers the manifest). Each file is written beside its final name and renamed
        into place, the manifest last: a process that has the old ``model.so`` mapped keeps its
        file, and a concurrent ``load`` sees the old artifact or the new one, never a mix."""
        d = Path(directory)
        try:
            d.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise ArtifactError(f"could not create {d}: {exc.strerror or exc}") from None
        staged: dict[str, Path] = {}
        try:
            staged[LIBRARY] = self._stage(d, LIBRARY, self._write_library)
            manifest = {"format": FORMAT, "target": self.target, "inputs": self.inputs, "outputs": self.outputs,
                        "pipeline": self.pipeline, "versions": self.versions, "files": {}}
            if self.weights is not None:
                index: dict = {}
                staged[WEIGHTS] = self._stage(d, WEIGHTS, lambda path: index.update(self._write_weights(path)))
                manifest["weights"] = {"file": WEIGHTS, "layers": index, "params": self.weights.specs,
                                       "embedded_bytes": self.weights.embedded_bytes}
            manifest["files"] = {name: {"sha256": sha256_of(path), "bytes": path.stat().st_size}
                                 for name, path in staged.items()}
            manifest["digest"] = manifest_digest(manifest)
            staged[MANIFEST] = self._stage(d, MANIFEST, lambda path: path.write_text(json.dumps(manifest, indent=2)))
            for name in (*[n for n in staged if n != MANIFEST], MANIFEST):
                os.replace(staged.pop(name), d / name)
        except OSError as exc:
            raise ArtifactError(f"could not write the module into {d}: {exc}") from exc
        finally:
            for leftover in staged.values():
                leftover.unlink(missing_ok=True)
        return d

    @staticmethod
    def _stage(d: Path, name: str, write) -> Path:
        path = d / f".{name}.{os.getpid()}.{uuid.uuid4().hex[:12]}.tmp"   # unique per export, threads too
        write(path)
        return path

    def _write_library(self, path: Path) -> None:
        try:
            if self.source_path is not None:
                shutil.copyfile(self.source_path, path)
            else:
                self.library.export_library(str(path))
        except RuntimeError as exc:
            raise ArtifactError(f"could not write {path.parent / LIBRARY}: {exc}") from exc

    def _write_weights(self, path: Path) -> dict:
        with open(path, "wb") as f:
            return weight_codec.write_blobs(self.weights.blobs, f)


LOAD_RETRY_S = 5.0   # how long a load keeps re-reading a directory that an export is rewriting


def load(directory: str | Path, *, num_threads: int | None = None) -> CompiledModule:
    """Load an exported directory, verifying the manifest's digest and every file's sha256 first.
    A mismatch seen while an export rewrites the directory (its staged files present, or the
    manifest changed underneath) is read again, for up to ``LOAD_RETRY_S`` seconds; any other
    mismatch is damage, and an error at once. ``num_threads``: CPU threads per call (threads.py)."""
    num_threads = threads.check(num_threads, "load")
    d = Path(directory)
    deadline, pause = time.monotonic() + LOAD_RETRY_S, 0.01
    while True:
        before = _manifest_bytes(d)
        try:
            return _load(d, num_threads)
        except ArtifactError:
            changing = _manifest_bytes(d) != before or _export_in_progress(d)
            if not changing or time.monotonic() > deadline:
                raise
            time.sleep(pause)
            pause = min(pause * 2, 0.2)


def _export_in_progress(d: Path) -> bool:
    """Staged files of an export (renamed into place one by one, the manifest last) are present."""
    return any(d.glob(".*.tmp"))


def _manifest_bytes(d: Path) -> bytes | None:
    try:
        return (d / MANIFEST).read_bytes()
    except OSError:
        return None


def _load(d: Path, num_threads: int | None = None) -> CompiledModule:
    if not d.is_dir():
        raise ArtifactError(f"{d} is not a directory (expected the output of CompiledModule.export)")
    mpath = d / MANIFEST
    if not mpath.exists():
        raise ArtifactError(f"{mpath} is missing: not an exported Squeezer module")
    try:
        manifest = json.loads(mpath.read_bytes().decode())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ArtifactError(f"{mpath} is corrupt (not valid JSON: {exc})") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise ArtifactError(f"{mpath} has format {manifest.get('format') if isinstance(manifest, dict) else None!r}; "
                            f"this version reads {FORMAT!r}")
    for key, kind in (("target", dict), ("inputs", list), ("outputs", list), ("files", dict)):
        if not isinstance(manifest.get(key), kind):
            raise ArtifactError(f"{mpath} lacks a valid '{key}' entry ({kind.__name__} expected)")
    if not isinstance(manifest["files"].get(LIBRARY), dict):
        raise ArtifactError(f"{mpath} does not list {LIBRARY} with its sha256: refusing to load unverified code")
    if manifest.get("digest") != manifest_digest(manifest):
        raise ArtifactError(f"{mpath} was edited or damaged: its content does not match its digest "
                            "(re-export the module; the manifest holds the weight index and the file hashes)")
    for name, info in manifest["files"].items():
        if not isinstance(info, dict):
            raise ArtifactError(f"{mpath}: entry for {name!r} must be an object with a sha256")
        path = d / name
        if not path.exists():
            raise ArtifactError(f"{path} is missing (listed in {MANIFEST})")
        digest = sha256_of(path)
        if digest != info.get("sha256"):
            raise ArtifactError(f"{path} is corrupt or was replaced: sha256 {digest[:12]}… does not match "
                                f"the manifest's {str(info.get('sha256'))[:12]}…")
    lib_path = d / LIBRARY
    if manifest["target"].get("kind") == "cuda":
        _ensure_cuda_runtime()
        _register_cuda_compiler()
    try:
        library = tvm.runtime.load_module(str(lib_path))
    except Exception as exc:  # noqa: BLE001
        raise ArtifactError(f"{lib_path} could not be loaded by the TVM runtime: {exc}") from exc
    weights = None
    if manifest.get("weights") is not None:
        info = manifest["weights"]
        if not isinstance(info, dict) or info.get("file") not in manifest["files"]:
            raise ArtifactError(f"{mpath}: the 'weights' entry must name a file listed (with its sha256) in 'files'")
        try:
            blobs = weight_codec.read_blobs(info["layers"], (d / info["file"]).read_bytes())
            weights = RuntimeWeightSet.from_encoded(info["params"], blobs, int(info.get("embedded_bytes", 0)))
        except (weight_codec.CodecError, KeyError, TypeError, ValueError) as exc:
            raise ArtifactError(f"{d / str(info.get('file'))} could not be decoded: {type(exc).__name__}: {exc}") from None
    module = CompiledModule(library, manifest["target"], manifest["inputs"], manifest["outputs"],
                            manifest.get("pipeline", []), manifest.get("versions", {}), source_path=str(lib_path),
                            weights=weights, num_threads=num_threads)
    if manifest["target"].get("kind") != "cuda":   # (a CUDA module is checked when its VM is made: needs a GPU)
        module.vm  # noqa: B018 - makes the VM, which checks the manifest against the library
    return module


def runtime_versions() -> dict[str, str]:
    import tvm_ffi

    return {"tvm": tvm.__version__, "tvm_ffi": getattr(tvm_ffi, "__version__", "?"), "python": platform.python_version()}
