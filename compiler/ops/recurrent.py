"""``nn.LSTM`` / ``nn.GRU`` / ``nn.RNN`` as the same recurrences written with ``nn.Linear`` layers, so
that every pass family (pruning, low-rank, sparsity, clustering, binarization, quantization) sees
their weights as the Linears they are, and tracing unrolls the time loop for the example's
sequence length (compiler/concrete_tracing.py guards the graph with it).

Per layer and direction: ``ih`` (input → gates, bias ``b_ih``) applied to the whole sequence at
once, as cuDNN does, and ``hh`` (hidden → gates, bias ``b_hh``) per step; LSTM's ``proj``
(``proj_size``) projects the hidden state. Gates in torch's order: LSTM ``i, f, g, o``; GRU
``r, z, n`` with ``n = tanh(W_in x + b_in + r ⊙ (W_hn h + b_hn))``; RNN ``tanh`` or ``relu``. The
outputs equal torch's up to the summation order of the matrix products. Arguments and results
are torch's (``batch_first``, ``hx``, unbatched input, ``(output, h_n)`` or ``(output, (h_n, c_n))``);
dropout between layers applies in training, as torch's does.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

GATES = {"LSTM": 4, "GRU": 3, "RNN_TANH": 1, "RNN_RELU": 1}


class RecurrentCell(nn.Module):
    """One layer and direction: its ``ih`` and ``hh`` Linears (and LSTM's ``proj``)."""

    def __init__(self, ih: nn.Linear, hh: nn.Linear, proj: nn.Linear | None) -> None:
        super().__init__()
        self.ih, self.hh, self.proj = ih, hh, proj


def _linear(weight: torch.Tensor, bias: torch.Tensor | None) -> nn.Linear:
    layer = nn.Linear(weight.shape[1], weight.shape[0], bias is not None, device=weight.device, dtype=weight.dtype)
    with torch.no_grad():
        layer.weight.copy_(weight)
        if bias is not None:
            layer.bias.copy_(bias)
    return layer


class UnrolledRecurrent(nn.Module):
    """The recurrent layer ``rnn`` (nn.LSTM, nn.GRU or nn.RNN) with Linear gates (module docstring)."""

    def __init__(self, rnn: nn.RNNBase) -> None:
        super().__init__()
        self.mode, self.kind = rnn.mode, type(rnn).__name__
        self.hidden_size, self.num_layers = rnn.hidden_size, rnn.num_layers
        self.proj_size, self.batch_first, self.dropout = rnn.proj_size, rnn.batch_first, float(rnn.dropout)
        self.directions = 2 if rnn.bidirectional else 1
        cells = []
        for layer in range(rnn.num_layers):
            for direction in range(self.directions):
                suffix = f"_l{layer}" + ("_reverse" if direction else "")
                w = {name: getattr(rnn, f"{name}{suffix}", None) for name in ("weight_ih", "weight_hh", "bias_ih",
                                                                             "bias_hh", "weight_hr")}
                proj = _linear(w["weight_hr"], None) if w["weight_hr"] is not None else None
                cells.append(RecurrentCell(_linear(w["weight_ih"], w["bias_ih"]), _linear(w["weight_hh"], w["bias_hh"]),
                                           proj))
        self.cells = nn.ModuleList(cells)
        self.train(rnn.training)

    @property
    def out_size(self) -> int:
        return self.proj_size or self.hidden_size

    def _step(self, cell: RecurrentCell, gi: torch.Tensor, h: torch.Tensor, c: torch.Tensor | None):
        gh = cell.hh(h)
        if self.mode == "LSTM":
            i, f, g, o = (gi + gh).chunk(4, -1)
            c = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
            h = torch.sigmoid(o) * torch.tanh(c)
            return (cell.proj(h) if cell.proj is not None else h), c
        if self.mode == "GRU":
            ir, iz, i_n = gi.chunk(3, -1)
            hr, hz, h_n = gh.chunk(3, -1)
            r, z = torch.sigmoid(ir + hr), torch.sigmoid(iz + hz)
            n = torch.tanh(i_n + r * h_n)
            return (1 - z) * n + z * h, None
        act = torch.tanh if self.mode == "RNN_TANH" else torch.relu
        return act(gi + gh), None

    def _direction(self, cell: RecurrentCell, x: torch.Tensor, h: torch.Tensor, c, reverse: bool):
        """Run one direction over ``x`` (B, T, F): its outputs (B, T, H) and the last state."""
        gi = cell.ih(x)
        steps = x.shape[1]
        outs = []
        for t in (range(steps - 1, -1, -1) if reverse else range(steps)):
            h, c = self._step(cell, gi[:, t], h, c)
            outs.append(h)
        return torch.stack(outs[::-1] if reverse else outs, 1), h, c

    def _initial(self, x: torch.Tensor, hx):
        """(h0, c0) as (L·D, B, ·) tensors (zeros when not given)."""
        n, batch = self.num_layers * self.directions, x.shape[0]
        if hx is None:
            h0 = x.new_zeros((n, batch, self.out_size))
            return h0, (x.new_zeros((n, batch, self.hidden_size)) if self.mode == "LSTM" else None)
        if self.mode == "LSTM":
            return hx
        return hx, None

    def forward(self, x: torch.Tensor, hx=None):
        unbatched = x.dim() == 2
        if unbatched:
            x = x.unsqueeze(0 if self.batch_first else 1)
            hx = None if hx is None else (tuple(t.unsqueeze(1) for t in hx) if self.mode == "LSTM"
                                          else hx.unsqueeze(1))
        if not self.batch_first:
            x = x.transpose(0, 1)
        h0, c0 = self._initial(x, hx)
        last_h, last_c = [], []
        for layer in range(self.num_layers):
            if layer and self.dropout and self.training:
                x = F.dropout(x, self.dropout, True)
            outs = []
            for d in range(self.directions):
                k = layer * self.directions + d
                y, h, c = self._direction(self.cells[k], x, h0[k], None if c0 is None else c0[k], bool(d))
                outs.append(y)
                last_h.append(h)
                last_c.append(c)
            x = outs[0] if len(outs) == 1 else torch.cat(outs, -1)
        out = x if self.batch_first else x.transpose(0, 1)
        h_n = torch.stack(last_h)
        state = (h_n, torch.stack(last_c)) if self.mode == "LSTM" else h_n
        if unbatched:
            out = out.squeeze(0 if self.batch_first else 1)
            state = tuple(s.squeeze(1) for s in state) if self.mode == "LSTM" else state.squeeze(1)
        return out, state

    def extra_repr(self) -> str:
        return (f"{self.kind}: hidden_size={self.hidden_size}, num_layers={self.num_layers}, "
                f"directions={self.directions}, batch_first={self.batch_first}")


def unroll_recurrent(model: nn.Module, keep=lambda name, module: False) -> list[str]:
    """Replace every ``nn.LSTM``/``nn.GRU``/``nn.RNN`` submodule of ``model`` (not ``keep(name, m)``)
    by its :class:`UnrolledRecurrent`, in place; the names replaced."""
    names = [name for name, m in model.named_modules() if name and isinstance(m, nn.RNNBase)
             and type(m) in (nn.LSTM, nn.GRU, nn.RNN) and not keep(name, m)]
    for name in names:
        model.set_submodule(name, UnrolledRecurrent(model.get_submodule(name)))
    return names
