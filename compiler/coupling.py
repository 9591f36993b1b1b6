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

Which of these rules an op follows is its row in ``compiler.op_table`` (its ``channels``). The
vocabulary — segments, layouts, spaces tied by union-find, groups — is ``compiler.channel_spaces``;
the reshapes followed (views, channel shuffles, split/chunk) are ``compiler.coupling_views``.

Anything the analysis does not understand — other reshapes and transposes, attention, functional
layers with weights, ties across partially overlapping groups, the model's inputs and outputs —
freezes every space it touches, with the reason, so a pass built on this never produces a model
that crashes or silently computes something else.
"""

from __future__ import annotations

import math
import operator
from typing import Any, Callable

from torch import fx, nn

from . import coupling_views as views
from .channel_spaces import ChannelSpaces, Consumer, Group, Layout, Segment
from .op_table import Channels, module_rule, node_rule

__all__ = ["Consumer", "CouplingAnalysis", "Group", "Layout", "Segment", "coupling_groups"]


class CouplingAnalysis:
    """Runs once over a traced ``compiler.Graph``; ``groups`` holds the result.

    The walk gives every node a layout (``layout``: node -> (layout, channel dim)); each op is
    handled by the rule its row in ``compiler.op_table`` names (``_MODULE_RULES`` /
    ``_FUNCTION_RULES`` below); the spaces, ties and freezes live in ``spaces``."""

    view_dims = staticmethod(views.view_dims)
    set_view_dim = staticmethod(views.set_view_dim)

    def __init__(self, graph: Any) -> None:
        self.graph = graph
        self.modules = dict(graph.module.named_modules())
        self.spaces = ChannelSpaces()
        self.consumers: list[Consumer] = []
        self.layout: dict[fx.Node, tuple[Layout, int]] = {}   # node -> (layout, channel dim)
        self.module_io: dict[str, tuple[Layout, Layout]] = {}
        self.pieces: dict[fx.Node, tuple[list[Layout], int]] = {}   # split/chunk node -> piece layouts, dim
        self.shuffles: dict[fx.Node, tuple[Layout, int, int, int, bool]] = {}  # (layout, cdim, G, P, transposed)
        # literal sizes in view/reshape arguments that must follow the pruned channels:
        # node -> (dim, layout whose kept count sets the size, divisor)
        self.view_sizes: dict[fx.Node, tuple[int, Layout, int]] = {}
        self._run()
        self.groups = self.spaces.groups(self.consumers)

    def find(self, space: int) -> int:
        """The root space standing for ``space``'s group (``Group.root``)."""
        return self.spaces.find(space)

    @property
    def producer(self) -> dict[int, str]:
        """Space -> the module whose output channels it is."""
        return self.spaces.producer

    # ---- helpers ---------------------------------------------------------------------------
    @staticmethod
    def shape(node) -> tuple | None:
        shape = node.meta.get("shape") if isinstance(node, fx.Node) else None
        return tuple(shape) if shape and all(isinstance(d, int) for d in shape) else None

    def _fresh(self, node: fx.Node, reason: str, cdim: int = 1) -> None:
        """Give ``node`` a new frozen space (its channels are not anyone's filters we can cut)."""
        shape = self.shape(node)
        if shape and len(shape) > 1:
            self.layout[node] = ((Segment(self.spaces.new(shape[cdim], frozen=reason), 0, shape[cdim]),), cdim)

    def _input_on(self, node: fx.Node, arg: fx.Node, axis: int) -> tuple[Layout, int] | None:
        """``arg``'s layout if its channels sit on ``axis`` (the axis ``node`` consumes); otherwise
        what was tracked is frozen and ``node`` consumes a fresh frozen axis instead."""
        shape = self.shape(arg)
        if not shape or len(shape) < 2:
            return self.layout.get(arg)
        axis %= len(shape)
        x = self.layout.get(arg)
        if x is not None and x[1] % len(shape) == axis:
            return (x[0], axis)
        if x is not None:
            self.spaces.freeze(x[0], f"{node.name} consumes axis {axis}, not the tracked channel axis {x[1]}")
        reason = f"{node.name}: its input's axis {axis} comes from an op the analysis does not follow"
        return ((Segment(self.spaces.new(shape[axis], frozen=reason), 0, shape[axis]),), axis)

    def _inputs_layouts(self, node: fx.Node) -> list[tuple[Layout, int]]:
        out = [self.layout[a] for a in node.all_input_nodes if a in self.layout]
        out += [self.shuffles[a][:2] for a in node.all_input_nodes if a in self.shuffles]
        out += [(piece, self.pieces[a][1]) for a in node.all_input_nodes if a in self.pieces for piece in self.pieces[a][0]]
        return out

    def _freeze_node(self, node: fx.Node, reason: str) -> None:
        for lay, _ in self._inputs_layouts(node):
            self.spaces.freeze(lay, reason)
        self._fresh(node, reason)

    def _output_space(self, node: fx.Node, name: str, size: int, in_layout: Layout, cdim: int) -> None:
        if name in self.module_io:  # the same module called again: tie both sides to the first call
            first_in, first_out = self.module_io[name]
            self.spaces.tie(first_in, in_layout, f"{name} used twice")
            self.layout[node] = (first_out, cdim)
            return
        out = (Segment(self.spaces.new(size, producer=name), 0, size),)
        self.module_io[name] = (in_layout, out)
        self.layout[node] = (out, cdim)

    def _reuse(self, name: str, in_layout: Layout, out_layout: Layout) -> None:
        if name in self.module_io:
            self.spaces.tie(self.module_io[name][0], in_layout, f"{name} used twice")
        else:
            self.module_io[name] = (in_layout, out_layout)

    def flatten(self, node: fx.Node, x: tuple[Layout, int], start: int, end: int) -> None:
        shape = self.shape(node.args[0])
        lay, cdim = x
        if shape is None or start not in (1, -len(shape) + 1) or cdim != 1 or end not in (-1, len(shape) - 1):
            self._freeze_node(node, f"{node.name}: flatten from dim {start} not understood")
            return
        k = math.prod(shape[2:])
        self.layout[node] = (tuple(Segment(s.space, s.start, s.length, s.repeat * k) for s in lay), 1)

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
                self.spaces.freeze(lay, "model output keeps its size")
        elif node.op == "get_attr":
            self._fresh(node, f"parameter '{node.target}' used functionally")
        elif node.op == "call_module":
            self._visit_module(node, self.modules[node.target])
        elif node.op in ("call_function", "call_method"):
            self._visit_function(node)

    def _visit_module(self, node: fx.Node, m: nn.Module) -> None:
        rule = module_rule(m)
        tensor_in = bool(node.args) and isinstance(node.args[0], fx.Node)
        x = self.layout.get(node.args[0]) if tensor_in else None
        if rule.axis is not None and tensor_in:
            x = self._input_on(node, node.args[0], rule.axis)
        handler = _MODULE_RULES.get(rule.channels)
        if handler is not None and x is not None and handler(self, node, m, x):
            return
        what = rule.note or f"{type(m).__name__} is not understood by the coupling analysis"
        self._freeze_node(node, f"{node.target}: {what}")

    def _visit_function(self, node: fx.Node) -> None:
        t, args = node.target, node.args
        rule = node_rule(node, self.modules)
        first = self.layout.get(args[0]) if args and isinstance(args[0], fx.Node) else None
        if rule.channels == Channels.SHAPE or t is getattr and len(args) > 1 \
                and args[1] in ("shape", "dtype", "device", "ndim"):
            return  # shape queries: no tensor
        if args and isinstance(args[0], fx.Node) and args[0] in self.shuffles:
            if not views.shuffle_step(self, node):
                self._freeze_node(node, f"{node.name}: use of a (groups, channels) view not understood")
            return
        if t in (getattr, operator.getitem) and first is None and not (args and args[0] in self.pieces):
            return  # indexing a non-tensor (a size tuple, a module output tuple)
        if t is operator.getitem and args[0] in self.pieces:
            pieces, cdim = self.pieces[args[0]]
            self.layout[node] = (pieces[args[1]], cdim)
            return
        handler = _FUNCTION_RULES.get(rule.channels)
        if handler is not None and handler(self, node, first):
            return
        what = getattr(t, "__name__", str(t))
        self._freeze_node(node, f"{node.name}: '{what}' is not understood by the coupling analysis")

    # ---- module rules: (analysis, node, module, input layout) -> handled ---------------------------
    def _conv(self, node: fx.Node, m: nn.Conv2d, x: tuple[Layout, int]) -> bool:
        if x[1] != 1:
            return False
        lay, name = x[0], node.target
        if m.groups == 1:
            self.consumers.append(Consumer(name, "in", lay))
            self._output_space(node, name, m.out_channels, lay, cdim=1)
        elif m.groups == m.in_channels == m.out_channels:  # depthwise: channels pass through
            self.consumers.append(Consumer(name, "param", lay))
            self._reuse(name, lay, lay)
            self.layout[node] = (lay, 1)
        elif self.spaces.tie_blocks(lay, m.groups, f"{name}: grouped conv (groups={m.groups})"):
            self.consumers.append(Consumer(name, "grouped", lay))
            self._output_space(node, name, m.out_channels, lay, cdim=1)
            self.spaces.tie_blocks(self.layout[node][0], m.groups, f"{name}: grouped conv (groups={m.groups})")
        else:
            self._fresh(node, f"{name}: grouped conv input not understood")
        return True

    def _linear(self, node: fx.Node, m: nn.Linear, x: tuple[Layout, int]) -> bool:
        if x[1] != len(self.shape(node.args[0]) or ()) - 1:
            return False
        self.consumers.append(Consumer(node.target, "in", x[0]))
        self._output_space(node, node.target, m.out_features, x[0], cdim=x[1])
        return True

    def _norm(self, node: fx.Node, m: nn.Module, x: tuple[Layout, int]) -> bool:
        if x[1] != 1:
            return False
        if any(True for _ in m.parameters()) or getattr(m, "running_mean", None) is not None:
            self.consumers.append(Consumer(node.target, "param", x[0]))
        self.layout[node] = x
        return True

    def _group_norm(self, node: fx.Node, m: nn.GroupNorm, x: tuple[Layout, int]) -> bool:
        if x[1] != 1:
            return False
        if self.spaces.tie_blocks(x[0], m.num_groups, f"{node.target}: GroupNorm (groups={m.num_groups})"):
            if m.affine:
                self.consumers.append(Consumer(node.target, "param", x[0]))
            self.layout[node] = x
        else:
            self._fresh(node, f"{node.target}: GroupNorm input not understood")
        return True

    def _layer_norm(self, node: fx.Node, m: nn.LayerNorm, x: tuple[Layout, int]) -> bool:
        if len(m.normalized_shape) != 1 or x[1] != len(self.shape(node.args[0]) or ()) - 1:
            return False
        self.consumers.append(Consumer(node.target, "param", x[0]))
        self.layout[node] = x
        return True

    def _module_passes(self, node: fx.Node, m: nn.Module, x: tuple[Layout, int]) -> bool:
        self.layout[node] = x
        return True

    def _module_flatten(self, node: fx.Node, m: nn.Flatten, x: tuple[Layout, int]) -> bool:
        self.flatten(node, x, m.start_dim, m.end_dim)
        return True

    # ---- function and method rules: (analysis, node, first input's layout or None) -> handled -------
    def _passes(self, node: fx.Node, first: tuple[Layout, int] | None) -> bool:
        if first is None:
            return False
        out_shape, in_shape = self.shape(node), self.shape(node.args[0])
        if not (out_shape and in_shape and len(out_shape) == len(in_shape) and out_shape[first[1]] == in_shape[first[1]]):
            return False
        self.layout[node] = first
        return True

    def _view(self, node: fx.Node, first: tuple[Layout, int] | None) -> bool:
        return first is not None and views.view(self, node, first)

    def _split(self, node: fx.Node, first: tuple[Layout, int] | None) -> bool:
        return first is not None and views.split(self, node, first)

    def _flatten_call(self, node: fx.Node, first: tuple[Layout, int] | None) -> bool:
        if first is None:
            return False
        args = node.args
        start = args[1] if len(args) > 1 else node.kwargs.get("start_dim", 0)
        end = args[2] if len(args) > 2 else node.kwargs.get("end_dim", -1)
        self.flatten(node, first, start, end)
        return True

    def _reduce(self, node: fx.Node, first: tuple[Layout, int] | None) -> bool:
        """Reduced over spatial dims only: channel dim 1 survives."""
        args, in_shape, out_shape = node.args, self.shape(node.args[0]), self.shape(node)
        dims = args[1] if len(args) > 1 else node.kwargs.get("dim", node.kwargs.get("axis"))
        dims = [dims] if isinstance(dims, int) else list(dims) if isinstance(dims, (tuple, list)) else None
        reduced = None if dims is None or not in_shape else {d % len(in_shape) for d in dims}
        if first is not None and in_shape and out_shape and first[1] == 1 and len(out_shape) >= 2 \
                and reduced is not None and not reduced & {0, 1} and out_shape[1] == in_shape[1]:
            self.layout[node] = first
            return True
        return False

    def _binary(self, node: fx.Node, first: tuple[Layout, int] | None = None) -> bool:
        out_shape = self.shape(node)
        tensors = [a for a in node.args if isinstance(a, fx.Node) and a in self.layout]
        if not out_shape or not tensors:
            self._freeze_node(node, f"{node.name}: binary op on untracked operands")
            return True
        cdims = {self.layout[a][1] for a in tensors}
        if len(cdims) != 1:
            self._freeze_node(node, f"{node.name}: operands disagree on the channel axis")
            return True
        cdim = cdims.pop()
        full = [a for a in tensors if (self.shape(a) or ())[cdim:cdim + 1] == (out_shape[cdim],)]

        def along_channels(a: fx.Node) -> int:  # the operand's size on the output's channel axis
            shape = self.shape(a)
            if shape is None:
                return -1
            d = cdim % len(out_shape) - (len(out_shape) - len(shape))   # broadcasting aligns from the right
            return shape[d] if d >= 0 else 1

        untracked = [a for a in node.args if isinstance(a, fx.Node) and a not in self.layout
                     and along_channels(a) != 1]
        if not full or untracked:
            self._freeze_node(node, f"{node.name}: broadcast along the channel axis not understood")
            return True
        base = self.layout[full[0]][0]
        for other in full[1:]:
            self.spaces.tie(base, self.layout[other][0],
                            f"{node.name} ({getattr(node.target, '__name__', node.target)})")
        self.layout[node] = (base, cdim)
        return True

    def _cat(self, node: fx.Node, first: tuple[Layout, int] | None = None) -> bool:
        tensors = node.args[0] if node.args else node.kwargs.get("tensors")
        dim = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim", 0)
        lays = [self.layout.get(t) for t in tensors]
        if any(lay is None for lay in lays) or len({lay[1] for lay in lays}) != 1:
            self._freeze_node(node, f"{node.name}: cat of untracked tensors")
            return True
        cdim = lays[0][1]
        ndim = len(self.shape(node) or ())
        if dim % max(ndim, 1) == cdim % max(ndim, 1):
            self.layout[node] = (tuple(seg for lay in lays for seg in lay[0]), cdim)
        else:  # concatenated along another axis: every input has the same channels
            for lay in lays[1:]:
                self.spaces.tie(lays[0][0], lay[0], f"{node.name} (cat on dim {dim})")
            self.layout[node] = lays[0]
        return True


