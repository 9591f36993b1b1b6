"""`save` / `load`: a Graph (compressed or not, still fine-tunable) in one safetensors file, without
pickle. ``torch.save(graph.module)`` works too, but loading a pickle runs whatever code the file
names; this format runs none.

The file holds every tensor (parameters, buffers, constants, the example inputs) as safetensors
and, in its metadata, the structure as JSON: each module's class, its plain attributes (numbers,
strings, tuples, dtypes, ...) and the fx graph node by node. Loading rebuilds modules only from
classes in trusted packages (torch.nn, compiler, passes; more with ``trust=``), the way pickle
would (``__new__`` + ``__setstate__``) but with JSON values, and resolves the graph's call
targets within torch, operator, math and a few builtins, refusing any that reads or writes files
or runs code."""

from __future__ import annotations

import builtins
import importlib
import json
import math
import operator
import types
from pathlib import Path
from typing import Any, Callable, Iterable

import torch
from torch import fx, nn
from torch.fx.node import _get_qualified_name

from .errors import ArtifactError
from .graph import Graph

FORMAT = "squeezer-graph/1"
TRUSTED = ("torch.nn.", "compiler.", "passes.")          # packages whose module classes may be rebuilt
_SAFE_BUILTINS = {"getattr", "len", "int", "float", "bool", "abs", "min", "max", "slice", "range", "tuple", "list"}
_UNSAFE_WORDS = ("load", "save", "import", "exec", "eval", "compile", "open", "system", "hub", "package",
                 "pickle", "subprocess", "serializ", "storage", "file", "jit")
_BASE_KEYS = frozenset(nn.Module().__dict__)                # what nn.Module.__init__ makes: not saved
_HOOKS = sorted(k for k in _BASE_KEYS if "hook" in k and isinstance(nn.Module().__dict__[k], dict))


# ---- values -------------------------------------------------------------------------------------
def _callable_name(fn: Any, where: str) -> str:
    name = _get_qualified_name(fn)
    _resolve_function(name, where)          # refuse at save what load would refuse
    return name


def _resolve_function(name: str, where: str) -> Callable:
    """A call target by qualified name, within torch / operator / math / safe builtins only."""
    root, _, rest = name.partition(".")
    root = {"_operator": "operator"}.get(root, root)
    bad = next((w for w in _UNSAFE_WORDS if w in name.lower()), None)
    if root not in ("torch", "operator", "math", "builtins") or bad or not rest or (
            root == "builtins" and rest not in _SAFE_BUILTINS):
        raise ArtifactError(f"{where}: call target {name!r} is not one this format allows "
                            "(torch, operator, math and a few builtins; nothing that touches files or runs code)")
    obj: Any = {"torch": torch, "operator": operator, "math": math, "builtins": builtins}[root]
    for part in rest.split("."):
        obj = getattr(obj, part, None)
        if obj is None:
            raise ArtifactError(f"{where}: call target {name!r} does not exist in this torch")
    if not callable(obj):
        raise ArtifactError(f"{where}: call target {name!r} is not callable")
    return obj


class _Encoder:
    """Python values -> JSON, tensors -> keys of the safetensors file (each tensor once)."""

    def __init__(self) -> None:
        self.tensors: dict[str, torch.Tensor] = {}
        self._keys: dict[int, str] = {}
        self._storages: set[tuple[int, int]] = set()

    def tensor(self, t: torch.Tensor, key: str, where: str) -> str:
        if id(t) in self._keys:
            return self._keys[id(t)]
        if t.layout != torch.strided or t.is_quantized or t.device.type == "meta":
            raise ArtifactError(f"{where}: a {t.layout} / quantized / meta tensor cannot be saved")
        data = t.detach().cpu().contiguous()
        storage = (data.untyped_storage().data_ptr(), data.untyped_storage().nbytes())
        if data.numel() and storage in self._storages:     # a view of a tensor saved already
            data = data.clone()
        self._storages.add(storage)
        self.tensors[key] = data
        self._keys[id(t)] = key
        return key

    def value(self, v: Any, where: str) -> Any:
        if v is None or isinstance(v, (bool, int, str)):
            return v
        if isinstance(v, float):
            return v if math.isfinite(v) else {"float": repr(v)}
        if isinstance(v, torch.Tensor):
            return {"tensor": self.tensor(v, f"@const/{len(self.tensors)}", where)}
        if isinstance(v, fx.Node):
            return {"node": v.name}
        if isinstance(v, torch.Size):
            return {"size": list(v)}
        if isinstance(v, (tuple, list)):
            return {"tuple" if isinstance(v, tuple) else "list": [self.value(x, where) for x in v]}
        if isinstance(v, dict) and all(isinstance(k, str) for k in v):
            return {"dict": {k: self.value(x, f"{where}[{k!r}]") for k, x in v.items()}}
        if isinstance(v, slice):
            return {"slice": [self.value(x, where) for x in (v.start, v.stop, v.step)]}
        if v is Ellipsis:
            return {"ellipsis": True}
        if isinstance(v, (torch.dtype, torch.memory_format, torch.layout)):
            return {"torch": str(v).removeprefix("torch.")}
        if isinstance(v, torch.device):
            return {"device": str(v)}
        if isinstance(v, (types.FunctionType, types.BuiltinFunctionType)) or type(v).__name__ == "OpOverload":
            return {"function": _callable_name(v, where)}
        raise ArtifactError(f"{where}: a {type(v).__name__} cannot be saved without pickle "
                            "(numbers, strings, tuples, lists, dicts, dtypes, devices and tensors can)")


