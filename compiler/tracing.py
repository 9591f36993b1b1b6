"""`trace`: capture an nn.Module with torch.fx at module level and record shapes on every node."""

from __future__ import annotations

import copy
import inspect
import operator
import re
import traceback
from typing import Any, Iterable, Sequence

import torch
from torch import fx, nn

from .concrete_tracing import ConcreteTracing, model_line
from .errors import ModelRunError, TraceError
from .op_table import is_named_leaf
from .graph import Graph
from .ops.library import CompressedLayer
from .ops.recurrent import UnrolledRecurrent, unroll_recurrent

_HINT = ("Mark the offending module as a leaf (trace(..., leaf_modules=[MyBlock] or ['path.to.block'])) "
         "or fix the argument that drives the branch (trace(..., concrete_args={'flag': False})).")


class _Tracer(ConcreteTracing, fx.Tracer):
    """An fx Tracer that keeps user leaves and compressed layers whole, knows where it is, and
    specializes shape-dependent Python code on the example input (``compiler.concrete_tracing``)."""

    def __init__(self, leaf_types: tuple[type, ...] = (), leaf_names: set[str] | frozenset[str] = frozenset()) -> None:
        # (defaults: torch.fx re-creates the graph's tracer class with no arguments when a pickled
        # GraphModule is loaded, and re-traces its code with every module a leaf)
        super().__init__()
        self.leaf_types = leaf_types
        self.leaf_names = leaf_names
        self.failed_in: str | None = None

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        # compressed layers and training-time layers of passes (``squeezer_leaf = True``, e.g. the
        # STE layers of binarization) are one call_module node, as the passes that made them expect
        if isinstance(m, CompressedLayer) or getattr(m, "squeezer_leaf", False) or qualname in self.leaf_names \
                or is_named_leaf(m):
            return True
        if self.leaf_types and isinstance(m, self.leaf_types):
            return True
        return super().is_leaf_module(m, qualname)

    def call_module(self, m: nn.Module, forward: Any, args: Any, kwargs: Any) -> Any:
        try:
            return super().call_module(m, forward, args, kwargs)
        except Exception:
            if self.failed_in is None:  # the innermost module wins
                self.failed_in = self.path_of_module(m)
            raise




def _inline_concrete_args(fx_graph: fx.Graph, concrete_args: dict[str, Any]) -> None:
    """fx keeps a placeholder (and an assert) per concrete arg; substitute the value and drop them,
    so the traced module takes exactly the tensor inputs."""
    for node in list(fx_graph.nodes):
        if node.op != "placeholder":
            continue
        base = re.sub(r"_\d+$", "", node.target)
        key = node.target if node.target in concrete_args else base if base in concrete_args else None
        if key is None:
            continue
        value = concrete_args[key]
        for user in list(node.users):
            user.args = fx.node.map_arg(user.args, lambda a: value if a is node else a)
            user.kwargs = fx.node.map_arg(user.kwargs, lambda a: value if a is node else a)
        fx_graph.erase_node(node)
    for node in reversed(list(fx_graph.nodes)):  # drop the now-constant specialization asserts
        cond = node.args[0] if node.op == "call_function" and node.target is torch._assert and node.args else None
        if isinstance(cond, fx.Node) and cond.op == "call_function" and not cond.all_input_nodes:
            fx_graph.erase_node(node)
            if not cond.users:
                fx_graph.erase_node(cond)


