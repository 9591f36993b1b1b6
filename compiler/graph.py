"""`Graph`: the one IR every pass and the codegen share — an fx.GraphModule plus facts about it."""

from __future__ import annotations

import contextlib
import copy
from dataclasses import dataclass, field
from typing import Any, Iterator

import networkx as nx
import torch
from torch import fx
from torch.fx.node import map_aggregate
from torch.fx.passes.shape_prop import ShapeProp, _extract_tensor_metadata

from .coupling import coupling_groups
from .errors import ModelRunError


@contextlib.contextmanager
def inference_mode(module: torch.nn.Module) -> Iterator[None]:
    """eval() + no_grad for the duration, then every submodule's own training flag restored
    (a frozen BatchNorm inside a training model stays frozen)."""
    flags = [(m, m.training) for m in module.modules()]
    module.eval()
    try:
        with torch.no_grad():
            yield
    finally:
        for m, flag in flags:
            m.training = flag


def flatten_tensors(out: Any) -> list[torch.Tensor]:
    """Tensors of a model output (a tensor, or nested tuples/lists/dicts of them), in order."""
    if isinstance(out, torch.Tensor):
        return [out]
    if isinstance(out, (tuple, list)):
        return [t for o in out for t in flatten_tensors(o)]
    if isinstance(out, dict):
        return [t for k in sorted(out) for t in flatten_tensors(out[k])]
    return []


def first_line(exc: BaseException) -> str:
    """A torch exception's message in one line: its first (torch appends C++ frames and notes below)."""
    text = str(exc).strip()
    return text.splitlines()[0] if text else "(no message)"


def describe_node(module: fx.GraphModule, node: fx.Node) -> str:
    """``node 'fc1' (Linear 'fc1')``: how an error names the node at fault."""
    if node.op == "call_module":
        return f"node {node.name!r} ({type(module.get_submodule(node.target)).__name__} {node.target!r})"
    if node.op in ("call_function", "call_method"):
        target = node.target if isinstance(node.target, str) else getattr(node.target, "__name__", str(node.target))
        return f"node {node.name!r} ({target})"
    return f"node {node.name!r} ({node.op})"


class _ShapeRecorder(ShapeProp):
    """fx's ShapeProp without its ``traceback.print_exc()``: a node that fails raises ModelRunError
    naming it, in one line, with torch's exception chained (nothing printed on the way)."""

    def __init__(self, module: fx.GraphModule) -> None:
        super().__init__(module)
        self.extra_traceback = False   # fx would append the node's code to torch's message

    def run_node(self, n: fx.Node) -> Any:
        if self.fake_mode is not None:   # under a FakeTensorMode: fx's own path
            return super().run_node(n)
        try:
            result = fx.Interpreter.run_node(self, n)
        except Exception as exc:  # noqa: BLE001 - re-raised naming the node
            raise ModelRunError(f"{describe_node(self.module, n)} failed: {type(exc).__name__}: "
                                f"{first_line(exc)}") from exc
        found = False

        def extract(o: Any) -> Any:
            nonlocal found
            if isinstance(o, torch.Tensor):
                found = True
                return _extract_tensor_metadata(o)
            return o

        meta = map_aggregate(result, extract)
        if found:
            n.meta["tensor_meta"] = meta
        n.meta["type"] = type(result)
        return result


@dataclass
class Graph:
    """A traced model: ``module`` is runnable and fine-tunable torch; ``example_inputs`` fix the shapes.

    ``history`` lists the pass specs applied so far (it travels into the exported manifest) and
    ``reports`` the per-pass reports of what changed.
    """

    module: fx.GraphModule
    example_inputs: tuple[torch.Tensor, ...]
    history: list[str] = field(default_factory=list)
    reports: list[Any] = field(default_factory=list)

    # ---- facts -------------------------------------------------------------------------
    def propagate_shapes(self) -> None:
        """Record ``shape``/``dtype`` (and fx ``tensor_meta``) of every node by running the inputs.

        Runs in eval mode under no_grad so BatchNorm statistics and dropout are not touched. A node
        that fails raises ModelRunError naming it (torch's exception chained).
        """
        with inference_mode(self.module):
            _ShapeRecorder(self.module).propagate(*self.example_inputs)
        for node in self.module.graph.nodes:
            tm = node.meta.get("tensor_meta")
            if hasattr(tm, "shape"):
                node.meta["shape"] = tuple(tm.shape)
                node.meta["dtype"] = tm.dtype
            elif isinstance(tm, (tuple, list)):
                node.meta["shape"] = tuple(tuple(t.shape) for t in tm if hasattr(t, "shape"))
                node.meta["dtype"] = next((t.dtype for t in tm if hasattr(t, "dtype")), None)

    @property
    def nodes(self) -> Iterator[fx.Node]:
        return iter(self.module.graph.nodes)

    def layers(self) -> dict[str, torch.nn.Module]:
        """Modules called by the graph (``call_module`` targets), by qualified name, in call order."""
        out: dict[str, torch.nn.Module] = {}
        for node in self.module.graph.nodes:
            if node.op == "call_module" and node.target not in out:
                out[node.target] = self.module.get_submodule(node.target)
        return out

    def channel_groups(self) -> list:
        """Channel-coupling groups (``compiler.coupling``): what must be pruned together, and what
        is frozen and why. ``print(group.describe())`` shows a group's layers, dims and indices."""
        return coupling_groups(self)

    def to_networkx(self) -> nx.DiGraph:
        """Dataflow view for analyses: one vertex per fx node, an edge per use, facts as attributes."""
        g = nx.DiGraph()
        for node in self.module.graph.nodes:
            attrs = {"op": node.op, "target": node.target, "shape": node.meta.get("shape"),
                     "dtype": node.meta.get("dtype")}
            if node.op == "call_module":
                attrs["module_type"] = type(self.module.get_submodule(node.target)).__name__
            g.add_node(node.name, **attrs)
            for inp in node.all_input_nodes:
                g.add_edge(inp.name, node.name)
        return g

    # ---- running and copying -----------------------------------------------------------
    def __call__(self, *inputs: torch.Tensor) -> Any:
        return self.module(*inputs)

    def run_example(self) -> Any:
        """Outputs of the model on its example inputs, in eval mode, without autograd."""
        with inference_mode(self.module):
            return self.module(*self.example_inputs)

    def copy(self) -> "Graph":
        """A deep copy: parameters, buffers, node meta and history are all independent."""
        return Graph(copy.deepcopy(self.module), tuple(t.clone() for t in self.example_inputs),
                     list(self.history), list(self.reports))

    def recompile(self) -> None:
        """Call after editing ``module.graph``: lint, regenerate code, refresh shapes."""
        self.module.graph.lint()
        self.module.recompile()
        self.propagate_shapes()

    def __str__(self) -> str:
        rows = [f"{'node':<28}{'op':<15}{'target':<40}shape"]
        for node in self.module.graph.nodes:
            target = node.target if isinstance(node.target, str) else getattr(node.target, "__name__", str(node.target))
            rows.append(f"{node.name:<28}{node.op:<15}{str(target):<40}{node.meta.get('shape', '')}")
        return "\n".join(rows)
