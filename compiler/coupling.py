"""Channel-coupling groups: which output channels of which layers must be pruned together.

Every channel dimension flowing through the graph is described as a *layout*: a list of segments
``(space, start, length, repeat)`` over *channel spaces*. A space is born at the output of a
Conv2d/Linear (its filters); pass-through ops (activations, norms, pooling, dropout, depthwise
convs) keep the layout; ``torch.cat`` on the channel axis concatenates layouts; ``flatten`` after a
conv repeats each channel ``H*W`` times for the Linear that consumes it. Residual adds and
broadcast multiplies (squeeze-excitation) and modules called twice tie spaces together
(union-find): a *group* is a set of tied spaces pruned with one set of indices.

``split``/``chunk`` on the channel axis slices the layout (the pruning pass rewrites the sizes).

Some ops need the *same local channels* kept in each of several equal blocks: a grouped conv
(every group must keep as many inputs and outputs, at matching positions), GroupNorm (its groups
must stay equal), and a view that splits the channel axis into ``(G, C/G)`` — the first half of a
channel shuffle. They add *channel ties* (local channel ``l`` of block ``q`` is kept iff local
channel ``l`` of block 0 is); within a group, tied channels form *classes* that are kept or
pruned whole. The shuffle's transpose and the view that merges the axes back become a permuted
layout, so consumers downstream index the right columns.

Anything the analysis does not understand — other reshapes and transposes, attention, functional
layers with weights, ties across partially overlapping groups, the model's inputs and outputs —
freezes every space it touches, with the reason, so a pass built on this never produces a model
that crashes or silently computes something else.
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
    role: str          # "in" (Conv2d/Linear weight dim 1), "grouped" (grouped Conv2d weight dim 1, per group),
                       # "param" (BN/LN/GroupNorm/depthwise: every tensor dim 0)
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
    classes: list[list[int]] = field(default_factory=list)  # channels kept or pruned together

    @property
    def prunable(self) -> bool:
        return not self.frozen

    def describe(self) -> str:
        state = "prunable" if self.prunable else "frozen: " + "; ".join(sorted(set(self.frozen)))
        lines = [f"group {self.id}: {self.size} channels, {state}"]
        if any(len(c) > 1 for c in self.classes):
            sizes = sorted({len(c) for c in self.classes})
            lines.append(f"  pruned in {len(self.classes)} unit(s) of tied channels (sizes {sizes}), "
                         f"e.g. {self.classes[0][:8]}")
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
        self.ties: list[tuple[int, int, int, int, str]] = []   # (space, channel) kept iff (space, channel)
        self.shuffles: dict[fx.Node, tuple[Layout, int, int, int, bool]] = {}  # (layout, cdim, G, P, transposed)
        # literal sizes in view/reshape arguments that must follow the pruned channels:
        # node -> (dim, layout whose kept count sets the size, divisor)
        self.view_sizes: dict[fx.Node, tuple[int, Layout, int]] = {}
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

    def _positions(self, layout: Layout) -> list[tuple[int, int]] | None:
        """(space, channel) at each position of a channel axis (None if features repeat)."""
        if any(seg.repeat != 1 for seg in layout):
            return None
        return [(seg.space, c) for seg in layout for c in range(seg.start, seg.start + seg.length)]

    def _tie_blocks(self, layout: Layout, blocks: int, why: str) -> bool:
        """Local channel l of every one of ``blocks`` equal blocks is kept iff l of block 0 is."""
        pos = self._positions(layout)
        if pos is None or blocks < 1 or len(pos) % blocks:
            self._freeze(layout, f"{why}: channels cannot be split into {blocks} equal blocks")
            return False
        width = len(pos) // blocks
        for q in range(1, blocks):
            for lc in range(width):
                self.ties.append((*pos[lc], *pos[q * width + lc], why))
        return True

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

    def _input_on(self, node: fx.Node, arg: fx.Node, axis: int) -> tuple[Layout, int] | None:
        """``arg``'s layout if its channels sit on ``axis`` (the axis ``node`` consumes); otherwise
        what was tracked is frozen and ``node`` consumes a fresh frozen axis instead."""
        shape = self._shape(arg)
        if not shape or len(shape) < 2:
            return self.layout.get(arg)
        axis %= len(shape)
        x = self.layout.get(arg)
        if x is not None and x[1] % len(shape) == axis:
            return (x[0], axis)
        if x is not None:
            self._freeze(x[0], f"{node.name} consumes axis {axis}, not the tracked channel axis {x[1]}")
        reason = f"{node.name}: its input's axis {axis} comes from an op the analysis does not follow"
        return ((Segment(self._new_space(shape[axis], frozen=reason), 0, shape[axis]),), axis)

    def _inputs_layouts(self, node: fx.Node) -> list[tuple[Layout, int]]:
        out = [self.layout[a] for a in node.all_input_nodes if a in self.layout]
        out += [self.shuffles[a][:2] for a in node.all_input_nodes if a in self.shuffles]
        out += [(piece, cdim) for a in node.all_input_nodes if a in self.pieces for piece in self.pieces[a][0]]
        return out

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
        axis = 1 if isinstance(m, (nn.Conv2d, nn.modules.batchnorm._BatchNorm, nn.InstanceNorm2d, nn.GroupNorm)) \
            else -1 if isinstance(m, (nn.Linear, nn.LayerNorm)) else None
        if axis is not None and node.args and isinstance(node.args[0], fx.Node):
            x = self._input_on(node, node.args[0], axis)
        if isinstance(m, nn.Conv2d) and x is not None and x[1] == 1:
            lay = x[0]
            if m.groups == 1:
                self.consumers.append(Consumer(name, "in", lay))
                self._output_space(node, name, m.out_channels, lay, cdim=1)
            elif m.groups == m.in_channels == m.out_channels:  # depthwise: channels pass through
                self.consumers.append(Consumer(name, "param", lay))
                self._reuse(name, lay, lay)
                self.layout[node] = (lay, 1)
            elif self._tie_blocks(lay, m.groups, f"{name}: grouped conv (groups={m.groups})"):
                self.consumers.append(Consumer(name, "grouped", lay))
                self._output_space(node, name, m.out_channels, lay, cdim=1)
                self._tie_blocks(self.layout[node][0], m.groups, f"{name}: grouped conv (groups={m.groups})")
            else:
                self._fresh(node, f"{name}: grouped conv input not understood")
        elif isinstance(m, nn.Linear) and x is not None and x[1] == len(self._shape(node.args[0]) or ()) - 1:
            self.consumers.append(Consumer(name, "in", x[0]))
            self._output_space(node, name, m.out_features, x[0], cdim=x[1])
        elif isinstance(m, (nn.BatchNorm1d, nn.BatchNorm2d, nn.InstanceNorm2d)) and x is not None and x[1] == 1:
            if any(True for _ in m.parameters()) or getattr(m, "running_mean", None) is not None:
                self.consumers.append(Consumer(name, "param", x[0]))
            self.layout[node] = x
        elif isinstance(m, nn.GroupNorm) and x is not None and x[1] == 1:
            if self._tie_blocks(x[0], m.num_groups, f"{name}: GroupNorm (groups={m.num_groups})"):
                if m.affine:
                    self.consumers.append(Consumer(name, "param", x[0]))
                self.layout[node] = x
            else:
                self._fresh(node, f"{name}: GroupNorm input not understood")
        elif isinstance(m, nn.LayerNorm) and x is not None and len(m.normalized_shape) == 1 \
                and x[1] == len(self._shape(node.args[0]) or ()) - 1:
            self.consumers.append(Consumer(name, "param", x[0]))
            self.layout[node] = x
        elif isinstance(m, _PASS_MODULES) and x is not None:
            self.layout[node] = x
        elif isinstance(m, nn.Flatten) and x is not None:
            self._flatten(node, x, m.start_dim, m.end_dim)
        elif isinstance(m, nn.MultiheadAttention):
            self._freeze_node(node, f"{name}: attention heads and embedding are left whole (MultiheadAttention "
                                    "is not pruned)")
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
        if node.op == "call_method" and t in ("size", "dim") \
                or t is getattr and len(args) > 1 and args[1] in ("shape", "dtype", "device", "ndim"):
            return  # shape queries: no tensor
        if args and isinstance(args[0], fx.Node) and args[0] in self.shuffles:
            if self._shuffle_step(node):
                return
            self._freeze_node(node, f"{node.name}: use of a (groups, channels) view not understood")
            return
        if t in (getattr, operator.getitem) and first is None and not (args and args[0] in self.pieces):
            return  # indexing a non-tensor (a size tuple, a module output tuple)
        if first is not None and (t is torch.reshape or node.op == "call_method" and t in ("view", "reshape")):
            if self._view(node, first):
                return
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
            dims = args[1] if len(args) > 1 else node.kwargs.get("dim", node.kwargs.get("axis"))
            dims = [dims] if isinstance(dims, int) else list(dims) if isinstance(dims, (tuple, list)) else None
            reduced = None if dims is None or not in_shape else {d % len(in_shape) for d in dims}
            if first is not None and in_shape and out_shape and first[1] == 1 and len(out_shape) >= 2 \
                    and reduced is not None and not reduced & {0, 1} and out_shape[1] == in_shape[1]:
                self.layout[node] = first  # reduced over spatial dims only; channel dim 1 survives
                return
        what = getattr(t, "__name__", str(t))
        self._freeze_node(node, f"{node.name}: '{what}' is not understood by the coupling analysis")

    @staticmethod
    def view_dims(node: fx.Node) -> list:
        """The target shape of a view/reshape node, as written (ints, -1 or nodes)."""
        rest = list(node.args[1:]) or [node.kwargs.get("shape", node.kwargs.get("size"))]
        if len(rest) == 1 and isinstance(rest[0], (tuple, list, torch.Size)):
            return list(rest[0])
        return rest

    @staticmethod
    def set_view_dim(node: fx.Node, dim: int, value: int) -> None:
        """Rewrite one literal size of a view/reshape node (nodes and -1 are left alone)."""
        dims = CouplingAnalysis.view_dims(node)
        if not isinstance(dims[dim], int) or dims[dim] == -1:
            return
        dims[dim] = value
        node.args, node.kwargs = (node.args[0], tuple(dims)), {}

    def _literal(self, node: fx.Node, dim: int, layout: Layout, divisor: int = 1) -> None:
        dims = self.view_dims(node)
        if dim < len(dims) and isinstance(dims[dim], int) and dims[dim] != -1:
            self.view_sizes[node] = (dim, layout, divisor)

    def _view(self, node: fx.Node, x: tuple[Layout, int]) -> bool:
        """view/reshape that keeps the channel axis, flattens it with what follows (the classic
        ``x.view(-1, 16*5*5)``), or splits it into (G, C/G) (a channel shuffle's first step)."""
        lay, cdim = x
        src, out = self._shape(node.args[0]), self._shape(node)
        if not src or not out or len(self.view_dims(node)) != len(out):
            return False
        cdim %= len(src)
        if out == src:
            self.layout[node] = x
            return True
        if len(out) == cdim + 1 and out[:cdim] == src[:cdim] and out[cdim] == math.prod(src[cdim:]) and cdim == 1:
            self._flatten(node, x, 1, -1)
            if node in self.layout:
                self._literal(node, cdim, self.layout[node][0])
            return True
        if len(out) == len(src) + 1 and out[:cdim] == src[:cdim] and out[cdim + 2:] == src[cdim + 1:] \
                and out[cdim] * out[cdim + 1] == src[cdim]:
            groups, width = out[cdim], out[cdim + 1]
            if not self._tie_blocks(lay, groups, f"{node.name}: view splitting {src[cdim]} channels into "
                                                 f"({groups}, {width})"):
                return False
            self.shuffles[node] = (lay, cdim, groups, width, False)
            self._literal(node, cdim + 1, lay, groups)
            return True
        return False

    def _shuffle_step(self, node: fx.Node) -> bool:
        """The rest of a channel shuffle on a (G, C/G)-split tensor: transpose/permute of the two
        axes, contiguous, and the view that merges them back (a permuted layout)."""
        t, args = node.target, node.args
        lay, cdim, groups, width, swapped = self.shuffles[args[0]]
        src, out = self._shape(args[0]), self._shape(node)
        if not src or not out:
            return False
        if node.op == "call_method" and t in ("contiguous", "clone"):
            self.shuffles[node] = self.shuffles[args[0]]
            return True
        dims = None
        if t is torch.transpose or node.op == "call_method" and t == "transpose":
            a, b = (d % len(src) for d in args[1:3])
            dims = list(range(len(src)))
            dims[a], dims[b] = dims[b], dims[a]
        elif t is torch.permute or node.op == "call_method" and t == "permute":
            dims = [d % len(src) for d in (args[1] if isinstance(args[1], (tuple, list)) else args[1:])]
        if dims is not None:
            swap = list(range(len(src)))
            swap[cdim], swap[cdim + 1] = cdim + 1, cdim
            if dims == swap:
                self.shuffles[node] = (lay, cdim, groups, width, not swapped)
                return True
            return False
        if (t is torch.reshape or node.op == "call_method" and t in ("view", "reshape")) \
                and len(out) == len(src) - 1 and out[cdim] == groups * width and len(self.view_dims(node)) == len(out):
            if swapped:  # position r*G + g holds block g's channel r
                pos = self._positions(lay)
                merged = tuple(Segment(s, c, 1) for r in range(width) for g in range(groups)
                               for s, c in [pos[g * width + r]])
                lay = self._compress(merged)
            self.layout[node] = (lay, cdim)
            self._literal(node, cdim, lay)
            return True
        return False

    @staticmethod
    def _compress(layout: Layout) -> Layout:
        out: list[Segment] = []
        for seg in layout:
            last = out[-1] if out else None
            if last and last.space == seg.space and last.repeat == seg.repeat == 1 \
                    and last.start + last.length == seg.start:
                out[-1] = Segment(last.space, last.start, last.length + seg.length)
            else:
                out.append(seg)
        return tuple(out)

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
        def along_channels(a: fx.Node) -> int:  # the operand's size on the output's channel axis
            shape = self._shape(a)
            if shape is None:
                return -1
            d = cdim % len(out_shape) - (len(out_shape) - len(shape))   # broadcasting aligns from the right
            return shape[d] if d >= 0 else 1

        untracked = [a for a in node.args if isinstance(a, fx.Node) and a not in self.layout
                     and along_channels(a) != 1]
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
        links: dict[int, list[tuple[int, int]]] = {}
        for sa, ca, sb, cb, why in self.ties:
            ra, rb = self.find(sa), self.find(sb)
            if ra == rb:
                links.setdefault(ra, []).append((ca, cb))
            else:
                self._freeze_spaces([ra, rb], f"{why}: ties channels of different groups")
        for root, group in by_root.items():
            group.classes = _classes(group.size, links.get(root, []))
            group.frozen = list(self.frozen.get(root, []))
            if not group.producers:
                group.frozen.append("no layer produces these channels")
        for c in self.consumers:
            roots = {self.find(seg.space) for seg in c.layout}
            for root in roots:
                by_root[root].consumers.append(c)
        return list(by_root.values())


def _classes(size: int, links: list[tuple[int, int]]) -> list[list[int]]:
    """Connected components of channel ties, each sorted, ordered by their first channel."""
    parent = list(range(size))

    def find(c: int) -> int:
        while parent[c] != c:
            parent[c] = parent[parent[c]]
            c = parent[c]
        return c

    for a, b in links:
        parent[find(a)] = find(b)
    comps: dict[int, list[int]] = {}
    for c in range(size):
        comps.setdefault(find(c), []).append(c)
    return sorted(comps.values())


def coupling_groups(graph: Graph) -> list[Group]:
    """The channel-coupling groups of ``graph`` (prunable and frozen, with reasons)."""
    return CouplingAnalysis(graph).groups
