"""Linear layers stored another way, turned into ``nn.Linear`` so that every pass family takes them.

Hugging Face's ``Conv1D`` (GPT-2's attention and MLP projections) is a Linear whose weight is
stored (in, out) and applied with ``addmm``. The op table already reads it as a Linear for the
channel analysis; the passes that rewrite a layer's weight (low-rank, sparsity, clustering,
binarization) work on ``nn.Linear``, so they first swap such layers for the same ``nn.Linear``
(weight transposed, the same bias): the outputs are the same up to the summation order of the
matrix product.
"""

from __future__ import annotations

import torch
from torch import nn

from .graph import Graph
from .op_table import Channels, module_rule


def is_transposed_linear(m: nn.Module) -> bool:
    """A Linear whose weight is stored (in, out): Hugging Face's Conv1D (GPT-2)."""
    return module_rule(m).channels == Channels.LINEAR and not isinstance(m, nn.Linear)


def as_linear(m: nn.Module) -> nn.Linear:
    """The ``nn.Linear`` computing what the (in, out)-stored layer ``m`` computes."""
    n_in, n_out = m.weight.shape
    bias = getattr(m, "bias", None)
    new = nn.Linear(n_in, n_out, bias is not None, device=m.weight.device, dtype=m.weight.dtype)
    with torch.no_grad():
        new.weight.copy_(m.weight.t())
        if bias is not None:
            new.bias.copy_(bias)
    new.weight.requires_grad_(m.weight.requires_grad)
    return new.train(m.training)


def linear_forms(graph: Graph) -> list[str]:
    """Swap every (in, out)-stored Linear of ``graph`` for its ``nn.Linear``, in place; the names."""
    swapped = [name for name, m in graph.module.named_modules() if name and is_transposed_linear(m)]
    for name in swapped:
        graph.module.set_submodule(name, as_linear(graph.module.get_submodule(name)))
    return swapped
