"""Swin's shifted-window attention (Liu et al., 2021; V2: Liu et al., 2022) with its three widths
independent: what channel pruning turns torchvision's ``ShiftedWindowAttention(V2)`` into.

torchvision's ``shifted_window_attention`` reads the head width as ``C // num_heads`` of its
*input* and reshapes its output to the input's ``C``: the residual stream, the heads' inner width
and the output are one number, so neither heads nor the stream prune inside it. This layer
computes the same function (``from_torchvision`` is exact) with ``num_heads * head_dim`` inner
channels, ``proj`` rows output channels, and the per-head tables (relative position bias, V2's
logit scale and bias MLP) indexed by the heads kept."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from .attention import keep_linear


class FusedQkvHeads:
    """Heads of a layer whose fused input projection holds q, k and v rows (``3 x heads x
    head_dim``) and whose output projection reads ``heads x head_dim`` columns; the layer names
    them ``input_projection`` / ``output_projection`` and has ``num_heads`` and ``head_dim``."""

    def head_rows(self) -> torch.Tensor:
        """One row per head: its q, k and v rows and its output columns (for norm criteria)."""
        w = self.input_projection.weight.detach().reshape(3, self.num_heads, -1).transpose(0, 1)
        return torch.cat([w.reshape(self.num_heads, -1),
                          self.output_projection.weight.detach().t().reshape(self.num_heads, -1)], 1)

    def _keep_projection_heads(self, heads: torch.Tensor) -> None:
        """Keep only ``heads``' rows of the input projection and columns of the output projection."""
        d, h = self.head_dim, self.num_heads
        inner = (heads[:, None] * d + torch.arange(d)).reshape(-1)
        keep_linear(self.input_projection, torch.cat([inner + part * h * d for part in range(3)]), None)
        keep_linear(self.output_projection, None, inner)