class _Decoder:
    """JSON -> Python values; each tensor key becomes one object (a parameter where one is one), so
    what was shared when saved is shared when loaded."""

    def __init__(self, tensors: dict[str, torch.Tensor]) -> None:
        self.tensors = tensors
        self.objects: dict[str, torch.Tensor] = {}
        self.env: dict[str, fx.Node] = {}

    def value(self, v: Any, where: str) -> Any:
        if not isinstance(v, dict):
            return v
        (tag, x), = v.items()
        if tag in ("tuple", "list"):
            items = [self.value(i, where) for i in x]
            return tuple(items) if tag == "tuple" else items
        if tag == "dict":
            return {k: self.value(i, where) for k, i in x.items()}
        simple = {"float": float, "size": torch.Size, "slice": lambda s: slice(*(self.value(i, where) for i in s)),
                  "ellipsis": lambda _: Ellipsis, "device": torch.device,
                  "function": lambda name: _resolve_function(name, where)}
        if tag in simple:
            return simple[tag](x)
        if tag == "torch":
            obj = getattr(torch, x, None)
            if not isinstance(obj, (torch.dtype, torch.memory_format, torch.layout)):
                raise ArtifactError(f"{where}: {x!r} is not a torch dtype, memory format or layout")
            return obj
        if tag == "tensor":
            return self.tensor(x, where)
        if tag == "node":
            if x not in self.env:
                raise ArtifactError(f"{where}: refers to node {x!r} before it is defined")
            return self.env[x]
        raise ArtifactError(f"{where}: unknown value tag {tag!r}")

    def tensor(self, key: str, where: str) -> torch.Tensor:
        if key not in self.objects:
            if key not in self.tensors:
                raise ArtifactError(f"{where}: tensor {key!r} is missing from the file")
            self.objects[key] = self.tensors[key]
        return self.objects[key]

    def parameters(self, records: list[dict]) -> None:
        """Every parameter first, so a buffer or attribute naming the same tensor gets the Parameter."""
        for rec in records:
            for p in rec["params"].values():
                if p is not None and p["tensor"] not in self.objects:
                    t = self.tensor(p["tensor"], f"module {rec['path']!r}")
                    self.objects[p["tensor"]] = nn.Parameter(t, requires_grad=p["requires_grad"])


# ---- modules ------------------------------------------------------------------------------------
def _refuse_hooks(m: nn.Module, where: str) -> None:
    hooks = [k for k in _HOOKS if getattr(m, k, None)]
    if hooks:
        raise ArtifactError(f"{where} has {', '.join(hooks)}: hooks are code and cannot be saved without pickle")


def _module_record(path: str, m: nn.Module, enc: _Encoder) -> dict:
    where = f"module {path!r} ({type(m).__name__})"
    _refuse_hooks(m, where)
    params = {}
    for name, p in m._parameters.items():
        if p is not None and type(p) is not nn.Parameter:
            raise ArtifactError(f"{where}: parameter {name!r} is a {type(p).__name__}, not a plain nn.Parameter")
        params[name] = None if p is None else {"tensor": enc.tensor(p, f"{path}.{name}".lstrip("."), where),
                                               "requires_grad": p.requires_grad}
    buffers = {name: None if b is None else enc.tensor(b, f"{path}.{name}".lstrip("."), where)
               for name, b in m._buffers.items()}
    return {"path": path, "class": f"{type(m).__module__}:{type(m).__qualname__}", "training": m.training,
            "params": params, "buffers": buffers, "non_persistent": sorted(m._non_persistent_buffers_set),
            "none_children": [k for k, c in m._modules.items() if c is None],
            "attrs": {k: enc.value(v, f"{where}.{k}") for k, v in m.__dict__.items() if k not in _BASE_KEYS}}


