"""Graph -> Relax: torch.export of the graph's module, then TVM's exported-program importer with
the lowerings of our compressed ops. Errors name the op or node that could not be imported."""

from __future__ import annotations

import re
from dataclasses import dataclass

import numpy as np
import torch
import tvm
import tvm.relax.frontend.torch  # noqa: F401 - registers the torch frontend
from tvm.relax.frontend.torch import from_exported_program

from compiler.errors import BuildError, OptionError, last_line
from compiler.graph import Graph, flatten_tensors

from .lowering import custom_convert_map, missing_lowerings
from .lowering.attention import decompose
from .lowering.context import LoweringContext, RuntimeWeights, exported_constants
from .options import BuildOptions


@dataclass(frozen=True)
class TensorSpec:
    name: str
    shape: tuple[int, ...]
    dtype: str

    def to_dict(self) -> dict:
        return {"name": self.name, "shape": list(self.shape), "dtype": self.dtype}


def export_graph(graph: Graph) -> torch.export.ExportedProgram:
    """torch.export of the graph's module in eval mode (BatchNorm/dropout in inference form); every
    submodule's training flag is restored afterwards. No copy: export reads the module."""
    module = graph.module
    flags = [(m, m.training) for m in module.modules()]
    module.eval()
    try:
        wrapped = _TensorsOf(module) if _dict_output(graph) is not None else module   # dict: tensors by sorted key
        return _views_as_reshapes(torch.export.export(wrapped, tuple(graph.example_inputs)))
    except Exception as exc:  # noqa: BLE001
        raise BuildError(f"torch.export could not capture the graph: {type(exc).__name__}: "
                         f"{str(exc).splitlines()[0] if str(exc) else ''}") from exc
    finally:
        for m, flag in flags:
            m.training = flag


def _views_as_reshapes(ep: torch.export.ExportedProgram) -> torch.export.ExportedProgram:
    """Every ``aten.view`` becomes ``aten.reshape`` (the same values in a functional graph).
    torch.export elides a ``.contiguous()`` that its fake strides call a no-op, but TVM's importer
    decomposes the graph again (SDPA into matmuls) and the strides change: GPT-2's
    ``attn.reshape(...).contiguous()`` then ``x.view(-1, n)`` in Conv1D fails as a view there."""
    for node in ep.graph.nodes:
        if node.op == "call_function" and node.target is torch.ops.aten.view.default:
            node.target = torch.ops.aten.reshape.default
    ep.graph_module.recompile()
    return ep


def _layers_using(ep: torch.export.ExportedProgram, ops: list[str]) -> list[str]:
    """Module paths (from torch.export's nn_module_stack) of the nodes calling any of ``ops``."""
    layers = []
    for n in ep.graph.nodes:
        if n.op == "call_function" and any(op in str(n.target) for op in ops):
            stack = n.meta.get("nn_module_stack") or {}
            path = list(stack.values())[-1][0] if stack else "<top level>"
            layers.append(path or "<top level>")
    return sorted(set(layers)) or ["<unknown>"]


def lift_runtime_weights(mod: tvm.IRModule, store) -> tuple[tvm.IRModule, list[dict], int]:
    """Replace the constants registered in ``store`` (lowering/__init__.py: RuntimeWeights) by new
    trailing parameters of ``main``; returns the module, their specs in order, and the bytes of the
    constants left embedded (the weights that are not compressed)."""
    from tvm import relax

    pairs = []
    for i, (const, spec) in enumerate(store.params):
        pairs.append((const, relax.Var(f"w{i}_" + re.sub(r"\W", "_", spec["name"]),
                                       relax.TensorType(spec["shape"], spec["dtype"]))))
    embedded = [0]

    @relax.expr_functor.mutator
    class _Lift(relax.PyExprMutator):
        def visit_generic_const_(self, op):
            for const, var in pairs:
                if op.same_as(const) or op.value.same_as(const.value):
                    return var
            embedded[0] += int(np.prod(op.value.shape)) * np.dtype(str(op.value.dtype)).itemsize
            return op

    func = mod["main"]
    body = _Lift(mod).visit_expr(func.body)
    free = list(relax.analysis.free_vars(body))
    lost = [spec["name"] for (_, spec), (_, v) in zip(store.params, pairs) if not any(v.same_as(f) for f in free)]
    if lost:
        raise BuildError(f"internal: runtime weight(s) {lost} were copied during import and cannot be lifted")
    new = relax.Function(list(func.params) + [v for _, v in pairs], body, func.ret_ty, func.is_pure, func.attrs)
    mod = tvm.IRModule(dict(mod.functions), attrs=mod.attrs)
    mod.update_func(mod.get_global_var("main"), new)
    return mod, [spec for _, spec in store.params], embedded[0]


class _TensorsOf(torch.nn.Module):
    """A graph module whose output is a dict, returning its tensors as a tuple (sorted keys, as
    ``compiler.graph.flatten_tensors`` orders them)."""

    def __init__(self, module: torch.nn.Module) -> None:
        super().__init__()
        self.module = module

    def forward(self, *inputs):
        return tuple(flatten_tensors(self.module(*inputs)))


