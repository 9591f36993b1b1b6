"""Multi-head attention whose heads can be removed: separate q/k/v/output projections and any
number of heads of any width.

``nn.MultiheadAttention`` ties its inner width to ``embed_dim`` (``num_heads * head_dim ==
embed_dim``) and its output width too, so neither whole heads (Michel et al., 2019, "Are Sixteen
Heads Really Better than One?"; Voita et al., 2019) nor the residual stream it reads and writes
can be pruned inside it. Channel pruning rewrites it into this layer, which computes the same
function (``from_torch`` is exact) with the three widths independent."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class HeadwiseAttention(nn.Module):
    """``nn.MultiheadAttention``'s call signature and results ``(output, weights)``, computed with
    ``q_proj``/``k_proj``/``v_proj`` (``num_heads * head_dim`` rows each) and ``out_proj``.
    ``head_index``: which heads of the original layer these are (per-head attention masks of shape
    ``(N * heads, L, S)`` are given for the original heads)."""

    squeezer_leaf = True   # compiler.trace keeps it one call_module node, as it does nn.MultiheadAttention

    def __init__(self, query_dim: int, key_dim: int, value_dim: int, num_heads: int, head_dim: int,
                 out_dim: int, bias: bool = True, batch_first: bool = False, dropout: float = 0.0,
                 original_heads: int | None = None) -> None:
        super().__init__()
        inner = num_heads * head_dim
        self.q_proj = nn.Linear(query_dim, inner, bias)
        self.k_proj = nn.Linear(key_dim, inner, bias)
        self.v_proj = nn.Linear(value_dim, inner, bias)
        self.out_proj = nn.Linear(inner, out_dim, bias)
        self.num_heads, self.head_dim = num_heads, head_dim
        self.batch_first, self.dropout = batch_first, dropout
        self.original_heads = original_heads or num_heads
        self.register_buffer("head_index", torch.arange(num_heads))

    @classmethod
    def from_torch(cls, m: nn.MultiheadAttention) -> "HeadwiseAttention":
        """The same function as ``m`` (its weights split into the four projections)."""
        if m.bias_k is not None or m.add_zero_attn:
            raise ValueError("nn.MultiheadAttention with add_bias_kv or add_zero_attn has no headwise form")
        e, h = m.embed_dim, m.num_heads
        bias = m.in_proj_bias is not None
        new = cls(e, m.kdim, m.vdim, h, e // h, e, bias, m.batch_first, m.dropout)
        if m._qkv_same_embed_dim:
            weights = m.in_proj_weight.detach().chunk(3)
        else:
            weights = [w.detach() for w in (m.q_proj_weight, m.k_proj_weight, m.v_proj_weight)]
        biases = m.in_proj_bias.detach().chunk(3) if bias else (None,) * 3
        with torch.no_grad():
            for proj, w, b in zip((new.q_proj, new.k_proj, new.v_proj), weights, biases):
                proj.weight.copy_(w)
                if b is not None:
                    proj.bias.copy_(b)
            new.out_proj.weight.copy_(m.out_proj.weight)
            if new.out_proj.bias is not None and m.out_proj.bias is not None:
                new.out_proj.bias.copy_(m.out_proj.bias)
            elif new.out_proj.bias is not None:
                new.out_proj.bias.zero_()
        return new.to(m.out_proj.weight.device).train(m.training)

    def head_rows(self) -> torch.Tensor:
        """One row per head: its q, k and v rows and its output columns (for norm criteria)."""
        h = self.num_heads
        parts = [p.weight.detach().reshape(h, -1) for p in (self.q_proj, self.k_proj, self.v_proj)]
        parts.append(self.out_proj.weight.detach().t().reshape(h, -1))
        return torch.cat(parts, 1)

    def keep_heads(self, heads: torch.Tensor) -> None:
        """Keep only ``heads`` (indices among this layer's current heads), in place."""
        rows = (heads[:, None] * self.head_dim + torch.arange(self.head_dim)).reshape(-1)
        for proj in (self.q_proj, self.k_proj, self.v_proj):
            keep_linear(proj, rows, None)
        keep_linear(self.out_proj, None, rows)
        self.num_heads = len(heads)
        self.head_index = self.head_index[heads]

    def forward(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                key_padding_mask: torch.Tensor | None = None, need_weights: bool = True,
                attn_mask: torch.Tensor | None = None, average_attn_weights: bool = True,
                is_causal: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
        unbatched = query.dim() == 2
        if unbatched:
            query, key, value = query.unsqueeze(1), key.unsqueeze(1), value.unsqueeze(1)
            key_padding_mask = None if key_padding_mask is None else key_padding_mask.unsqueeze(0)
        if not self.batch_first or unbatched:
            query, key, value = query.transpose(0, 1), key.transpose(0, 1), value.transpose(0, 1)
        n, tq, tk = query.shape[0], query.shape[1], key.shape[1]
        q = self.q_proj(query).view(n, tq, self.num_heads, self.head_dim).transpose(1, 2)
        k = self.k_proj(key).view(n, tk, self.num_heads, self.head_dim).transpose(1, 2)
        v = self.v_proj(value).view(n, tk, self.num_heads, self.head_dim).transpose(1, 2)
        if is_causal and attn_mask is None:
            attn_mask = torch.ones(tq, tk, dtype=torch.bool, device=q.device).triu(1)
        mask = self._additive_mask(attn_mask, key_padding_mask, n, tq, tk, q.dtype)
        p = self.dropout if self.training else 0.0
        weights = None
        if need_weights:
            scores = q @ k.transpose(-2, -1) * self.head_dim ** -0.5
            attn = torch.softmax(scores if mask is None else scores + mask, -1)
            out = F.dropout(attn, p, self.training) @ v
            weights = attn.mean(1) if average_attn_weights else attn
            weights = weights.squeeze(0) if unbatched else weights
        else:
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=p)
        out = self.out_proj(out.transpose(1, 2).reshape(n, tq, self.num_heads * self.head_dim))
        if not self.batch_first or unbatched:
            out = out.transpose(0, 1)
        return (out.squeeze(1) if unbatched else out), weights

    def _additive_mask(self, attn_mask, key_padding_mask, n: int, tq: int, tk: int, dtype) -> torch.Tensor | None:
        """``nn.MultiheadAttention``'s masks (bool: True masks out; float: added) as one additive
        mask over (N, heads, L, S); a per-head mask keeps the rows of the heads kept."""
        mask = None
        if attn_mask is not None:
            mask = _additive(attn_mask, dtype)
            if mask.dim() == 3:
                mask = mask.view(n, self.original_heads, tq, tk)[:, self.head_index]
        if key_padding_mask is not None:
            pad = _additive(key_padding_mask, dtype).view(n, 1, 1, tk)
            mask = pad if mask is None else mask + pad
        return mask


def _additive(mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    if mask.dtype == torch.bool:
        return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill(mask, float("-inf"))
    return mask.to(dtype)


def keep_linear(linear: nn.Linear, rows: torch.Tensor | None, cols: torch.Tensor | None) -> None:
    """Keep ``rows`` (outputs) and ``cols`` (inputs) of ``linear``, in place."""
    w = linear.weight.detach()
    if rows is not None:
        w = w.index_select(0, rows.to(w.device))
        if linear.bias is not None:
            linear.bias = nn.Parameter(linear.bias.detach().index_select(0, rows.to(w.device)).clone(),
                                       requires_grad=linear.bias.requires_grad)
    if cols is not None:
        w = w.index_select(1, cols.to(w.device))
    linear.weight = nn.Parameter(w.clone(), requires_grad=linear.weight.requires_grad)
    linear.out_features, linear.in_features = w.shape
