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
from typing import Any

from torch import fx, nn

from . import coupling_views as views
from .channel_spaces import ChannelSpaces, Consumer, Group, Layout, Segment
from .coupling_rules import FUNCTION_RULES, MODULE_RULES
from .op_table import Channels, module_rule, node_rule

__all__ = ["Consumer", "CouplingAnalysis", "Group", "Layout", "Segment", "coupling_groups"]


class CouplingAnalysis:
    """Runs once over a traced ``compiler.Graph``; ``groups`` holds the result.

    The walk gives every node a layout (``layout``: node -> (layout, channel dim)); each op is
    handled by the rule its row in ``compiler.op_table`` names (``compiler.coupling_rules``);
    the spaces, ties and freezes live in ``spaces``."""

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

    def fresh(self, node: fx.Node, reason: str, cdim: int = 1) -> None:
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

    def freeze_node(self, node: fx.Node, reason: str) -> None:
        for lay, _ in self._inputs_layouts(node):
            self.spaces.freeze(lay, reason)
        self.fresh(node, reason)

    def output_space(self, node: fx.Node, name: str, size: int, in_layout: Layout, cdim: int) -> None:
        if name in self.module_io:  # the same module called again: tie both sides to the first call
            first_in, first_out = self.module_io[name]
            self.spaces.tie(first_in, in_layout, f"{name} used twice")
            self.layout[node] = (first_out, cdim)
            return
        out = (Segment(self.spaces.new(size, producer=name), 0, size),)
        self.module_io[name] = (in_layout, out)
        self.layout[node] = (out, cdim)

    def reuse(self, name: str, in_layout: Layout, out_layout: Layout) -> None:
        if name in self.module_io:
            self.spaces.tie(self.module_io[name][0], in_layout, f"{name} used twice")
        else:
            self.module_io[name] = (in_layout, out_layout)

    def flatten(self, node: fx.Node, x: tuple[Layout, int], start: int, end: int) -> None:
        shape = self.shape(node.args[0])
        lay, cdim = x
        if shape is None or start not in (1, -len(shape) + 1) or cdim != 1 or end not in (-1, len(shape) - 1):
            self.freeze_node(node, f"{node.name}: flatten from dim {start} not understood")
            return
        k = math.prod(shape[2:])
        self.layout[node] = (tuple(Segment(s.space, s.start, s.length, s.repeat * k) for s in lay), 1)

    # ---- the walk ------------------------------------------------------------------------------
    def _run(self) -> None:
        for node in self.graph.module.graph.nodes:
            try:
                self._visit(node)
            except Exception as exc:  # noqa: BLE001 - an unexpected structure freezes, never crashes
                self.freeze_node(node, f"{node.name}: analysis failed ({type(exc).__name__}: {exc})")

    def _visit(self, node: fx.Node) -> None:
        if node.op == "placeholder":
            self.fresh(node, "model input")
        elif node.op == "output":
            for lay, _ in self._inputs_layouts(node):
                self.spaces.freeze(lay, "model output keeps its size")
        elif node.op == "get_attr":
            self.fresh(node, f"parameter '{node.target}' used functionally")
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
        handler = MODULE_RULES.get(rule.channels)
        if handler is not None and x is not None and handler(self, node, m, x):
            return
        what = rule.note or f"{type(m).__name__} is not understood by the coupling analysis"
        self.freeze_node(node, f"{node.target}: {what}")

    def _visit_function(self, node: fx.Node) -> None:
        t, args = node.target, node.args
        rule = node_rule(node, self.modules)
        first = self.layout.get(args[0]) if args and isinstance(args[0], fx.Node) else None
        if rule.channels == Channels.SHAPE or t is getattr and len(args) > 1 \
                and args[1] in ("shape", "dtype", "device", "ndim"):
            return  # shape queries: no tensor
        if args and isinstance(args[0], fx.Node) and args[0] in self.shuffles:
            if not views.shuffle_step(self, node):
                self.freeze_node(node, f"{node.name}: use of a (groups, channels) view not understood")
            return
        if t in (getattr, operator.getitem) and first is None and not (args and args[0] in self.pieces):
            return  # indexing a non-tensor (a size tuple, a module output tuple)
        if t is operator.getitem and args[0] in self.pieces:
            pieces, cdim = self.pieces[args[0]]
            self.layout[node] = (pieces[args[1]], cdim)
            return
        handler = FUNCTION_RULES.get(rule.channels)
        if handler is not None and handler(self, node, first):
            return
        what = getattr(t, "__name__", str(t))
        self.freeze_node(node, f"{node.name}: '{what}' is not understood by the coupling analysis")


def coupling_groups(graph: Any) -> list[Group]:
    """The channel-coupling groups of ``graph`` (a ``compiler.Graph``): prunable and frozen, with reasons."""
    return CouplingAnalysis(graph).groups