class HeadwiseWindowAttention(FusedQkvHeads, nn.Module):
    """Window attention over ``(B, H, W, C)`` with ``qkv``/``proj`` Linear layers of any widths.
    Attribute names follow torchvision's layer (``qkv``, ``proj``, ``relative_position_bias_table``
    or ``cpb_mlp``, ``logit_scale``), so the parameters keep their paths."""

    squeezer_leaf = True

    def __init__(self, qkv: nn.Linear, proj: nn.Linear, num_heads: int, window_size: list[int],
                 shift_size: list[int], attention_dropout: float = 0.0, dropout: float = 0.0) -> None:
        super().__init__()
        self.qkv, self.proj = qkv, proj
        self.num_heads, self.head_dim = num_heads, qkv.out_features // (3 * num_heads)
        self.window_size, self.shift_size = list(window_size), list(shift_size)
        self.attention_dropout, self.dropout = attention_dropout, dropout

    @classmethod
    def from_torchvision(cls, m: nn.Module) -> "HeadwiseWindowAttention":
        """The same function as torchvision's ``ShiftedWindowAttention`` or ``...V2`` ``m``."""
        return cls.from_parts(m, m.num_heads, m.window_size, m.shift_size, m.attention_dropout, m.dropout,
                              v2=hasattr(m, "cpb_mlp"))

    @classmethod
    def from_parts(cls, m: nn.Module, num_heads: int, window_size: list[int], shift_size: list[int],
                   attention_dropout: float, dropout: float, v2: bool) -> "HeadwiseWindowAttention":
        """From the tensors of a torchvision layer ``m`` (or of the plain module a traced graph
        keeps in its place: ``qkv.weight``, ``proj.weight``, the bias table or V2's ``cpb_mlp``
        layers, ``relative_position_index``, ...) and the call's settings."""
        new = cls(_linear(m.qkv), _linear(m.proj), num_heads, window_size, shift_size, attention_dropout, dropout)
        new.register_buffer("relative_position_index", m.relative_position_index.clone())
        if v2:   # continuous position bias from a small MLP, cosine attention
            first, last = m.cpb_mlp.get_submodule("0"), m.cpb_mlp.get_submodule("2")
            new.cpb_mlp = nn.Sequential(_linear(first), nn.ReLU(), _linear(last))
            new.register_buffer("relative_coords_table", m.relative_coords_table.clone())
            new.logit_scale = _parameter(m.logit_scale)
        else:
            new.relative_position_bias_table = _parameter(m.relative_position_bias_table)
        return new.train(m.training)

    @property
    def input_projection(self) -> nn.Linear:
        return self.qkv

    @property
    def output_projection(self) -> nn.Linear:
        return self.proj

    def keep_heads(self, heads: torch.Tensor) -> None:
        """Keep only ``heads`` (indices among the current heads), in place."""
        self._keep_projection_heads(heads)
        if hasattr(self, "cpb_mlp"):
            keep_linear(self.cpb_mlp[-1], heads, None)
            self.logit_scale = nn.Parameter(self.logit_scale.detach()[heads].clone(),
                                            requires_grad=self.logit_scale.requires_grad)
        else:
            table = self.relative_position_bias_table
            self.relative_position_bias_table = nn.Parameter(table.detach()[:, heads].clone(),
                                                             requires_grad=table.requires_grad)
        self.num_heads = len(heads)

    def relative_position_bias(self) -> torch.Tensor:
        n = self.window_size[0] * self.window_size[1]
        if hasattr(self, "cpb_mlp"):
            table = self.cpb_mlp(self.relative_coords_table).view(-1, self.num_heads)
        else:
            table = self.relative_position_bias_table
        bias = table[self.relative_position_index].view(n, n, -1).permute(2, 0, 1).contiguous().unsqueeze(0)
        return 16 * torch.sigmoid(bias) if hasattr(self, "cpb_mlp") else bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, h, w, _ = x.shape
        wh, ww = self.window_size
        x = F.pad(x, (0, 0, 0, (ww - w % ww) % ww, 0, (wh - h % wh) % wh))
        _, ph, pw, c = x.shape
        shift = [0 if wh >= ph else self.shift_size[0], 0 if ww >= pw else self.shift_size[1]]
        if sum(shift) > 0:
            x = torch.roll(x, shifts=(-shift[0], -shift[1]), dims=(1, 2))
        windows = (ph // wh) * (pw // ww)
        x = x.view(b, ph // wh, wh, pw // ww, ww, c).permute(0, 1, 3, 2, 4, 5).reshape(b * windows, wh * ww, c)
        attn, v = self._scores(x)
        if sum(shift) > 0:
            mask = _shift_mask(x, ph, pw, self.window_size, shift, windows)
            attn = attn.view(-1, windows, self.num_heads, wh * ww, wh * ww) + mask.unsqueeze(1).unsqueeze(0)
            attn = attn.view(-1, self.num_heads, wh * ww, wh * ww)
        attn = F.dropout(F.softmax(attn, dim=-1), p=self.attention_dropout, training=self.training)
        x = attn.matmul(v).transpose(1, 2).reshape(x.size(0), x.size(1), self.num_heads * self.head_dim)
        x = F.dropout(self.proj(x), p=self.dropout, training=self.training)
        out = self.proj.out_features
        x = x.view(b, ph // wh, pw // ww, wh, ww, out).permute(0, 1, 3, 2, 4, 5).reshape(b, ph, pw, out)
        if sum(shift) > 0:
            x = torch.roll(x, shifts=(shift[0], shift[1]), dims=(1, 2))
        return x[:, :h, :w, :].contiguous()

    def _scores(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Attention logits with the position bias, and the values, per window and head."""
        bias = self.qkv.bias
        if hasattr(self, "cpb_mlp") and bias is not None:   # V2: no key bias
            third = bias.numel() // 3
            bias = torch.cat([bias[:third], torch.zeros_like(bias[third:2 * third]), bias[2 * third:]])
        qkv = F.linear(x, self.qkv.weight, bias)
        q, k, v = qkv.reshape(x.size(0), x.size(1), 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        if hasattr(self, "cpb_mlp"):
            attn = F.normalize(q, dim=-1) @ F.normalize(k, dim=-1).transpose(-2, -1)
            attn = attn * torch.clamp(self.logit_scale, max=math.log(100.0)).exp()
        else:
            attn = (q * self.head_dim ** -0.5).matmul(k.transpose(-2, -1))
        return attn + self.relative_position_bias(), v


def _parameter(t: torch.Tensor) -> nn.Parameter:
    return nn.Parameter(t.detach().clone(), requires_grad=t.requires_grad)


def _linear(m: nn.Module) -> nn.Linear:
    """A copy of ``m`` as an nn.Linear (``m`` may be the plain module holding a traced layer's
    weight and bias)."""
    bias = getattr(m, "bias", None)
    new = nn.Linear(m.weight.shape[1], m.weight.shape[0], bias is not None).to(m.weight.device)
    new.weight = _parameter(m.weight)
    if bias is not None:
        new.bias = _parameter(bias)
    return new


def _shift_mask(x: torch.Tensor, ph: int, pw: int, window: list[int], shift: list[int], windows: int) -> torch.Tensor:
    """-100 between tokens that came from different regions before the cyclic shift."""
    mask = x.new_zeros((ph, pw))
    count = 0
    for hs in ((0, -window[0]), (-window[0], -shift[0]), (-shift[0], None)):
        for ws in ((0, -window[1]), (-window[1], -shift[1]), (-shift[1], None)):
            mask[hs[0]:hs[1], ws[0]:ws[1]] = count
            count += 1
    mask = mask.view(ph // window[0], window[0], pw // window[1], window[1]).permute(0, 2, 1, 3)
    mask = mask.reshape(windows, window[0] * window[1])
    mask = mask.unsqueeze(1) - mask.unsqueeze(2)
    return mask.masked_fill(mask != 0, -100.0).masked_fill(mask == 0, 0.0)