_MODULE_RULES: dict[str, Callable[..., bool]] = {
    Channels.CONV: CouplingAnalysis._conv,
    Channels.LINEAR: CouplingAnalysis._linear,
    Channels.NORM: CouplingAnalysis._norm,
    Channels.GROUP_NORM: CouplingAnalysis._group_norm,
    Channels.LAYER_NORM: CouplingAnalysis._layer_norm,
    Channels.ELEMENTWISE: CouplingAnalysis._module_passes,
    Channels.FLATTEN: CouplingAnalysis._module_flatten,
}
_FUNCTION_RULES: dict[str, Callable[..., bool]] = {
    Channels.ELEMENTWISE: CouplingAnalysis._passes,
    Channels.VIEW: CouplingAnalysis._view,
    Channels.SPLIT: CouplingAnalysis._split,
    Channels.FLATTEN: CouplingAnalysis._flatten_call,
    Channels.REDUCE: CouplingAnalysis._reduce,
    Channels.BINARY: CouplingAnalysis._binary,
    Channels.CAT: CouplingAnalysis._cat,
}


def coupling_groups(graph: Any) -> list[Group]:
    """The channel-coupling groups of ``graph`` (a ``compiler.Graph``): prunable and frozen, with reasons."""
    return CouplingAnalysis(graph).groups
