"""MAC rules for calls whose cost depends on more than their tensors' shapes: an einsum's equation,
the window size torchvision's Swin attention is called with, which operand of ``addmm`` is the
bias. The op table (``compiler.op_table``) gives them as ``OpRule.node_macs``.

Without them ``summarize`` counted none of these MACs: Swin-T lost its attention projections
(2.96 of 4.49 GMACs) and MaxViT-T its QK^T and AV einsums (5.38 of 5.56), so a pruned model's MAC
ratio, and every figure built on it, was measured against too small a dense model."""

from __future__ import annotations

import math
from typing import Any

from torch import fx


def _shape(value: Any) -> tuple[int, ...] | None:
    shape = value.meta.get("shape") if isinstance(value, fx.Node) else None
    return tuple(shape) if shape and all(isinstance(d, int) for d in shape) else None


def _arg(node: fx.Node, index: int, name: str) -> Any:
    return node.args[index] if len(node.args) > index else node.kwargs.get(name)


def einsum_macs(node: fx.Node) -> int:
    """``torch.einsum(equation, *operands)`` contracted left to right, two operands at a time (as
    torch does without opt_einsum): each step costs the product of the sizes of every index the two
    carry. One operand (a sum or a transpose) costs none."""
    equation = _arg(node, 0, "equation")
    operands = node.args[1:]
    if len(operands) == 1 and isinstance(operands[0], (list, tuple)):
        operands = operands[0]
    shapes = [_shape(o) for o in operands]
    if not isinstance(equation, str) or len(shapes) < 2 or not all(shapes):
        return 0
    lhs, arrow, out = equation.replace(" ", "").partition("->")
    terms = lhs.split(",")
    if len(terms) != len(shapes):
        return 0
    sizes: dict[str, int] = {}
    indices = []
    for term, shape in zip(terms, shapes):
        letters = _expand_ellipsis(term, len(shape))
        if letters is None or len(letters) != len(shape):
            return 0
        for letter, size in zip(letters, shape):
            sizes[letter] = max(sizes.get(letter, 1), size)   # 1 broadcasts
        indices.append(letters)
    broadcast = max(len(shape) - len(term.replace("...", "")) for term, shape in zip(terms, shapes))
    kept = set(_expand_ellipsis(out, len(out.replace("...", "")) + broadcast) or "") if arrow else \
        {c for c in sizes if sum(c in ix for ix in indices) == 1}
    total, current = 0, set(indices[0])
    for i, letters in enumerate(indices[1:], start=1):
        step = current | set(letters)
        total += math.prod(sizes[c] for c in step)
        later = kept.union(*map(set, indices[i + 1:]))
        current = step & later
    return total


def _expand_ellipsis(term: str, ndim: int) -> list[str] | None:
    """The term's indices with ``...`` spelled out as indices of its own ("0", "1", ... counted from
    the right, so broadcast dims line up across operands)."""
    if "..." not in term:
        return list(term)
    head, _, tail = term.partition("...")
    missing = ndim - len(head) - len(tail)
    if missing < 0 or "." in head + tail:
        return None
    return [*head, *(str(k) for k in range(missing - 1, -1, -1)), *tail]


def addmm_macs(node: fx.Node) -> int:
    """``addmm``/``baddbmm``/``addbmm``(bias, a, b), a function or a method of the bias: the
    product's MACs (``addbmm`` sums its batch of products into one output)."""
    name = getattr(node.target, "__name__", str(node.target))
    a, out = _shape(_arg(node, 1, "mat1" if name == "addmm" else "batch1")), _shape(node)
    if not (a and out):
        return 0
    return math.prod(out) * a[-1] * (a[0] if name == "addbmm" else 1)


def swin_attention_macs(node: fx.Node) -> int:
    """torchvision's ``shifted_window_attention(x, qkv_weight, proj_weight, bias, window_size, ...)``,
    one call to torch.fx: the qkv and output projections of every token, padded to whole windows as
    the function pads it, and QK^T and AV inside each window."""
    x, qkv, proj = (_shape(_arg(node, i, n)) for i, n in ((0, "input"), (1, "qkv_weight"), (2, "proj_weight")))
    window = _arg(node, 4, "window_size")
    if not (x and qkv and proj and len(x) == 4 and isinstance(window, (list, tuple)) and len(window) == 2):
        return 0
    return window_attention_macs(x, (int(window[0]), int(window[1])), qkv[0] // 3, proj[0])


def window_attention_macs(x: tuple[int, ...], window: tuple[int, int], inner: int, out: int) -> int:
    """Window attention over channels-last ``x`` (N, H, W, C), tokens padded to whole windows: the
    qkv projection (C -> 3·inner), QK^T and AV inside each window, the output projection
    (inner -> out). Swin's function and its headwise form (``HeadwiseWindowAttention``) both."""
    wh, ww = window
    tokens = x[0] * -(-x[1] // wh) * wh * -(-x[2] // ww) * ww
    return tokens * (x[3] * 3 * inner + 2 * wh * ww * inner + inner * out)
