"""Channel spaces and layouts, the vocabulary of the coupling analysis (``compiler.coupling``).

A *space* is a set of channels born at the output of a Conv2d/Linear (its filters). A *layout*
describes a tensor's channel axis as segments ``(space, start, length, repeat)`` of spaces.
:class:`ChannelSpaces` ties spaces together (union-find), freezes them with reasons, records
channel ties between equal blocks, and turns all that into :class:`Group`\\ s.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


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

    module: str        # a module's qualified name; for role "tensor", a parameter's or buffer's
    role: str          # "in" (Conv2d/Linear weight dim 1), "grouped" (grouped Conv2d weight dim 1, per group),
                       # "param" (BN/LN/GroupNorm/depthwise: every tensor dim 0),
                       # "tensor" (a parameter used functionally, e.g. a layer scale or position embedding)
    layout: Layout
    dim: int = 0       # role "tensor": the axis of the parameter the layout indexes


@dataclass
class Group:
    """Tied spaces of equal size; channel ``c`` of the group is channel ``c`` of each space.

    Spaces whose channels are tied one by one through a permutation (ShuffleNet's shuffles tie a
    block's branch to channels of earlier blocks) make one group of several roots: ``members``
    lists (root, offset), the group's channels being the members' channels end to end."""

    id: int
    size: int
    producers: list[tuple[str, int]]          # (module, space) whose output rows are the channels
    root: int = -1                            # the union-find root space that stands for the group
    consumers: list[Consumer] = field(default_factory=list)
    frozen: list[str] = field(default_factory=list)
    classes: list[list[int]] = field(default_factory=list)  # channels kept or pruned together
    head_width: int = 0   # attention heads of this many channels are the units (compiler.coupling_heads)
    members: list[tuple[int, int]] = field(default_factory=list)   # (root, offset); empty: ``root`` alone

    def offset(self, root: int) -> int | None:
        """Where the channels of union-find root ``root`` start in the group (None: not a member)."""
        if not self.members:
            return 0 if root == self.root else None
        return next((off for r, off in self.members if r == root), None)

    def spans(self) -> list[tuple[int, range]]:
        """(root, its channels in the group's numbering) per member; the root alone if none."""
        members = self.members or [(self.root, 0)]
        ends = [off for _, off in members[1:]] + [self.size]
        return [(root, range(off, end)) for (root, off), end in zip(members, ends)]

    def split(self, keep) -> dict[int, torch.Tensor]:
        """The kept channels (group numbering) per member root, local to it; roots losing none left out."""
        out = {}
        for root, span in self.spans():
            local = sorted(c - span.start for c in keep if c in span)
            if len(local) < len(span):
                out[root] = torch.tensor(local, dtype=torch.long)
        return out

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


# ---- layouts ---------------------------------------------------------------------------------------
def positions(layout: Layout) -> list[tuple[int, int]] | None:
    """(space, channel) at each position of a channel axis (None if features repeat)."""
    if any(seg.repeat != 1 for seg in layout):
        return None
    return [(seg.space, c) for seg in layout for c in range(seg.start, seg.start + seg.length)]


def compress(layout: Layout) -> Layout:
    """Adjacent single-feature segments of one space merged."""
    out: list[Segment] = []
    for seg in layout:
        last = out[-1] if out else None
        if last and last.space == seg.space and last.repeat == seg.repeat == 1 \
                and last.start + last.length == seg.start:
            out[-1] = Segment(last.space, last.start, last.length + seg.length)
        else:
            out.append(seg)
    return tuple(out)


def slice_layout(lay: Layout, start: int, length: int) -> Layout:
    """Positions ``[start, start + length)`` of a layout without repeats."""
    out, pos = [], 0
    for seg in lay:
        lo, hi = max(start, pos), min(start + length, pos + seg.length)
        if lo < hi:
            out.append(Segment(seg.space, seg.start + lo - pos, hi - lo, 1))
        pos += seg.length
    return tuple(out)


# ---- spaces --------------------------------------------------------------------------------------------
class ChannelSpaces:
    """Union-find over channel spaces, with freeze reasons, producers and channel ties."""

    def __init__(self) -> None:
        self.parent: list[int] = []
        self.size: list[int] = []
        self.frozen: dict[int, list[str]] = {}
        self.producer: dict[int, str] = {}
        self.ties: list[tuple[int, int, int, int, str]] = []   # (space, channel) kept iff (space, channel)
        self.head_width: dict[int, int] = {}   # space -> width of the attention heads its channels form

    def new(self, size: int, producer: str | None = None, frozen: str | None = None) -> int:
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

    def union(self, a: int, b: int, why: str) -> None:
        ra, rb = self.find(a), self.find(b)
        if ra == rb:
            return
        if self.size[ra] != self.size[rb]:
            self.freeze_spaces([ra, rb], f"{why}: tied channel counts differ")
            return
        self.parent[rb] = ra
        self.frozen.setdefault(ra, []).extend(self.frozen.pop(rb, []))

    def freeze_spaces(self, spaces, reason: str) -> None:
        for s in spaces:
            self.frozen.setdefault(self.find(s), []).append(reason)

    def freeze(self, layout: Layout | None, reason: str) -> None:
        if layout:
            self.freeze_spaces([seg.space for seg in layout], reason)

    def _whole_spaces_line_up(self, a: Layout, b: Layout) -> bool:
        """Both layouts are the same sequence of whole spaces, segment for segment."""
        return len(a) == len(b) and all(x.length == y.length and x.repeat == y.repeat and x.start == y.start == 0
                                        and x.length == self.size[x.space] == self.size[y.space] for x, y in zip(a, b))

    def same(self, a: Layout, b: Layout) -> bool:
        """The two layouts hold the same channels, the same way (tied spaces count as one)."""
        return a == b or self._whole_spaces_line_up(a, b) and all(self.find(x.space) == self.find(y.space)
                                                                  for x, y in zip(a, b))

    def tie(self, a: Layout, b: Layout, why: str) -> None:
        """Tie two layouts channel by channel (both must cover the same channels the same way)."""
        if self._whole_spaces_line_up(a, b):
            for x, y in zip(a, b):
                self.union(x.space, y.space, why)
        elif a != b:
            self.freeze(a, f"{why} with differently composed channels")
            self.freeze(b, f"{why} with differently composed channels")

    def tie_channels(self, a: Layout, b: Layout, why: str) -> None:
        """Tie two layouts position by position: whole spaces where they line up (``tie``),
        channel by channel otherwise (slices of one fused projection)."""
        if self._whole_spaces_line_up(a, b) and all(x.repeat == 1 for x in a):
            self.tie(a, b, why)
            return
        pa, pb = positions(a), positions(b)
        if pa is None or pb is None or len(pa) != len(pb):
            self.freeze(a, f"{why}: channels cannot be paired")
            self.freeze(b, f"{why}: channels cannot be paired")
            return
        self.ties += [(*x, *y, why) for x, y in zip(pa, pb) if x != y]

    def tie_within_blocks(self, layout: Layout, block: int, why: str) -> None:
        """Every ``block`` consecutive channels are kept or pruned together (an attention head)."""
        pos = positions(layout) or []
        self.ties += [(*pos[i - i % block], *pos[i], why) for i in range(len(pos)) if i % block]
        self.head_width.update({space: block for space, _ in pos})

    def tie_blocks(self, layout: Layout, blocks: int, why: str) -> bool:
        """Local channel l of every one of ``blocks`` equal blocks is kept iff l of block 0 is."""
        pos = positions(layout)
        if pos is None or blocks < 1 or len(pos) % blocks:
            self.freeze(layout, f"{why}: channels cannot be split into {blocks} equal blocks")
            return False
        width = len(pos) // blocks
        for q in range(1, blocks):
            for lc in range(width):
                self.ties.append((*pos[lc], *pos[q * width + lc], why))
        return True

    def tie_whole_blocks(self, a: Layout, b: Layout, blocks: int, why: str) -> bool:
        """Block q of ``a`` and block q of ``b`` (each split into ``blocks`` equal blocks) are kept
        or pruned whole and together: a grouped conv pruned by its groups (input and output)."""
        pa, pb = positions(a), positions(b)
        if pa is None or pb is None or blocks < 1 or len(pa) % blocks or len(pb) % blocks:
            for lay in (a, b):
                self.freeze(lay, f"{why}: channels cannot be split into {blocks} equal blocks")
            return False
        wa, wb = len(pa) // blocks, len(pb) // blocks
        for q in range(blocks):
            first = pa[q * wa]
            for other in [*pa[q * wa + 1:(q + 1) * wa], *pb[q * wb:(q + 1) * wb]]:
                self.ties.append((*first, *other, why))
        return True

    def groups(self, consumers: list[Consumer]) -> list[Group]:
        """One group per union-find root, with its producers, consumers, tied classes and reasons."""
        by_root: dict[int, Group] = {}
        for sid in range(len(self.parent)):
            root = self.find(sid)
            group = by_root.setdefault(root, Group(len(by_root), self.size[root], [], root))
            if sid in self.producer:
                group.producers.append((self.producer[sid], sid))
        head_width: dict[int, int] = {}
        for sid, width in self.head_width.items():
            root = self.find(sid)
            head_width[root] = max(head_width.get(root, 0), width)
        links: dict[int, list[tuple[int, int]]] = {}
        across: list[tuple[int, int, int, int]] = []
        for sa, ca, sb, cb, why in self.ties:
            ra, rb = self.find(sa), self.find(sb)
            if ra == rb:
                links.setdefault(ra, []).append((ca, cb))
            else:
                across.append((ra, ca, rb, cb))
        for root, group in by_root.items():
            group.classes = _classes(group.size, links.get(root, []))
            group.frozen = list(self.frozen.get(root, []))
            group.head_width = head_width.get(root, 0)
            if not group.producers:
                group.frozen.append("no layer produces these channels")
        for c in consumers:
            for root in {self.find(seg.space) for seg in c.layout}:
                by_root[root].consumers.append(c)
        return _merged(list(by_root.values()), across)


def _merged(groups: list[Group], across: list[tuple[int, int, int, int]]) -> list[Group]:
    """Groups whose channels are tied across roots, made one group of several members: each
    channel tie becomes a link between the members' channels at their offsets. A frozen member
    freezes the whole."""
    if not across:
        return groups
    parent = {g.root: g.root for g in groups}

    def find(r: int) -> int:
        while parent[r] != r:
            parent[r] = parent[parent[r]]
            r = parent[r]
        return r

    for ra, _, rb, _ in across:
        parent[find(ra)] = find(rb)
    components: dict[int, list[Group]] = {}
    for g in groups:
        components.setdefault(find(g.root), []).append(g)
    out = []
    for members in components.values():
        if len(members) == 1:
            out.append(members[0])
            continue
        offsets, size = {}, 0
        for g in members:
            offsets[g.root], size = size, size + g.size
        links = [(offsets[g.root] + a, offsets[g.root] + b) for g in members for cls in g.classes
                 for a, b in zip(cls, cls[1:])]
        links += [(offsets[ra] + ca, offsets[rb] + cb) for ra, ca, rb, cb in across if ra in offsets]
        frozen = [why for g in members for why in g.frozen if why != "no layer produces these channels"]
        if any(not g.producers for g in members):
            frozen.append("no layer produces some of these channels")
        consumers = list({id(c): c for g in members for c in g.consumers}.values())
        out.append(Group(members[0].id, size, [p for g in members for p in g.producers], members[0].root, consumers,
                         frozen, _classes(size, links), max(g.head_width for g in members),
                         [(g.root, offsets[g.root]) for g in members]))
    for i, g in enumerate(out):
        g.id = i
    return out


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
