"""Channel-coupling groups: which output channels of which layers must be pruned together.

Every channel dimension flowing through the graph is described as a *layout*: a list of segments
``(space, start, length, repeat)`` over *channel spaces*. A space is born at the output of a
Conv2d/Linear (its filters); pass-through ops (activations, norms, pooling, dropout, depthwise
convs) keep the layout; ``torch.cat`` on the channel axis concatenates layouts; ``flatten`` after a
conv repeats each channel ``H*W`` times for the Linear that consumes it. Residual adds and
broadcast multiplies (squeeze-excitation) and modules called twice tie spaces together
(union-find): a *group* is a set of tied spaces pruned with one set of indices.

``split``/``chunk`` on the channel axis slices the layout (the pruning pass rewrites the sizes).
Anything the analysis does not understand — reshapes other than flatten, transposes,
grouped (non-depthwise) convs, attention, functional layers with weights, the model's inputs
and outputs — freezes every space it touches, with the reason, so a pass built on this never
produces a model that crashes or silently computes something else.
"""

from __future__ import annotations

import math
import operator
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import fx, nn

from .graph import Graph


@dataclass(frozen=True)
class Segment:
    space: int
    start: int
    length: int
    repeat: int = 1  # features per channel (H*W after a flatten)


Layout = tuple  # tuple[Segment, ...]; position of a channel in the tensor = sum of earlier lengths*repeats


@dataclass
class Consumer:
    """A parameter dimension indexed by an incoming channel layout."""

    module: str
    role: str          # "in" (Conv2d/Linear weight dim 1), "param" (BN/LN/depthwise: every tensor dim 0)
    layout: Layout


@dataclass
class Group:
    """Tied spaces of equal size; channel ``c`` of the group is channel ``c`` of each space."""

    id: int
    size: int
    producers: list[tuple[str, int]]          # (module, space) whose output rows are the channels
    root: int = -1                            # the union-find root space that stands for the group
    consumers: list[Consumer] = field(default_factory=list)
    frozen: list[str] = field(default_factory=list)

    @property
    def prunable(self) -> bool:
        return not self.frozen

    def describe(self) -> str:
        state = "prunable" if self.prunable else "frozen: " + "; ".join(sorted(set(self.frozen)))
        lines = [f"group {self.id}: {self.size} channels, {state}"]
        lines += [f"  produced by {m} (output channels)" for m, _ in self.producers]
        for c in self.consumers:
            segs = ", ".join(f"space{s.space}[{s.start}:{s.start + s.length}]" + (f"x{s.repeat}" if s.repeat > 1 else "")
                             for s in c.layout)
            lines.append(f"  consumed by {c.module} ({c.role}) over {segs}")
        return "\n".join(lines)


_PASS_MODULES = (nn.ReLU, nn.ReLU6, nn.GELU, nn.SiLU, nn.Sigmoid, nn.Tanh, nn.Hardswish, nn.Hardsigmoid,
                 nn.LeakyReLU, nn.ELU, nn.Mish, nn.Dropout, nn.Dropout2d, nn.Identity, nn.MaxPool2d, nn.AvgPool2d,
                 nn.AdaptiveAvgPool2d, nn.AdaptiveMaxPool2d, nn.Upsample)
_PASS_FUNCS = {F.relu, F.relu6, F.gelu, F.silu, F.sigmoid, F.tanh, F.hardswish, F.hardsigmoid, F.leaky_relu,
               F.elu, F.mish, F.dropout, F.dropout2d, F.max_pool2d, F.avg_pool2d, F.adaptive_avg_pool2d,
               F.adaptive_max_pool2d, F.interpolate, torch.relu, torch.sigmoid, torch.tanh, torch.max_pool2d,
               torch.dropout}
_PASS_METHODS = {"relu", "sigmoid", "tanh", "contiguous", "clone", "float"}
_BINARY = {operator.add, operator.sub, operator.mul, operator.truediv, torch.add, torch.sub, torch.mul,
           torch.div, operator.iadd, operator.imul}
_BINARY_METHODS = {"add", "sub", "mul", "div", "add_", "mul_"}