def _module_class(name: str, trusted: tuple[str, ...]) -> type:
    module_name, _, qualname = name.partition(":")
    if not any(f"{module_name}.".startswith(t) for t in trusted):
        raise ArtifactError(f"module class {name!r} is not in a trusted package {list(trusted)}; "
                            f"load(..., trust=[{module_name.split('.')[0] + '.'!r}]) if you trust it")
    try:
        obj: Any = importlib.import_module(module_name)
        for part in qualname.split("."):
            obj = getattr(obj, part)
    except (ImportError, AttributeError) as exc:
        raise ArtifactError(f"module class {name!r} cannot be found: {exc}") from None
    if not (isinstance(obj, type) and issubclass(obj, nn.Module)):
        raise ArtifactError(f"{name!r} is not an nn.Module class")
    return obj


def _rebuild_module(rec: dict, dec: _Decoder, trusted: tuple[str, ...]) -> nn.Module:
    """As pickle would: ``__new__`` then ``__setstate__``, with the state decoded from JSON."""
    cls = _module_class(rec["class"], trusted)
    where = f"module {rec['path']!r} ({cls.__name__})"
    state = dict(nn.Module().__dict__)
    state.update(training=rec["training"], _modules={k: None for k in rec["none_children"]},
                 _parameters={k: None if p is None else dec.tensor(p["tensor"], where) for k, p in rec["params"].items()},
                 _buffers={k: None if key is None else dec.tensor(key, where) for k, key in rec["buffers"].items()},
                 _non_persistent_buffers_set=set(rec["non_persistent"]))
    state.update({k: dec.value(v, f"{where}.{k}") for k, v in rec["attrs"].items()})
    m = cls.__new__(cls)
    m.__setstate__(state)
    return m


# ---- the graph ----------------------------------------------------------------------------------
def _node_record(node: fx.Node, enc: _Encoder) -> dict:
    where = f"node {node.name!r}"
    if node.op == "call_function":
        target: Any = {"function": _callable_name(node.target, where)}
    elif node.op == "call_method" and (node.target.startswith("_") or any(w in node.target for w in _UNSAFE_WORDS)):
        raise ArtifactError(f"{where}: method {node.target!r} is not one this format allows")
    else:
        target = node.target
    return {"name": node.name, "op": node.op, "target": target, "args": enc.value(node.args, where),
            "kwargs": enc.value(node.kwargs, where)}


def _rebuild_graph(nodes: list[dict], dec: _Decoder) -> fx.Graph:
    g = fx.Graph()
    for rec in nodes:
        where = f"node {rec.get('name')!r}"
        op, target = rec["op"], rec["target"]
        if op not in ("placeholder", "get_attr", "call_function", "call_method", "call_module", "output"):
            raise ArtifactError(f"{where}: unknown op {op!r}")
        if op == "call_function":
            target = dec.value(target, where)
        elif not isinstance(target, str) or (op == "call_method" and (
                target.startswith("_") or any(w in target for w in _UNSAFE_WORDS))):
            raise ArtifactError(f"{where}: target {target!r} is not allowed for a {op} node")
        node = g.create_node(op, target, dec.value(rec["args"], where), dec.value(rec["kwargs"], where),
                             name=rec["name"])
        dec.env[rec["name"]] = node
    g.lint()
    return g


