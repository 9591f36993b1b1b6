"""MaxViT's relative-position multi-head attention (Tu et al., 2022) with its widths independent:
what channel pruning turns torchvision's ``RelativePositionalMultiHeadAttention`` into.

torchvision's layer reshapes its heads' output back to its *input* width ``D`` (``out.reshape(B,
G, P, D)``) before ``merge``: the stream and the heads' inner width are one number there, so
neither prunes inside it. This layer computes the same function (``from_parts`` is exact) over
``(B, G, P, D)`` with ``num_heads * head_dim`` inner channels, ``merge`` rows as output channels,
the relative position bias table indexed by the heads kept, and the original layer's
``scale_factor`` (its input width ** -0.5) kept as a constant."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .window_attention import FusedQkvHeads, _linear, _parameter


class HeadwiseRelativeAttention(FusedQkvHeads, nn.Module):
    """Attention within each of G groups of P tokens; ``to_qkv``/``merge`` keep torchvision's names."""

    squeezer_leaf = True

    def __init__(self, to_qkv: nn.Linear, merge: nn.Linear, num_heads: int, scale_factor: float,
                 table: nn.Parameter, index: torch.Tensor) -> None:
        super().__init__()
        self.to_qkv, self.merge = to_qkv, merge
        self.num_heads, self.head_dim = num_heads, to_qkv.out_features // (3 * num_heads)
        self.scale_factor = float(scale_factor)
        self.relative_position_bias_table = table
        self.register_buffer("relative_position_index", index)

    @classmethod
    def from_parts(cls, m: nn.Module, index: torch.Tensor | None = None) -> "HeadwiseRelativeAttention":
        """From torchvision's layer ``m`` (or the plain module a traced graph keeps in its place,
        holding ``to_qkv``, ``merge`` and the bias table; ``index``: the table's index, where the
        graph keeps it as a constant of its own)."""
        table = m.relative_position_bias_table
        index = m.relative_position_index if index is None else index
        return cls(_linear(m.to_qkv), _linear(m.merge), table.shape[1], m.to_qkv.weight.shape[1] ** -0.5,
                   _parameter(table), index.reshape(-1).clone()).train(m.training)

    @property
    def input_projection(self) -> nn.Linear:
        return self.to_qkv

    @property
    def output_projection(self) -> nn.Linear:
        return self.merge

    def keep_heads(self, heads: torch.Tensor) -> None:
        """Keep only ``heads`` (indices among the current heads), in place."""
        self._keep_projection_heads(heads)
        table = self.relative_position_bias_table
        self.relative_position_bias_table = nn.Parameter(table.detach()[:, heads].clone(),
                                                         requires_grad=table.requires_grad)
        self.num_heads = len(heads)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, g, p, _ = x.shape
        h, dh = self.num_heads, self.head_dim
        q, k, v = (t.reshape(b, g, p, h, dh).permute(0, 1, 3, 2, 4) for t in self.to_qkv(x).chunk(3, dim=-1))
        bias = self.relative_position_bias_table[self.relative_position_index].view(p, p, -1)
        logits = q.matmul((k * self.scale_factor).transpose(-2, -1)) + bias.permute(2, 0, 1).unsqueeze(0)
        out = F.softmax(logits, dim=-1).matmul(v)
        return self.merge(out.permute(0, 1, 3, 2, 4).reshape(b, g, p, h * dh))
