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

from . import coupling_heads as heads
from . import coupling_views as views
from .channel_spaces import ChannelSpaces, Consumer, Group, Layout, Segment, positions
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

    def __init__(self, graph: Any, whole_groups: Callable[[nn.Conv2d], bool] | None = None) -> None:
        self.graph = graph
        # which grouped convs are pruned by whole groups, not the same channels of every group
        self.whole_groups = whole_groups or (lambda _conv: False)
        self.whole_group_convs: set[str] = set()   # the grouped convs tied by whole groups (coupling_rules.conv)
        self.modules = dict(graph.module.named_modules())
        self.spaces = ChannelSpaces()
        self.consumers: list[Consumer] = []
        self.layout: dict[fx.Node, tuple[Layout, int]] = {}   # node -> (layout, channel dim)
        self.module_io: dict[str, tuple[Layout, Layout]] = {}
        self.pieces: dict[fx.Node, tuple[list[Layout], int]] = {}   # split/chunk node -> piece layouts, dim
        # a (G, C/G) split of the channel axis: (layout, cdim, G, C/G, transposed, the split view)
        self.shuffles: dict[fx.Node, tuple[Layout, int, int, int, bool, fx.Node]] = {}
        self.heads: dict[fx.Node, Any] = {}   # tensors split into attention heads (compiler.coupling_heads)
        # literal sizes in view/reshape arguments that must follow the pruned channels:
        # node -> (dim, layout whose kept count sets the size, divisor)
        self.view_sizes: dict[fx.Node, tuple[int, Layout, int]] = {}
        self.tuple_outputs: dict[fx.Node, list] = {}   # module returning a tuple -> (layout, cdim) per item
        self.norm_shapes: dict[fx.Node, Layout] = {}   # F.layer_norm node -> layout of its normalized axis
        self.attr_uses: dict[str, tuple[Layout, int]] = {}   # parameter used functionally -> (layout, dim)
        self._attr_users: set[tuple[fx.Node, fx.Node]] = set()   # (get_attr, user) pairs understood
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
        out += [item for a in node.all_input_nodes for item in self.tuple_outputs.get(a, ())]
        out += [(self.heads[a].lay, 0) for a in node.all_input_nodes if a in self.heads]
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

    def consume_attr(self, user: fx.Node, attr: fx.Node, layout: Layout, dim: int) -> None:
        """``user`` indexes parameter ``attr`` (a get_attr node) on ``dim`` by ``layout``'s channels:
        the parameter is pruned with them; its other uses must agree (or it freezes)."""
        self._attr_users.add((attr, user))
        seen = self.attr_uses.get(attr.target)
        if seen is None:
            self.attr_uses[attr.target] = (layout, dim)
            self.consumers.append(Consumer(attr.target, "tensor", layout, dim))
        elif seen[1] != dim:
            self.spaces.freeze(seen[0], f"parameter '{attr.target}' is indexed by channels on two axes")
            self.spaces.freeze(layout, f"parameter '{attr.target}' is indexed by channels on two axes")
        else:
            self.spaces.tie(seen[0], layout, f"parameter '{attr.target}' used twice")

    def _check_attr_uses(self) -> None:
        """A parameter pruned with some channels must not reach an op the walk did not follow."""
        for node in self.graph.module.graph.nodes:
            if node.op != "get_attr" or node.target not in self.attr_uses:
                continue
            for user in node.users:
                if (node, user) not in self._attr_users and not self._shape_query(user):
                    self.spaces.freeze(self.attr_uses[node.target][0],
                                       f"parameter '{node.target}' is also used by {user.name}, "
                                       "which the analysis does not follow")

    def _shape_query(self, node: fx.Node) -> bool:
        """``x.size()``, ``x.dim()``, ``x.shape``, ``x.dtype``...: no tensor comes out."""
        return node_rule(node, self.modules).channels == Channels.SHAPE \
            or node.target is getattr and len(node.args) > 1 and node.args[1] in ("shape", "dtype", "device", "ndim")

    def _check_channel_count_reads(self) -> None:
        """A tracked tensor's channel count read as a number (``b, h, w, c = x.shape``) changes
        with pruning: fine where it sizes the same channels in a view, frozen anywhere else (Swin's
        ``c // heads`` sizing another layer's output)."""
        for node in self.graph.module.graph.nodes:
            shape_query = node.target is getattr and node.args[1:2] == ("shape",) \
                or node.op == "call_method" and node.target == "size"
            src = node.args[0] if shape_query else None
            if src not in self.layout or not self.shape(src):
                continue
            lay, cdim = self.layout[src]
            ndim = len(self.shape(src))
            if len(node.args) > 1 and node.target == "size":   # x.size(i): one number
                reads = [node] if isinstance(node.args[1], int) and node.args[1] % ndim == cdim % ndim else []
            else:
                reads = self._channel_count_reads(node, list(range(ndim)), cdim % ndim, lay)
            for value in reads:
                for user in value.users:
                    if not self._sizes_these_channels(value, user, lay):
                        self._freeze_reader(user, value, lay,
                                            f"{user.name} uses {src.name}'s channel count ({value.name})")

    def _sizes_these_channels(self, value: fx.Node, user: fx.Node, lay: Layout) -> bool:
        """``user`` of the channel count ``value`` sizes the same channels in a view the analysis
        follows: their axis (``x.view(b, h, w, c)``), or the width of a (G, C/G) split (``c // G``)."""
        if views._is_reshape(user):
            return self._sizes_at(user, value, lay)
        if user.target is operator.add and any(isinstance(arg, tuple) and value in arg for arg in user.args):
            # a shape tuple built around the count: each view it sizes must size these channels with it
            return bool(user.users) and all(views._is_reshape(view) and self._sizes_at(view, value, lay)
                                            for view in user.users)
        if user.target is operator.floordiv and user.args[0] is value and isinstance(user.args[1], int):
            for view in user.users:
                split = self.shuffles.get(view)
                dims = self.view_dims(view) if views._is_reshape(view) else []
                if not (split and split[0] == lay and split[1] + 1 < len(dims) and dims[split[1] + 1] is user):
                    return False
            return True
        return False

    def _sizes_at(self, view: fx.Node, value: fx.Node, lay: Layout) -> bool:
        """``view`` keeps the channels ``lay`` on the axis it sizes with ``value``."""
        kept, dims = self.layout.get(view), self.view_dims(view)
        return bool(kept and self._same_channels(kept[0], lay) and kept[1] < len(dims) and dims[kept[1]] is value)

    def _same_channels(self, a: Layout, b: Layout) -> bool:
        """The same channels, or the same set in another order (a channel shuffle's merged view)."""
        if self.spaces.same(a, b):
            return True
        pa, pb = positions(a), positions(b)
        return pa is not None and pb is not None and \
            sorted((self.find(s), c) for s, c in pa) == sorted((self.find(s), c) for s, c in pb)

    def _channel_count_reads(self, shape: fx.Node, axes: list[int], cdim: int, lay: Layout) -> list[fx.Node]:
        """The nodes holding the channel count among the uses of a shape tuple over ``axes``."""
        out = []
        for user in shape.users:
            index = user.args[1] if user.target is operator.getitem else None
            if isinstance(index, int):
                out += [user] if axes[index] == cdim else []
            elif isinstance(index, slice):
                out += self._channel_count_reads(user, axes[index], cdim, lay)
            elif cdim in axes:
                self._freeze_reader(user, shape, lay, f"{user.name} uses a shape that includes the channel count")
        return out

    def _freeze_reader(self, user: fx.Node, value: fx.Node, lay: Layout, reason: str) -> None:
        """The channels whose count ``user`` reads freeze, and so do the channels of a view that
        ``user`` (or a shape tuple it builds) sizes on their axis with that count: ``y.view(z.size())``."""
        self.spaces.freeze(lay, reason)
        for node in [user, *(user.users if user.target is operator.add else ())]:
            if node in self.layout and views._is_reshape(node):
                dims, cdim = self.view_dims(node), self.layout[node][1]
                if cdim < len(dims) and (dims[cdim] is value or dims[cdim] is user):
                    self.spaces.freeze(self.layout[node][0], reason)

    def flatten(self, node: fx.Node, x: tuple[Layout, int], start: int, end: int) -> None:
        """Axes ``start..end`` merged: channels before them stay, after them move left; channels
        leading the merged axes repeat once per position of the axes after them (ViT's patch
        ``flatten(2)`` keeps channels on axis 1; a classifier's ``flatten(1)`` repeats them)."""
        shape = self.shape(node.args[0])
        lay, cdim = x
        if shape is None or not isinstance(start, int) or not isinstance(end, int):
            self.freeze_node(node, f"{node.name}: flatten from dim {start} not understood")
            return
        start, end, cdim = start % len(shape), end % len(shape), cdim % len(shape)
        if cdim < start or cdim > end:
            self.layout[node] = (lay, cdim if cdim < start else cdim - (end - start))
        elif cdim == start:
            k = math.prod(shape[start + 1:end + 1])
            self.layout[node] = (tuple(Segment(s.space, s.start, s.length, s.repeat * k) for s in lay), cdim)
        else:
            self.freeze_node(node, f"{node.name}: flatten merges the channel axis {cdim} into the axes before it")

    # ---- the walk ------------------------------------------------------------------------------
    def _run(self) -> None:
        for node in self.graph.module.graph.nodes:
            try:
                self._visit(node)
            except Exception as exc:  # noqa: BLE001 - an unexpected structure freezes, never crashes
                self.freeze_node(node, f"{node.name}: analysis failed ({type(exc).__name__}: {exc})")
        self._check_attr_uses()
        self._check_channel_count_reads()

    def _visit(self, node: fx.Node) -> None:
        if node.op == "placeholder":
            self.fresh(node, "model input")
        elif node.op == "output":
            for lay, _ in self._inputs_layouts(node):
                self.spaces.freeze(lay, "model output keeps its size")
        elif node.op == "get_attr":
            return   # a parameter used functionally: the op using it decides (consume_attr)
        elif node.op == "call_module":
            self._visit_module(node, self.modules[node.target])
        elif node.op in ("call_function", "call_method"):
            self._visit_function(node)

    def _visit_module(self, node: fx.Node, m: nn.Module) -> None:
        if any(arg in self.heads for arg in node.all_input_nodes):
            if not heads.step(self, node):
                self.freeze_node(node, f"{node.target}: use of attention heads not understood")
            return
        rule = module_rule(m)
        tensor_in = bool(node.args) and isinstance(node.args[0], fx.Node)
        x = self.layout.get(node.args[0]) if tensor_in else None
        if rule.axis is not None and tensor_in:
            x = self._input_on(node, node.args[0], rule.axis)
        handler = MODULE_RULES.get(rule.channels)
        if handler is not None and (x is not None or rule.channels == Channels.EMBEDDING) and handler(self, node, m, x):
            return
        what = rule.note or f"{type(m).__name__} is not understood by the coupling analysis"
        self.freeze_node(node, f"{node.target}: {what}")

    def _visit_function(self, node: fx.Node) -> None:
        t, args = node.target, node.args
        rule = node_rule(node, self.modules)
        first = self.layout.get(args[0]) if args and isinstance(args[0], fx.Node) else None
        if self._shape_query(node):
            return  # shape queries: no tensor
        if any(arg in self.heads for arg in node.all_input_nodes):
            if not heads.step(self, node):
                self.freeze_node(node, f"{node.name}: use of attention heads not understood")
            return
        if args and isinstance(args[0], fx.Node) and args[0] in self.shuffles:
            if not views.shuffle_step(self, node) and not heads.split_into_heads(self, node):
                self.freeze_node(node, f"{node.name}: use of a (groups, channels) view not understood")
            return
        if t is operator.getitem and args[0] in self.tuple_outputs:
            items = self.tuple_outputs[args[0]]
            if isinstance(args[1], int) and -len(items) <= args[1] < len(items):
                self.layout[node] = items[args[1]]
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