# ---- the API ------------------------------------------------------------------------------------
def save(graph: Graph, path: str | Path) -> Path:
    """Write ``graph`` (module structure, weights, example inputs, history) to one safetensors file
    that ``compiler.load`` reads back without pickle. The per-pass reports are not kept."""
    from safetensors.torch import save_file

    if not isinstance(graph, Graph):
        raise ArtifactError(f"save() needs a compiler.Graph, got {type(graph).__name__}")
    gm, enc = graph.module, _Encoder()
    _refuse_hooks(gm, "the graph module")
    seen: dict[int, str] = {}
    modules = []
    for path_, m in gm.named_modules(remove_duplicate=False):
        if path_ == "":
            continue
        modules.append({"path": path_, "same_as": seen[id(m)]} if id(m) in seen else _module_record(path_, m, enc))
        seen.setdefault(id(m), path_)
    root = _module_record("", nn.Module(), enc)     # the GraphModule's own tensors, without its fx internals
    root["params"] = {k: {"tensor": enc.tensor(p, k, "root"), "requires_grad": p.requires_grad}
                      for k, p in gm._parameters.items() if p is not None}
    root["buffers"] = {k: enc.tensor(b, k, "root") for k, b in gm._buffers.items() if b is not None}
    root["non_persistent"] = sorted(gm._non_persistent_buffers_set)
    root["training"] = gm.training
    root["attrs"] = {n.target: enc.value(getattr(gm, n.target), f"get_attr {n.target!r}") for n in gm.graph.nodes
                     if n.op == "get_attr" and "." not in n.target and n.target not in gm._parameters
                     and n.target not in gm._buffers and n.target not in gm._modules}
    structure = {"format": FORMAT, "class_name": type(gm).__name__, "root": root, "modules": modules,
                 "graph": [_node_record(n, enc) for n in gm.graph.nodes], "history": list(graph.history),
                 "example_inputs": [enc.tensor(t, f"@example/{i}", "example input") for i, t in
                                    enumerate(graph.example_inputs)]}
    out = Path(path)
    try:
        save_file(enc.tensors, str(out), metadata={"format": FORMAT, "structure": json.dumps(structure)})
    except OSError as exc:
        raise ArtifactError(f"could not write {out}: {exc.strerror or exc}") from None
    return out


def _read(path: Path) -> tuple[dict, dict[str, torch.Tensor]]:
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except FileNotFoundError:
        raise ArtifactError(f"{path} does not exist") from None
    except (SafetensorError, OSError, ValueError) as exc:
        raise ArtifactError(f"{path} is not a safetensors file ({exc})") from None
    if meta.get("format") != FORMAT:
        raise ArtifactError(f"{path} holds format {meta.get('format')!r}; this version reads {FORMAT!r} "
                            "(files of compiler.save)")
    try:
        return json.loads(meta["structure"]), tensors
    except (KeyError, ValueError) as exc:
        raise ArtifactError(f"{path}: its structure is missing or not JSON ({exc})") from None


def load(path: str | Path, *, trust: Iterable[str] = ()) -> Graph:
    """Read a file of ``compiler.save`` back into a Graph (on the CPU), running no code from it:
    module classes come from torch.nn, compiler, passes or the packages named in ``trust``
    (e.g. ``trust=["mymodels."]`` for your own leaf modules)."""
    path = Path(path)
    structure, tensors = _read(path)
    trusted = (*TRUSTED, *trust)
    dec = _Decoder(tensors)
    try:
        records = [r for r in structure["modules"] if "same_as" not in r]
        dec.parameters([structure["root"], *records])
        root = _rebuild_module({**structure["root"], "class": "torch.nn.modules.module:Module"}, dec, trusted)
        built: dict[str, nn.Module] = {}
        for rec in structure["modules"]:
            built[rec["path"]] = built[rec["same_as"]] if "same_as" in rec else _rebuild_module(rec, dec, trusted)
            parent, _, name = rec["path"].rpartition(".")
            (built[parent] if parent else root)._modules[name] = built[rec["path"]]
        gm = fx.GraphModule(root, _rebuild_graph(structure["graph"], dec), structure["class_name"])
        # fx copied only what the graph names, into fresh containers: take the saved tree whole
        gm._modules.update(root._modules)
        gm._parameters, gm._buffers = dict(root._parameters), dict(root._buffers)
        gm._non_persistent_buffers_set = set(root._non_persistent_buffers_set)
        gm.training = root.training
        inputs = tuple(dec.tensor(k, "example input") for k in structure["example_inputs"])
        history = [str(h) for h in structure["history"]]
    except ArtifactError as exc:
        raise ArtifactError(f"{path}: {exc}") from None
    except (KeyError, TypeError, ValueError, AttributeError, RuntimeError) as exc:
        raise ArtifactError(f"{path}: malformed structure ({type(exc).__name__}: {exc})") from None
    graph = Graph(gm, inputs, history)
    graph.propagate_shapes()
    return graph