class CouplingAnalysis:
    """Runs once over a traced Graph; ``groups`` holds the result."""

    def __init__(self, graph: Graph) -> None:
        self.graph = graph
        self.modules = dict(graph.module.named_modules())
        self.parent: list[int] = []
        self.size: list[int] = []
        self.frozen: dict[int, list[str]] = {}
        self.producer: dict[int, str] = {}
        self.consumers: list[Consumer] = []
        self.layout: dict[fx.Node, tuple[Layout, int]] = {}   # node -> (layout, channel dim)
        self.module_io: dict[str, tuple[Layout, Layout]] = {}
        self.pieces: dict[fx.Node, tuple[list[Layout], int]] = {}   # split/chunk node -> piece layouts, dim
        self._run()
        self.groups = self._collect()

    # ---- union-find over spaces --------------------------------------------------------
    def _new_space(self, size: int, producer: str | None = None, frozen: str | None = None) -> int:
        self.parent.append(len(self.parent))
        self.size.append(size)
        sid = len(self.parent) - 1
        if producer:
            self.producer[sid] = producer
        if frozen:
            self.frozen.setdefault(sid, []).append(frozen)
        return sid

    def find(self, s: int) -> int:
        while self.parent[s] != s:
            self.parent[s] = self.parent[self.parent[s]]
            s = self.parent[s]
        return s

    def _union(self, a: int, b: int, why: str) -> None:
        ra, rb = self.find(a), self.find(b)
        if ra == rb:
            return
        if self.size[ra] != self.size[rb]:
            self._freeze_spaces([ra, rb], f"{why}: tied channel counts differ")
            return
        self.parent[rb] = ra
        self.frozen.setdefault(ra, []).extend(self.frozen.pop(rb, []))

    def _freeze_spaces(self, spaces, reason: str) -> None:
        for s in spaces:
            self.frozen.setdefault(self.find(s), []).append(reason)

    def _freeze(self, layout: Layout | None, reason: str) -> None:
        if layout:
            self._freeze_spaces([seg.space for seg in layout], reason)

    def _tie(self, a: Layout, b: Layout, why: str) -> None:
        """Tie two layouts channel by channel (both must cover the same channels the same way)."""
        if len(a) == len(b) and all(x.length == y.length and x.repeat == y.repeat and x.start == y.start == 0
                                    and x.length == self.size[x.space] == self.size[y.space] for x, y in zip(a, b)):
            for x, y in zip(a, b):
                self._union(x.space, y.space, why)
        elif a != b:
            self._freeze(a, f"{why} with differently composed channels")
            self._freeze(b, f"{why} with differently composed channels")

    # ---- helpers ---------------------------------------------------------------------------
    @staticmethod
    def _shape(node) -> tuple | None:
        shape = node.meta.get("shape") if isinstance(node, fx.Node) else None
        return tuple(shape) if shape and all(isinstance(d, int) for d in shape) else None

    def _fresh(self, node: fx.Node, reason: str, cdim: int = 1) -> None:
        """Give ``node`` a new frozen space (its channels are not anyone's filters we can cut)."""
        shape = self._shape(node)
        if shape and len(shape) > 1:
            self.layout[node] = ((Segment(self._new_space(shape[cdim], frozen=reason), 0, shape[cdim]),), cdim)

    def _inputs_layouts(self, node: fx.Node) -> list[tuple[Layout, int]]:
        return [self.layout[a] for a in node.all_input_nodes if a in self.layout]

    def _freeze_node(self, node: fx.Node, reason: str) -> None:
        for lay, _ in self._inputs_layouts(node):
            self._freeze(lay, reason)
        self._fresh(node, reason)

    # ---- the walk ------------------------------------------------------------------------------
    def _run(self) -> None:
        for node in self.graph.module.graph.nodes:
            try:
                self._visit(node)
            except Exception as exc:  # noqa: BLE001 - an unexpected structure freezes, never crashes
                self._freeze_node(node, f"{node.name}: analysis failed ({type(exc).__name__}: {exc})")

    def _visit(self, node: fx.Node) -> None:
        if node.op == "placeholder":
            self._fresh(node, "model input")
        elif node.op == "output":
            for lay, _ in self._inputs_layouts(node):
                self._freeze(lay, "model output keeps its size")
        elif node.op == "get_attr":
            self._fresh(node, f"parameter '{node.target}' used functionally")
        elif node.op == "call_module":
            self._visit_module(node, self.modules[node.target])
        elif node.op in ("call_function", "call_method"):
            self._visit_function(node)

    def _visit_module(self, node: fx.Node, m: nn.Module) -> None:
        name = node.target
        x = self.layout.get(node.args[0]) if node.args and isinstance(node.args[0], fx.Node) else None
        if isinstance(m, nn.Conv2d) and x is not None and x[1] == 1:
            lay = x[0]
            if m.groups == 1:
                self.consumers.append(Consumer(name, "in", lay))
                self._output_space(node, name, m.out_channels, lay, cdim=1)
            elif m.groups == m.in_channels == m.out_channels:  # depthwise: channels pass through
                self.consumers.append(Consumer(name, "param", lay))
                self._reuse(name, lay, lay)
                self.layout[node] = (lay, 1)
            else:
                self._freeze_node(node, f"{name}: grouped conv (groups={m.groups}) not pruned yet")
        elif isinstance(m, nn.Linear) and x is not None and x[1] == len(self._shape(node.args[0]) or ()) - 1:
            self.consumers.append(Consumer(name, "in", x[0]))
            self._output_space(node, name, m.out_features, x[0], cdim=x[1])
        elif isinstance(m, (nn.BatchNorm1d, nn.BatchNorm2d, nn.InstanceNorm2d)) and x is not None and x[1] == 1:
            if any(True for _ in m.parameters()) or getattr(m, "running_mean", None) is not None:
                self.consumers.append(Consumer(name, "param", x[0]))
            self.layout[node] = x
        elif isinstance(m, nn.LayerNorm) and x is not None and len(m.normalized_shape) == 1 \
                and x[1] == len(self._shape(node.args[0]) or ()) - 1:
            self.consumers.append(Consumer(name, "param", x[0]))
            self.layout[node] = x
        elif isinstance(m, _PASS_MODULES) and x is not None:
            self.layout[node] = x
        elif isinstance(m, nn.Flatten) and x is not None:
            self._flatten(node, x, m.start_dim, m.end_dim)
        else:
            self._freeze_node(node, f"{name}: {type(m).__name__} is not understood by the coupling analysis")

    def _output_space(self, node: fx.Node, name: str, size: int, in_layout: Layout, cdim: int) -> None:
        if name in self.module_io:  # the same module called again: tie both sides to the first call
            first_in, first_out = self.module_io[name]
            self._tie(first_in, in_layout, f"{name} used twice")
            self.layout[node] = (first_out, cdim)
            return
        out = (Segment(self._new_space(size, producer=name), 0, size),)
        self.module_io[name] = (in_layout, out)
        self.layout[node] = (out, cdim)

    def _reuse(self, name: str, in_layout: Layout, out_layout: Layout) -> None:
        if name in self.module_io:
            self._tie(self.module_io[name][0], in_layout, f"{name} used twice")
        else:
            self.module_io[name] = (in_layout, out_layout)

    def _flatten(self, node: fx.Node, x: tuple[Layout, int], start: int, end: int) -> None:
        shape = self._shape(node.args[0])
        lay, cdim = x
        if shape is None or start not in (1, -len(shape) + 1) or cdim != 1 or end not in (-1, len(shape) - 1):
            self._freeze_node(node, f"{node.name}: flatten from dim {start} not understood")
            return
        k = math.prod(shape[2:])
        self.layout[node] = (tuple(Segment(s.space, s.start, s.length, s.repeat * k) for s in lay), 1)

    def _visit_function(self, node: fx.Node) -> None:
        t = node.target
        args = [a for a in node.args]
        first = self.layout.get(args[0]) if args and isinstance(args[0], fx.Node) else None
        out_shape = self._shape(node)
        if node.op == "call_method" and t in ("size", "dim") or t in (getattr, operator.getitem) and first is None \
                and not (args and args[0] in self.pieces):
            return  # shape queries: no tensor
        if t is operator.getitem and args[0] in self.pieces:
            pieces, cdim = self.pieces[args[0]]
            self.layout[node] = (pieces[args[1]], cdim)
            return
        if t in (torch.split, torch.chunk) or (node.op == "call_method" and t in ("split", "chunk")):
            if first is not None and self._split(node, first):
                return
        if (t in _PASS_FUNCS or (node.op == "call_method" and t in _PASS_METHODS)) and first is not None:
            in_shape = self._shape(args[0])
            if out_shape and in_shape and len(out_shape) == len(in_shape) and out_shape[first[1]] == in_shape[first[1]]:
                self.layout[node] = first
                return
        if t in _BINARY or (node.op == "call_method" and t in _BINARY_METHODS):
            self._binary(node)
            return
        if t in (torch.flatten,) or (node.op == "call_method" and t == "flatten"):
            if first is not None:
                start = args[1] if len(args) > 1 else node.kwargs.get("start_dim", 0)
                end = args[2] if len(args) > 2 else node.kwargs.get("end_dim", -1)
                self._flatten(node, first, start, end)
                return
        if t is torch.cat or t is torch.concat:
            self._cat(node)
            return
        if t in (torch.mean, torch.sum, torch.amax) or (node.op == "call_method" and t in ("mean", "sum", "amax")):
            in_shape = self._shape(args[0])
            if first is not None and in_shape and out_shape and first[1] == 1 and len(out_shape) >= 2 \
                    and out_shape[1] == in_shape[1]:
                self.layout[node] = first  # reduced over other dims; channel dim 1 survives
                return
        what = getattr(t, "__name__", str(t))
        self._freeze_node(node, f"{node.name}: '{what}' is not understood by the coupling analysis")

    def _split(self, node: fx.Node, x: tuple[Layout, int]) -> bool:
        """split/chunk along the channel axis: each piece is a slice of the input layout. The
        pruning pass rewrites the sizes (a chunk becomes a split with explicit sizes)."""
        lay, cdim = x
        in_shape = self._shape(node.args[0])
        dim = node.args[2] if len(node.args) > 2 else node.kwargs.get("dim", 0)
        shapes = node.meta.get("shape")
        if not in_shape or dim % len(in_shape) != cdim % len(in_shape) or not shapes \
                or any(seg.repeat != 1 for seg in lay):
            return False
        pieces, pos = [], 0
        for shape in shapes:
            size = shape[cdim]
            pieces.append(self._slice(lay, pos, size))
            pos += size
        self.pieces[node] = (pieces, cdim)
        return True

    @staticmethod
    def _slice(lay: Layout, start: int, length: int) -> Layout:
        out, pos = [], 0
        for seg in lay:
            lo, hi = max(start, pos), min(start + length, pos + seg.length)
            if lo < hi:
                out.append(Segment(seg.space, seg.start + lo - pos, hi - lo, 1))
            pos += seg.length
        return tuple(out)

    def _binary(self, node: fx.Node) -> None:
        out_shape = self._shape(node)
        tensors = [a for a in node.args if isinstance(a, fx.Node) and a in self.layout]
        if not out_shape or not tensors:
            self._freeze_node(node, f"{node.name}: binary op on untracked operands")
            return
        cdims = {self.layout[a][1] for a in tensors}
        if len(cdims) != 1:
            self._freeze_node(node, f"{node.name}: operands disagree on the channel axis")
            return
        cdim = cdims.pop()
        full = [a for a in tensors if (self._shape(a) or ())[cdim:cdim + 1] == (out_shape[cdim],)]
        untracked = [a for a in node.args if isinstance(a, fx.Node) and a not in self.layout
                     and (self._shape(a) or (1,))[cdim:cdim + 1] not in ((), (1,))]
        if not full or untracked:
            self._freeze_node(node, f"{node.name}: broadcast along the channel axis not understood")
            return
        base = self.layout[full[0]][0]
        for other in full[1:]:
            self._tie(base, self.layout[other][0], f"{node.name} ({getattr(node.target, '__name__', node.target)})")
        self.layout[node] = (base, cdim)

    def _cat(self, node: fx.Node) -> None:
        tensors = node.args[0] if node.args else node.kwargs.get("tensors")
        dim = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim", 0)
        lays = [self.layout.get(t) for t in tensors]
        if any(lay is None for lay in lays) or len({lay[1] for lay in lays}) != 1:
            self._freeze_node(node, f"{node.name}: cat of untracked tensors")
            return
        cdim = lays[0][1]
        ndim = len(self._shape(node) or ())
        if dim % max(ndim, 1) == cdim % max(ndim, 1):
            self.layout[node] = (tuple(seg for lay in lays for seg in lay[0]), cdim)
        else:  # concatenated along another axis: every input has the same channels
            for lay in lays[1:]:
                self._tie(lays[0][0], lay[0], f"{node.name} (cat on dim {dim})")
            self.layout[node] = lays[0]

    # ---- result ----------------------------------------------------------------------------------
    def _collect(self) -> list[Group]:
        by_root: dict[int, Group] = {}
        for sid in range(len(self.parent)):
            root = self.find(sid)
            group = by_root.setdefault(root, Group(len(by_root), self.size[root], [], root))
            if sid in self.producer:
                group.producers.append((self.producer[sid], sid))
        for root, group in by_root.items():
            group.frozen = list(self.frozen.get(root, []))
            if not group.producers:
                group.frozen.append("no layer produces these channels")
        for c in self.consumers:
            roots = {self.find(seg.space) for seg in c.layout}
            for root in roots:
                by_root[root].consumers.append(c)
        return list(by_root.values())


def coupling_groups(graph: Graph) -> list[Group]:
    """The channel-coupling groups of ``graph`` (prunable and frozen, with reasons)."""
    return CouplingAnalysis(graph).groups