def _arguments(model: nn.Module, example_inputs: tuple, concrete_args: dict[str, Any]) -> tuple[dict, dict, bool]:
    """``concrete_args`` completed with the defaults of the parameters after those the example
    inputs fill (``attention_mask=None``: the branch taken without it), the example input of each
    remaining parameter by name, and whether ``forward`` takes ``*args`` or ``**kwargs``."""
    signature = inspect.signature(model.forward).parameters.values()
    variadic = any(p.kind in (p.VAR_KEYWORD, p.VAR_POSITIONAL) for p in signature)
    params = [p for p in signature if p.name not in concrete_args]
    positional = [p for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    inputs = {p.name: t for p, t in zip(positional, example_inputs)}
    star = next((p for p in params if p.kind == p.VAR_POSITIONAL), None)
    if star is not None and len(example_inputs) > len(positional):   # forward(self, *xs): xs_0, xs_1, ...
        inputs.update({f"{star.name}_{k}": t for k, t in enumerate(example_inputs[len(positional):])})
    filled = dict(concrete_args)
    for p in positional[len(example_inputs):]:
        if p.default is not p.empty:
            filled[p.name] = p.default
    return filled, inputs, variadic


def _explicit_forward(model: nn.Module, names: list[str], fixed: dict[str, Any]) -> None:
    """fx cannot trace a ``forward(..., **kwargs)`` (Hugging Face models): give the traced copy a
    class whose ``forward`` takes just the example inputs by name and calls the original with them
    and ``fixed`` (``trace`` puts the original class back)."""
    cls = type(model)
    if not all(n.isidentifier() for n in names):
        raise TraceError(f"cannot trace {cls.__name__}: its forward's inputs {names} are not plain names")
    if not names:
        raise TraceError(f"cannot trace {cls.__name__}: no example inputs to trace its forward with")
    scope = {"_forward": cls.forward, "_fixed": fixed}
    params = ", ".join(names)
    named = [p.name for p in inspect.signature(cls.forward).parameters.values()
             if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD) and p.name != "self"]
    if any(n not in named for n in names):   # inputs for *args: everything before them positionally
        if any(n in fixed for n in named):
            raise TraceError(f"cannot trace {cls.__name__}: concrete_args fix {sorted(set(named) & set(fixed))}, "
                             "which come before its *args inputs")
        call = params
    else:
        call = ", ".join(f"{n}={n}" for n in names)
    exec(f"def forward(self, {params}):\n    return _forward(self, {call}, **_fixed)", scope)
    model.__class__ = type(cls.__name__, (cls,), {"forward": scope["forward"], "__module__": cls.__module__})


def _guard_input_shapes(fx_graph: fx.Graph, example_inputs: tuple, where: list[str]) -> None:
    """Assert, first thing, that every input has the shape the graph was specialized for."""
    placeholders = [n for n in fx_graph.nodes if n.op == "placeholder"]
    lines = "; ".join(where[:3]) + (f" and {len(where) - 3} more" if len(where) > 3 else "")
    anchor = placeholders[-1] if placeholders else None
    for node, t in zip(placeholders, example_inputs):
        message = (f"this graph was traced for input '{node.target}' of shape {tuple(t.shape)}: the model's code "
                   f"depends on input shapes at {lines}; trace it again with an example of the new shape")
        with fx_graph.inserting_after(anchor):
            shape = fx_graph.call_method("size", (node,))   # (getattr is not a target a saved graph may name)
        with fx_graph.inserting_after(shape):
            same = fx_graph.call_function(operator.eq, (shape, tuple(t.shape)))
        with fx_graph.inserting_after(same):
            anchor = fx_graph.call_function(torch._assert, (same, message))


def _shapes_as_size_calls(fx_graph: fx.Graph) -> None:
    """``x.shape`` recorded as ``x.size()`` (the same torch.Size): a saved graph may not name
    ``getattr`` as a call target (compiler.serialization)."""
    for node in fx_graph.nodes:
        if node.op == "call_function" and node.target is getattr and node.args[1:] == ("shape",):
            node.op, node.target, node.args = "call_method", "size", (node.args[0],)


def _drop_string_annotations(fx_graph: fx.Graph) -> None:
    """A ``forward`` annotated under ``from __future__ import annotations`` gives fx string types
    (``'torch.Tensor'``), which it puts into the generated code's globals as str: pickling the
    module then fails in fx's import block. The types only decorate the code; drop them."""
    for node in fx_graph.nodes:
        if isinstance(node.type, str):
            node.type = None


def _drop_unused_attributes(fx_graph: fx.Graph) -> None:
    """A weight read only for its dtype or device (resolved while tracing) leaves a get_attr
    nobody uses; a pass replacing the layer that held it would leave it dangling."""
    for node in list(fx_graph.nodes):
        if node.op == "get_attr" and not node.users:
            fx_graph.erase_node(node)


