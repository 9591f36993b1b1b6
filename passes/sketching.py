"""Network Sketching (Guo, Yao, Wang & Chen, "Network Sketching: Exploiting Binary Structure in Deep
CNNs", CVPR 2017): each filter W (one output's weights) is approximated by M binary bit-planes with
real scales, ``W ~ sum_m a_m B_m``, B_m in {-1, +1}, built on the residual:

* ``method="direct"`` (direct sketching, the paper's Algorithm 1): ``B_m = sign(R_{m-1})``,
  ``a_m = mean |R_{m-1}|`` (the best single scale for that sign plane), ``R_m = R_{m-1} - a_m B_m``,
  ``R_0 = W``;
* ``method="refined"`` (refined sketching, Algorithm 2): the same sign planes, but after each new
  plane all scales of the filter are re-fitted by least squares, ``a = (B^T B)^-1 B^T W``, and the
  residual is ``R_m = W - sum_j a_j B_j``.

Both make the residual error ``||W - sum a_m B_m||`` fall strictly with every plane (refined the
faster: it is the least-squares fit over a superset of bases).

``method="alternating"`` is Alternating Multi-bit Quantization (Xu, Wang, Yao, Lin & Zha, ICLR 2018,
Algorithm 1, written for the weights of recurrent layers): from the greedy sketch, alternate
``alternations`` times between the codes given the scales — each weight takes, of the ``2^M``
values ``sum_j a_j b_j`` (b in {-1, +1}^M), the nearest (the paper finds it by a binary search
tree over the sorted values; an argmin over them is the same choice) — and the scales given the
codes by least squares. Neither step can raise the error, so it ends at or below the refined
sketch's. Recurrent layers reach it as Linear gates (compiler/ops/recurrent.py). The sketch is applied to the trained
float weights (no retraining, as the paper reports it); activations stay float. The scales are per
filter and per plane, so each plane deploys as its own ``squeezer::bitserial_*`` layer (one packed
±1 plane, alpha = that plane's per-filter scales, float activations) and the layer's output is the
sum of the M planes' outputs (the bias on the first) — the existing bit-plane kernels, M calls. The
paper's associative implementation (sharing partial sums between planes) is not done.
"""

from __future__ import annotations

import fnmatch
import operator
from dataclasses import dataclass

import torch
from torch import nn

from compiler import Pass, PassReport, register_pass
from compiler.graph import Graph
from compiler.ops.bitserial import BitConv2d, BitLinear

SKETCH_METHODS = ("direct", "refined", "alternating")


def _sign(r: torch.Tensor) -> torch.Tensor:
    return torch.where(r >= 0, 1.0, -1.0).to(r.dtype)