def _dict_output(graph: Graph) -> list[str] | None:
    """The sorted keys of a flat dict of tensors the graph returns (None for other outputs)."""
    out = next(n for n in graph.module.graph.nodes if n.op == "output")
    if "type" not in out.meta:   # a Graph assembled without compiler.trace: record the shapes once
        graph.propagate_shapes()
    meta = out.meta.get("tensor_meta")
    if not isinstance(meta, dict) or not all(hasattr(m, "shape") for m in meta.values()):
        return None
    return sorted(meta)


def _output_specs(graph: Graph) -> list[TensorSpec]:
    """The model's outputs from the shapes tracing recorded on the output node (no extra run); a
    dict's are named by their keys."""
    out = next(n for n in graph.module.graph.nodes if n.op == "output")
    keys = _dict_output(graph)
    metas = _flatten_meta(out.meta.get("tensor_meta"))
    kind = out.meta.get("type")
    if isinstance(out.meta.get("tensor_meta"), dict) and keys is None or not metas:
        name = "dict" if isinstance(kind, type) and issubclass(kind, dict) else getattr(kind, "__name__", str(kind))
        raise BuildError(f"model output of type {name} is not supported; return a tensor, a tuple of tensors "
                         "or a flat dict of tensors")
    names = keys or [f"output{i}" for i in range(len(metas))]
    return [TensorSpec(n, tuple(m.shape), str(m.dtype).replace("torch.", "")) for n, m in zip(names, metas)]


def _flatten_meta(meta) -> list:
    """TensorMetadata leaves of an output's ``tensor_meta``, in order (as compiler.graph.flatten_tensors)."""
    if hasattr(meta, "shape") and hasattr(meta, "dtype"):
        return [meta]
    if isinstance(meta, (tuple, list)):
        return [m for item in meta for m in _flatten_meta(item)]
    if isinstance(meta, dict):
        return [m for k in sorted(meta) for m in _flatten_meta(meta[k])]
    return []


def _check_lowerings(ep) -> None:
    used = {n.target.name().split("::", 1)[1] for n in ep.graph.nodes
            if n.op == "call_function" and hasattr(n.target, "name") and n.target.name().startswith("squeezer::")}
    missing = sorted(used & set(missing_lowerings()))
    if missing:
        raise BuildError(f"no TVM lowering registered for compressed op(s) {missing} "
                         f"(used by layer(s) {_layers_using(ep, missing)})")


def import_graph(graph: Graph, options: BuildOptions | None = None, weights: RuntimeWeights | None = None
                 ) -> tuple[tvm.IRModule, list[TensorSpec], list[TensorSpec]]:
    """Relax module plus input and output specs. Compressed layers register their runtime weights
    in ``weights`` (lifted to parameters by :func:`lift_runtime_weights`); without a store they
    stay constants. ``options`` default to the host CPU's."""
    options = options or BuildOptions.create("llvm")
    ep = export_graph(graph)
    _check_lowerings(ep)
    ctx = LoweringContext(options, exported_constants(ep), weights if weights is not None else RuntimeWeights())
    try:
        mod = from_exported_program(decompose(ep, options), custom_convert_map=custom_convert_map(ctx),
                                    run_ep_decomposition=False)
    except (BuildError, OptionError):
        raise
    except Exception as exc:  # noqa: BLE001
        msg = str(exc)
        unsupported = re.findall(r"Unsupported function types? \[?([^\]\n]+)", msg)
        if unsupported:
            ops = [o.strip(" '\"") for o in unsupported[0].split(",")]
            detail = f"unsupported torch op(s) {ops} in layer(s) {_layers_using(ep, ops)}"
        else:
            detail = f"{type(exc).__name__}: {last_line(exc)}"
        raise BuildError(f"TVM could not import the exported graph — {detail}. Mark the layer as a leaf "
                         "and replace it, or open an issue with the op name.") from exc
    placeholders = [n.name for n in graph.module.graph.nodes if n.op == "placeholder"]
    inputs = [TensorSpec(name, tuple(t.shape), str(t.dtype).replace("torch.", ""))
              for name, t in zip(placeholders, graph.example_inputs)]
    outputs = _output_specs(graph)
    _check_output_shapes(mod, outputs)
    return mod, inputs, outputs


def _check_output_shapes(mod: tvm.IRModule, outputs: list[TensorSpec]) -> None:
    """The imported module returns what the model does: a shape TVM's importer got wrong is a
    BuildError here, not a module whose results are silently misplaced."""
    ret = mod["main"].ret_ty
    fields = list(ret.fields) if hasattr(ret, "fields") else [ret]
    got = [tuple(int(d) for d in f.shape) if getattr(f, "shape", None) is not None else None for f in fields]
    want = [tuple(int(d) for d in o.shape) for o in outputs]
    if len(got) != len(want) or any(g is not None and g != w for g, w in zip(got, want)):
        raise BuildError(f"TVM's import of the graph returns shapes {got} where the model returns {want}: an op "
                         "was imported wrongly. Mark the layer as a leaf and replace it, or open an issue.")