def trace(model: nn.Module, example_inputs: Sequence[torch.Tensor] | torch.Tensor, *,
          leaf_modules: Iterable[type | str] = (), concrete_args: dict[str, Any] | None = None) -> Graph:
    """Trace ``model`` into a :class:`Graph` and record shape/dtype of every node.

    ``leaf_modules`` (module types or qualified names) are kept as opaque calls; ``concrete_args``
    fixes non-tensor arguments of ``forward`` (e.g. flags that select a branch).
    """
    if not isinstance(model, nn.Module):
        raise TraceError(f"trace() needs a torch.nn.Module, got {type(model).__name__}")
    if isinstance(example_inputs, torch.Tensor):
        example_inputs = (example_inputs,)
    example_inputs = tuple(example_inputs)
    for i, t in enumerate(example_inputs):
        if not isinstance(t, torch.Tensor):
            raise TraceError(f"example input {i} is a {type(t).__name__}; trace() needs tensors "
                             "(fix other arguments with concrete_args)")
    leaf_types = tuple(x for x in leaf_modules if isinstance(x, type))
    leaf_names = {x for x in leaf_modules if isinstance(x, str)}
    known = {name for name, _ in model.named_modules()}
    unknown = sorted(leaf_names - known)
    if unknown:
        raise TraceError(f"leaf_modules names {unknown} are not submodules of {type(model).__name__}")

    model = copy.deepcopy(model)  # the Graph owns its weights: fine-tuning it never edits the caller's model
    # recurrent layers as Linear gates (compiler/ops/recurrent.py) unless kept whole as leaves
    kept = lambda name, m: name in leaf_names or isinstance(m, leaf_types)  # noqa: E731
    if type(model) in (nn.LSTM, nn.GRU, nn.RNN) and not isinstance(model, leaf_types):
        model = UnrolledRecurrent(model)
    unroll_recurrent(model, kept)
    buffers = {name: b.clone() for name, b in model.named_buffers()}   # tracing runs the model once: undo its
    tracer = _Tracer(leaf_types, leaf_names)                           # side effects (BatchNorm statistics)
    given = dict(concrete_args or {})
    concrete_args, inputs, variadic = _arguments(model, example_inputs, given)
    original_class = type(model)
    if variadic:   # the inputs by name, the rest fixed to what the caller gave or the defaults
        _explicit_forward(model, list(inputs), given)
        concrete_args = {}
    tracer.start(model, inputs)
    try:
        with torch.no_grad(), torch.random.fork_rng(devices=[]):   # nor draw from the caller's random stream
            fx_graph = tracer.trace(model, concrete_args=concrete_args or None)
    except Exception as exc:  # noqa: BLE001 - re-raised with the module and line at fault
        where = tracer.failed_in or "<top level>"
        at = model_line(traceback.extract_tb(exc.__traceback__))
        raise TraceError(
            f"cannot trace {original_class.__name__}: in module '{where}' at {at}: "
            f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}\n{_HINT}") from exc
    finally:
        model.__class__ = original_class
    with torch.no_grad():
        for name, b in model.named_buffers():
            if name in buffers and b.shape == buffers[name].shape:
                b.copy_(buffers[name])
    _inline_concrete_args(fx_graph, concrete_args or {})
    _shapes_as_size_calls(fx_graph)
    _drop_string_annotations(fx_graph)
    _drop_unused_attributes(fx_graph)
    if tracer.specialized:
        _guard_input_shapes(fx_graph, example_inputs, tracer.specialized)
    gm = fx.GraphModule(tracer.root, fx_graph, type(model).__name__)
    gm.training = model.training  # submodules keep their own flags
    graph = Graph(gm, example_inputs)
    try:
        graph.propagate_shapes()
    except ModelRunError as exc:  # a wrong input shape, usually: say which model, inputs and node
        shapes = ", ".join(f"{tuple(t.shape)} {str(t.dtype).replace('torch.', '')}" for t in example_inputs)
        raise ModelRunError(f"model {type(model).__name__} fails on its example input(s) [{shapes}]: {exc}") \
            from exc.__cause__
    return graph