def nearest_codes(target: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """(M, out, k) ±1 codes whose ``sum_j a_j b_j`` is nearest each weight of ``target`` (out, k),
    given ``scales`` (M, out): the code step of alternating quantization."""
    m = scales.shape[0]
    combos = torch.tensor([[1.0 if (c >> j) & 1 else -1.0 for j in range(m)] for c in range(2 ** m)],
                          dtype=target.dtype)                                               # (2^M, M)
    values = scales.T @ combos.T                                                            # (out, 2^M)
    rows = max(1, (1 << 24) // max(1, target.shape[1] * 2 ** m))                          # bounded memory
    pick = torch.cat([(target[i:i + rows, :, None] - values[i:i + rows, None, :]).abs().argmin(2)
                      for i in range(0, target.shape[0], rows)])                            # (out, k)
    return combos[pick].permute(2, 0, 1)


def least_squares_scales(target: torch.Tensor, bases: torch.Tensor) -> torch.Tensor:
    """(M, out) scales minimizing ``||target - sum_j a_j B_j||`` per filter, given ``bases`` (M, out, k)."""
    return torch.linalg.lstsq(bases.permute(1, 2, 0), target.unsqueeze(2)).solution.squeeze(2).T


def sketch(w: torch.Tensor, planes: int, method: str = "refined",
           alternations: int = 2) -> tuple[torch.Tensor, torch.Tensor]:
    """Sketch ``w`` (out, ...) per filter: returns (B (M, out, k) in ±1, a (M, out)), float64."""
    if method not in SKETCH_METHODS:
        raise ValueError(f"sketch: method must be one of {SKETCH_METHODS}, got {method!r}")
    if method == "alternating":
        target = w.detach().reshape(w.shape[0], -1).double()
        bases, scales = sketch(w, planes, "direct")
        for _ in range(alternations):
            bases = nearest_codes(target, scales)
            scales = least_squares_scales(target, bases)
        return bases, scales
    target = w.detach().reshape(w.shape[0], -1).double()
    residual, bases, scales = target.clone(), [], []
    for _ in range(planes):
        b = _sign(residual)
        bases.append(b)
        if method == "direct":
            scales.append(residual.abs().mean(1))
        else:   # least squares over every plane so far, one filter at a time
            basis = torch.stack(bases, 2)                                             # (out, k, m)
            scales = list(torch.linalg.lstsq(basis, target.unsqueeze(2)).solution.squeeze(2).T)
        residual = target - (torch.stack(scales)[:, :, None] * torch.stack(bases)).sum(0)
    return torch.stack(bases), torch.stack(scales)


def sketch_errors(w: torch.Tensor, planes: int, method: str = "refined") -> list[float]:
    """``||W - sum_{j<=m} a_j B_j||`` for m = 1..planes (each with its own m-plane sketch)."""
    target = w.detach().reshape(w.shape[0], -1).double()
    out = []
    for m in range(1, planes + 1):
        b, a = sketch(w, m, method)
        out.append(float((target - (a[:, :, None] * b).sum(0)).norm()))
    return out


def _plane_layer(m: nn.Module, plane: torch.Tensor, scale: torch.Tensor, bias) -> nn.Module:
    bits = (plane > 0).reshape(1, *m.weight.shape)
    if isinstance(m, nn.Linear):
        return BitLinear(bits, [2.0], -1.0, scale.float(), bias, "float", 1, False)
    return BitConv2d(bits, [2.0], -1.0, scale.float(), bias, m.stride, m.padding, m.dilation, "float", 1, False)


class SketchPlanes(nn.ModuleList):
    """The M one-plane layers of a sketched layer; the graph calls each and sums the outputs."""


@register_pass
@dataclass(frozen=True)
class NetworkSketching(Pass):
    """Binary bit-planes: Network Sketching (Guo et al. 2017) or alternating multi-bit (Xu et al. 2018)."""

    name = "network-sketching"
    verify_tolerance = None
    reported = ("params", "stored_bytes")

    planes: int = 2                     # M binary bit-planes per filter
    method: str = "refined"             # "direct", "refined" (least-squares re-fitted scales) or "alternating"
    alternations: int = 2               # alternating: code/scale rounds (Xu et al. use 2)
    layers: tuple[str, ...] = ()        # patterns of layers to sketch (default: all but first/last)
    exclude: tuple[str, ...] = ()
    keep_first_last: bool = True

    def validate(self) -> None:
        self.check_choice("method", SKETCH_METHODS)
        self.check_range("planes", 1, 8, integer=True)
        self.check_range("alternations", 1, 50, integer=True)
        self.check_pattern_tuples("layers", "exclude")

    def requires(self, graph: Graph) -> None:
        self.check_patterns(graph, "layers/exclude", (*self.layers, *self.exclude))

    def run(self, graph: Graph, report: PassReport) -> Graph:
        chosen = {n: m for n, m in graph.layers().items() if type(m) in (nn.Conv2d, nn.Linear)}
        order = list(chosen)
        first_last = {order[0], order[-1]} if order and self.keep_first_last else set()
        for name, m in chosen.items():
            if not self.selects(name, report):
                continue
            if name in first_last and not (self.layers and any(fnmatch.fnmatchcase(name, p) for p in self.layers)):
                report.skip(name, "first/last layer kept in full precision (keep_first_last=false to change)")
                continue
            if isinstance(m, nn.Conv2d) and (m.groups != 1 or isinstance(m.padding, str) or m.padding_mode != "zeros"):
                report.skip(name, "grouped conv or non-numeric/non-zero padding is not sketched")
                continue
            bases, scales = sketch(m.weight, self.planes, self.method, self.alternations)
            plane_layers = SketchPlanes(
                _plane_layer(m, b, a, m.bias if i == 0 else None) for i, (b, a) in enumerate(zip(bases, scales)))
            _inline_sum(graph, name, plane_layers.train(m.training))
            err = float((m.weight.detach().reshape(m.weight.shape[0], -1).double() -
                         (scales[:, :, None] * bases).sum(0)).norm() / m.weight.detach().double().norm())
            report.change(f"{name}: {type(m).__name__} -> {self.planes} binary planes ({self.method} sketching, "
                          f"relative weight error {err:.3f})")
        return graph


def _inline_sum(graph: Graph, name: str, plane_layers: SketchPlanes) -> None:
    """Put the planes at ``name`` (name.0, name.1, ...) and replace each call of ``name`` by the sum
    of the planes' calls."""
    graph.module.set_submodule(name, plane_layers)
    fx_graph = graph.module.graph
    for node in [n for n in fx_graph.nodes if n.op == "call_module" and n.target == name]:
        with fx_graph.inserting_before(node):
            total = fx_graph.call_module(f"{name}.0", (node.args[0],))
            for i in range(1, len(plane_layers)):
                part = fx_graph.call_module(f"{name}.{i}", (node.args[0],))
                total = fx_graph.call_function(operator.add, (total, part))
        node.replace_all_uses_with(total)
        fx_graph.erase_node(node)
