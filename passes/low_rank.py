"""Low-rank splitting: replace a Conv2d/Linear by a chain of smaller layers whose product
approximates it.

Decompositions (the chain is inlined into the graph, so later passes and codegen see plain layers):

* ``svd`` — truncated SVD ``W ≈ (U√S)(√S Vᵀ)``, two layers, the bias on the second: Linear,
  1×1 Conv2d, and (``method=svd``) k×k Conv2d as k×k (C→R) → 1×1 (R→N) (Denton et al.,
  "Exploiting Linear Structure Within Convolutional Networks for Efficient Evaluation", NIPS 2014).
* ``tucker2`` — Conv2d: Tucker-2 over the output/input channel modes, 1×1 (C→R_in) → k×k core
  (R_in→R_out, with the layer's stride, padding and dilation) → 1×1 (R_out→N) (Kim et al.,
  "Compression of Deep Convolutional Neural Networks for Fast and Low Power Mobile
  Applications", ICLR 2016). Ranks per mode unfolding; ``vbmf`` is the paper's choice.
* ``cp`` — Conv2d: rank-R CP decomposition (tensorly's ALS), 1×1 (C→R) → k×1 depthwise →
  1×k depthwise → 1×1 (R→N) (Lebedev et al., "Speeding-up Convolutional Neural Networks Using
  Fine-tuned CP-Decomposition", ICLR 2015).
* ``separable`` — Conv2d: k×1 (C→R) → 1×k (R→N), the SVD of W rearranged to (C·kh)×(N·kw)
  (Jaderberg et al., "Speeding up Convolutional Neural Networks with Low Rank Expansions",
  BMVC 2014, scheme 2, with the closed-form solution of Tai et al., ICLR 2016).

Every factor layer carries its axis's share of the padding (any padding mode: a pointwise or
one-axis layer commutes with padding along the other axes), so a full-rank split reproduces the
layer. Grouped/depthwise convs are refused with the reason (their per-group blocks are already
small; factorizing them adds layers without removing work).

Rank selection, per layer: a fixed ``rank``, a ``rank_ratio`` of the full rank, an ``energy``
threshold (fraction of squared singular values kept; for CP, 1 - relative squared
reconstruction error), or ``vbmf`` (empirical variational Bayesian matrix factorization,
Nakajima et al., JMLR 2013, as used by Kim et al.). A split that would not remove MACs is
skipped; with ``latency_aware`` a split is kept only if its compiled chain is measured faster than
the compiled original on ``target`` (factorized layers are often slower than one dense layer).
"""

from __future__ import annotations

import fnmatch
import math
from dataclasses import dataclass
from functools import cached_property

import numpy as np
import torch
from torch import nn

from compiler import OptionError, Pass, PassReport, register_pass
from compiler.graph import Graph, inference_mode
from compiler.linear_forms import linear_forms
from compiler.op_table import module_macs

METHODS = ("auto", "svd", "tucker2", "cp", "separable")
RULES = ("rank", "ratio", "energy", "vbmf", "skip")


@dataclass(frozen=True)
class RankRule:
    """How to pick a layer's rank: ``kind`` in RULES, with its value (None for vbmf/skip)."""

    kind: str
    value: float | None = None

    @classmethod
    def parse(cls, text: str) -> "RankRule":
        kind, _, value = text.partition(":")
        kind = kind.strip()
        if kind not in RULES or (kind in ("vbmf", "skip")) != (value == ""):
            raise ValueError(text)
        rule = cls(kind, None if value == "" else (int(value) if kind == "rank" else float(value)))
        rule.check()
        return rule

    def check(self) -> None:
        ok = {"rank": lambda v: isinstance(v, int) and not isinstance(v, bool) and v >= 1,
              "ratio": lambda v: 0.0 < v <= 1.0, "energy": lambda v: 0.0 < v <= 1.0,
              "vbmf": lambda v: v is None, "skip": lambda v: v is None}[self.kind]
        if not ok(self.value):
            raise ValueError(f"{self.kind}:{self.value}")


# ---- rank selection on singular values -----------------------------------------------------------
def rank_from_singular_values(s: np.ndarray, rule: RankRule, matrix: np.ndarray | None = None) -> int:
    """The rank ``rule`` picks for a matrix with singular values ``s`` (descending)."""
    full = len(s)
    if rule.kind == "rank":
        return min(int(rule.value), full)
    if rule.kind == "ratio":
        return max(1, min(full, math.ceil(rule.value * full)))
    if rule.kind == "energy":
        energy = np.cumsum(s.astype(np.float64) ** 2)
        if energy[-1] == 0:
            return 1
        return int(min(full, np.searchsorted(energy / energy[-1], rule.value - 1e-12) + 1))
    if rule.kind == "vbmf":
        return max(1, evbmf_rank(matrix))
    raise ValueError(rule.kind)


def evbmf_rank(y: np.ndarray) -> int:
    """Rank estimated by empirical VBMF with the noise variance estimated too (Nakajima, Sugiyama,
    Babacan & Tomioka, "Global Analytic Solution of Fully-observed Variational Bayesian Matrix
    Factorization", JMLR 2013, Theorem 2 / Sec. 5): the number of singular values above the
    analytic threshold ``sqrt(M σ² (1 + τ̄)(1 + α/τ̄))``."""
    from scipy.optimize import minimize_scalar

    y = np.asarray(y, dtype=np.float64)
    if y.shape[0] > y.shape[1]:
        y = y.T
    rows, cols = y.shape                       # rows <= cols
    alpha = rows / cols
    tau_bar = 2.5129 * math.sqrt(alpha)
    s = np.linalg.svd(y, compute_uv=False)
    x_bar = (1 + tau_bar) * (1 + alpha / tau_bar)
    residual = 0.0                             # all `rows` singular values are kept (H = L)
    upper = (np.sum(s ** 2) + residual) / (rows * cols)
    eh_ub = int(min(math.ceil(rows / (1 + alpha)) - 1, rows)) - 1
    tail = s[eh_ub + 1:] if eh_ub + 1 < rows else s[-1:]
    lower = max(tail[0] ** 2 / (cols * x_bar), float(np.mean(tail ** 2)) / cols)
    if not (upper > 0) or lower >= upper:
        return int(np.sum(s > 0)) if upper > 0 else 0

    def objective(sigma2: float) -> float:
        x = s ** 2 / (cols * sigma2)
        z1, z2 = x[x > x_bar], x[x <= x_bar]
        tau_z1 = 0.5 * (z1 - (1 + alpha) + np.sqrt((z1 - (1 + alpha)) ** 2 - 4 * alpha))
        return float(np.sum(z2 - np.log(z2)) + np.sum(z1 - tau_z1) + np.sum(np.log((tau_z1 + 1) / z1))
                     + alpha * np.sum(np.log(tau_z1 / alpha + 1)) + residual / (cols * sigma2))

    sigma2 = minimize_scalar(objective, bounds=(lower, upper), method="bounded").x
    threshold = math.sqrt(cols * sigma2 * (1 + tau_bar) * (1 + alpha / tau_bar))
    return int(np.sum(s > threshold))


# ---- decompositions: weights -> factor layers ---------------------------------------------------------
def _param(t: np.ndarray, like: torch.Tensor) -> nn.Parameter:
    return nn.Parameter(torch.from_numpy(np.ascontiguousarray(t)).to(like.dtype).to(like.device),
                        requires_grad=like.requires_grad)


def _bias_into(layer: nn.Module, original: nn.Module) -> None:
    if original.bias is not None:
        layer.bias = nn.Parameter(original.bias.detach().clone(), requires_grad=original.bias.requires_grad)


def _axis(value, axis: int, other):
    """One axis of a conv's (h, w) setting, the other axis set to ``other``."""
    if isinstance(value, str):  # 'same' / 'valid' apply per axis as they are
        return value
    return (value[0], other) if axis == 0 else (other, value[1])


def svd_split(m: nn.Module, rank: int) -> nn.Sequential:
    """Linear or Conv2d -> two layers (Denton et al.); a k×k conv keeps its kernel in the first."""
    w = m.weight.detach().double().cpu().numpy()
    mat = w.reshape(w.shape[0], -1)
    u, s, vt = np.linalg.svd(mat, full_matrices=False)
    root = np.sqrt(s[:rank])
    first, second = root[:, None] * vt[:rank], u[:, :rank] * root[None, :]
    if isinstance(m, nn.Linear):
        a, b = nn.Linear(m.in_features, rank, bias=False), nn.Linear(rank, m.out_features, bias=m.bias is not None)
        a.weight, b.weight = _param(first, m.weight), _param(second, m.weight)
    else:
        # k×k (C→R, the layer's stride/padding/dilation) -> 1×1 (R→N): the SVD of W as (N, C·kh·kw)
        a = nn.Conv2d(m.in_channels, rank, m.kernel_size, m.stride, m.padding, m.dilation, bias=False,
                      padding_mode=m.padding_mode)
        b = nn.Conv2d(rank, m.out_channels, 1, bias=m.bias is not None)
        a.weight = _param(first.reshape(rank, *m.weight.shape[1:]), m.weight)
        b.weight = _param(second[:, :, None, None], m.weight)
    _bias_into(b, m)
    return nn.Sequential(a, b)


def tucker2_ranks(m: nn.Conv2d, rule: RankRule) -> tuple[int, int]:
    """(R_out, R_in) from the mode-0 (outputs) and mode-1 (inputs) unfoldings."""
    w = m.weight.detach().double().cpu().numpy()
    ranks = []
    for mode in (0, 1):
        unfold = np.moveaxis(w, mode, 0).reshape(w.shape[mode], -1)
        ranks.append(rank_from_singular_values(np.linalg.svd(unfold, compute_uv=False), rule, unfold))
    return ranks[0], ranks[1]


def tucker2_split(m: nn.Conv2d, r_out: int, r_in: int) -> nn.Sequential:
    """Conv2d -> 1×1 (C→R_in) -> k×k core (R_in→R_out) -> 1×1 (R_out→N) (Kim et al.)."""
    from tensorly.decomposition import partial_tucker

    w = m.weight.detach().double().cpu().numpy()
    (core, (u_out, u_in)), _ = partial_tucker(w, rank=[r_out, r_in], modes=[0, 1], init="svd", n_iter_max=100,
                                              tol=1e-8)
    first = nn.Conv2d(m.in_channels, r_in, 1, bias=False)
    mid = nn.Conv2d(r_in, r_out, m.kernel_size, m.stride, m.padding, m.dilation, bias=False, padding_mode=m.padding_mode)
    last = nn.Conv2d(r_out, m.out_channels, 1, bias=m.bias is not None)
    first.weight = _param(u_in.T[:, :, None, None], m.weight)
    mid.weight = _param(core, m.weight)
    last.weight = _param(u_out[:, :, None, None], m.weight)
    _bias_into(last, m)
    return nn.Sequential(first, mid, last)


def cp_factors(m: nn.Conv2d, rank: int, seed: int = 0):
    """Rank-``rank`` CP of the (N, C, kh, kw) kernel with tensorly's ALS: (weights, [A, B, Kh, Kw])."""
    from tensorly.decomposition import parafac

    w = m.weight.detach().double().cpu().numpy()
    import warnings

    with warnings.catch_warnings():   # ranks above a mode's size: tensorly's svd init pads (seeded)
        warnings.filterwarnings("ignore", message="Trying to compute SVD", category=UserWarning)
        cp = parafac(w, rank=rank, init="svd", n_iter_max=500, tol=1e-10, random_state=seed, normalize_factors=False)
    return cp.weights, cp.factors


def cp_split(m: nn.Conv2d, rank: int, seed: int = 0, factors=None) -> nn.Sequential:
    """Conv2d -> 1×1 (C→R) -> kh×1 depthwise -> 1×kw depthwise -> 1×1 (R→N) (Lebedev et al.)."""
    weights, (a, b, kh, kw) = factors if factors is not None else cp_factors(m, rank, seed)
    first = nn.Conv2d(m.in_channels, rank, 1, bias=False)
    vert = nn.Conv2d(rank, rank, (m.kernel_size[0], 1), _axis(m.stride, 0, 1), _axis(m.padding, 0, 0),
                     _axis(m.dilation, 0, 1), groups=rank, bias=False, padding_mode=m.padding_mode)
    horiz = nn.Conv2d(rank, rank, (1, m.kernel_size[1]), _axis(m.stride, 1, 1), _axis(m.padding, 1, 0),
                      _axis(m.dilation, 1, 1), groups=rank, bias=False, padding_mode=m.padding_mode)
    last = nn.Conv2d(rank, m.out_channels, 1, bias=m.bias is not None)
    first.weight = _param(b.T[:, :, None, None], m.weight)
    vert.weight = _param(kh.T[:, None, :, None], m.weight)
    horiz.weight = _param(kw.T[:, None, None, :], m.weight)
    last.weight = _param((a * weights[None, :])[:, :, None, None], m.weight)
    _bias_into(last, m)
    return nn.Sequential(first, vert, horiz, last)


def cp_rank_for_energy(m: nn.Conv2d, energy: float, seed: int = 0) -> tuple[int, tuple]:
    """Smallest CP rank whose relative squared reconstruction error is <= 1 - energy (doubling,
    then bisection; ALS is not monotone in rank, so this is the smallest rank *found*)."""
    import tensorly as tl

    w = m.weight.detach().double().cpu().numpy()
    norm2 = float(np.sum(w ** 2)) or 1.0
    cap = min(w.shape[1] * w.shape[2] * w.shape[3], w.shape[0] * w.shape[2] * w.shape[3], w.shape[0] * w.shape[1])
    cache: dict[int, tuple] = {}

    def good(r: int) -> bool:
        cache[r] = cp_factors(m, r, seed)
        rec = tl.cp_to_tensor(cache[r])
        return 1 - float(np.sum((rec - w) ** 2)) / norm2 >= energy - 1e-12

    hi = 1
    while hi < cap and not good(hi):
        hi = min(cap, hi * 2)
    if hi not in cache:
        good(hi)
    lo = hi // 2 + 1 if hi > 1 else 1
    best = hi
    while lo < best:
        mid = (lo + best) // 2
        if good(mid):
            best = mid
        else:
            lo = mid + 1
    return best, cache[best]


def separable_matrix(m: nn.Conv2d) -> np.ndarray:
    """W[n, c, i, j] rearranged to M[(c, i), (n, j)]: its rank-R SVD is the best k×1 -> 1×k pair."""
    w = m.weight.detach().double().cpu().numpy()
    n, c, kh, kw = w.shape
    return w.transpose(1, 2, 0, 3).reshape(c * kh, n * kw)


def separable_split(m: nn.Conv2d, rank: int) -> nn.Sequential:
    """Conv2d -> kh×1 (C→R) -> 1×kw (R→N) (Jaderberg et al. scheme 2 / Tai et al.)."""
    n, c, kh, kw = m.weight.shape
    u, s, vt = np.linalg.svd(separable_matrix(m), full_matrices=False)
    root = np.sqrt(s[:rank])
    vert_w = (u[:, :rank] * root).reshape(c, kh, rank).transpose(2, 0, 1)[:, :, :, None]     # (R, C, kh, 1)
    horiz_w = (vt[:rank].T * root).reshape(n, kw, rank).transpose(0, 2, 1)[:, :, None, :]    # (N, R, 1, kw)
    vert = nn.Conv2d(c, rank, (kh, 1), _axis(m.stride, 0, 1), _axis(m.padding, 0, 0), _axis(m.dilation, 0, 1),
                     bias=False, padding_mode=m.padding_mode)
    horiz = nn.Conv2d(rank, n, (1, kw), _axis(m.stride, 1, 1), _axis(m.padding, 1, 0), _axis(m.dilation, 1, 1),
                      bias=m.bias is not None, padding_mode=m.padding_mode)
    vert.weight, horiz.weight = _param(vert_w, m.weight), _param(horiz_w, m.weight)
    _bias_into(horiz, m)
    return nn.Sequential(vert, horiz)


def _layer_macs(chain: nn.Module, shape: tuple) -> int:
    """MACs of ``chain`` on one input of ``shape`` (batch included), counted by running it on zeros."""
    total = 0

    def hook(mod, inp, out):
        nonlocal total
        total += module_macs(mod, [tuple(inp[0].shape)], tuple(out.shape))

    mods = [chain] if isinstance(chain, (nn.Conv2d, nn.Linear)) else list(chain)
    handles = [mod.register_forward_hook(hook) for mod in mods]
    try:
        with inference_mode(chain):
            chain(torch.zeros(shape, dtype=next(chain.parameters()).dtype))
    finally:
        for h in handles:
            h.remove()
    return total


# ---- the pass --------------------------------------------------------------------------------------------
@register_pass
@dataclass(frozen=True)
class LowRankSplit(Pass):
    """Split Conv2d/Linear layers into low-rank chains (see the module docstring for the methods)."""

    name = "low-rank"
    verify_tolerance = None  # lossy (exact at full rank)
    reported = ("params", "macs")

    method: str = "auto"               # auto: svd for Linear/1×1, tucker2 for k×k convs
    rank: int | None = None
    rank_ratio: float | None = None
    energy: float | None = None        # default selection (0.9) when nothing else is given
    vbmf: bool = False
    layers: tuple[str, ...] = ()       # layer-name patterns to consider (default: every Conv2d/Linear)
    exclude: tuple[str, ...] = ()
    overrides: tuple[str, ...] = ()    # "pattern=rank:8" | "=ratio:0.25" | "=energy:0.95" | "=vbmf" | "=skip"
    only_if_fewer_macs: bool = True
    latency_aware: bool = False        # keep a split only if measured faster when compiled for `target`
    target: str = "llvm"
    seed: int = 0

    def validate(self) -> None:
        self.check_choice("method", METHODS)
        chosen = [k for k in ("rank", "rank_ratio", "energy") if getattr(self, k) is not None] + (["vbmf"] if self.vbmf else [])
        if len(chosen) > 1:
            self._fail(chosen[1], getattr(self, chosen[1]), f"only one rank selection at a time (got {chosen})")
        if self.rank is not None:
            self.check_range("rank", 1, None, integer=True)
        if self.rank_ratio is not None:
            self.check_range("rank_ratio", 0.0, 1.0, lo_open=True)
        if self.energy is not None:
            self.check_range("energy", 0.0, 1.0, lo_open=True)
        if self.vbmf and self.method == "cp":
            self._fail("vbmf", True, "vbmf works on matrix unfoldings: method svd, tucker2, separable or auto")
        for option in ("layers", "exclude", "overrides"):
            value = getattr(self, option)
            if not isinstance(value, tuple) or not all(isinstance(p, str) for p in value):
                self._fail(option, value, "a tuple of strings")
        self.override_rules  # parsed (and checked) once

    @cached_property
    def override_rules(self) -> tuple[tuple[str, RankRule], ...]:
        """``overrides`` parsed once: (layer-name pattern, rank rule) pairs, the first match wins."""
        out = []
        for item in self.overrides:
            pattern, eq, rule = item.partition("=")
            try:
                parsed = RankRule.parse(rule) if eq and pattern else None
            except ValueError:
                parsed = None
            if parsed is None:
                self._fail("overrides", item, "'pattern=rank:N', 'pattern=ratio:F', 'pattern=energy:F', "
                                              "'pattern=vbmf' or 'pattern=skip'")
            if self.method == "cp" and rule.strip() == "vbmf":
                self._fail("overrides", item, "no vbmf with method cp")
            out.append((pattern, parsed))
        return tuple(out)

    def rule_for(self, layer: str) -> RankRule:
        for pattern, rule in self.override_rules:
            if fnmatch.fnmatchcase(layer, pattern):
                return rule
        if self.rank is not None:
            return RankRule("rank", self.rank)
        if self.rank_ratio is not None:
            return RankRule("ratio", self.rank_ratio)
        if self.vbmf:
            return RankRule("vbmf")
        return RankRule("energy", 0.9 if self.energy is None else self.energy)

    # ---- one layer -----------------------------------------------------------------------------------
    def method_for(self, m: nn.Module) -> str:
        if isinstance(m, nn.Linear) or tuple(m.kernel_size) == (1, 1):
            return "svd"
        return "tucker2" if self.method == "auto" else self.method   # svd on k×k: k×k (C→R) -> 1×1

    def split(self, m: nn.Module, rule: RankRule) -> tuple[nn.Sequential, str, str]:
        """(chain, method, rank description) for one layer under ``rule``."""
        method = self.method_for(m)
        if method == "svd":
            w = m.weight.detach().double().cpu().numpy().reshape(m.weight.shape[0], -1)
            r = rank_from_singular_values(np.linalg.svd(w, compute_uv=False), rule, w)
            return svd_split(m, r), method, f"rank {r} of {min(w.shape)}"
        if method == "tucker2":
            r_out, r_in = tucker2_ranks(m, rule)
            return tucker2_split(m, r_out, r_in), method, f"ranks (out {r_out}/{m.out_channels}, in {r_in}/{m.in_channels})"
        if method == "separable":
            mat = separable_matrix(m)
            r = rank_from_singular_values(np.linalg.svd(mat, compute_uv=False), rule, mat)
            return separable_split(m, r), method, f"rank {r} of {min(mat.shape)}"
        # cp
        if rule.kind == "vbmf":
            raise OptionError(f"{self.name}: vbmf is not defined for CP (use rank, ratio or energy)")
        factors = None
        if rule.kind == "energy":
            r, factors = cp_rank_for_energy(m, rule.value, self.seed)
        elif rule.kind == "rank":
            r = int(rule.value)
        else:
            r = max(1, math.ceil(rule.value * min(m.in_channels, m.out_channels)))
        return cp_split(m, r, self.seed, factors), method, f"CP rank {r}"

    @staticmethod
    def refusal(m: nn.Module) -> str | None:
        if isinstance(m, nn.Conv2d) and m.groups != 1:
            return f"grouped/depthwise conv (groups={m.groups}): per-group blocks are not split"
        if isinstance(m, nn.Conv2d) and (m.in_channels == 1 and m.out_channels == 1):
            return "a 1-in, 1-out conv has nothing to split"
        return None

    # ---- the pass -----------------------------------------------------------------------------------------
    def requires(self, graph: Graph) -> None:
        self.check_patterns(graph, "layers/exclude/overrides",
                            (*self.layers, *self.exclude, *(p for p, _ in self.override_rules)))

    def run(self, graph: Graph, report: PassReport) -> Graph:
        linear_forms(graph)   # GPT-2's Conv1D: an nn.Linear first
        mods = dict(graph.module.named_modules())
        calls: dict[str, list] = {}
        for node in graph.module.graph.nodes:
            if node.op == "call_module" and isinstance(mods.get(node.target), (nn.Conv2d, nn.Linear)) \
                    and type(mods[node.target]) in (nn.Conv2d, nn.Linear):
                calls.setdefault(node.target, []).append(node)
        for name, nodes in calls.items():
            m = mods[name]
            if not self.selects(name, report):
                continue
            rule = self.rule_for(name)
            why = "skipped by an override" if rule.kind == "skip" else self.refusal(m)
            if why:
                report.skip(name, why)
                continue
            shape = nodes[0].args[0].meta.get("shape") if isinstance(nodes[0].args[0], torch.fx.Node) else None
            if not shape or (isinstance(m, nn.Conv2d) and len(shape) != 4):
                report.skip(name, "input shape unknown (shape propagation did not reach it)")
                continue
            chain, method, ranks = self.split(m, rule)
            macs = _layer_macs(m, tuple(shape)), _layer_macs(chain, tuple(shape))
            if self.only_if_fewer_macs and macs[1] >= macs[0]:
                report.skip(name, f"{method} at {ranks} would not remove MACs ({macs[0]:,} -> {macs[1]:,})")
                continue
            note = ""
            if self.latency_aware:
                dense_ms, split_ms = _measure_pair(m, chain, tuple(shape), self.target)
                if split_ms >= dense_ms:
                    report.skip(name, f"{method} at {ranks} is not faster compiled for {self.target} "
                                      f"({dense_ms:.4f} ms dense vs {split_ms:.4f} ms split)")
                    continue
                note = f", {dense_ms:.4f} -> {split_ms:.4f} ms on {self.target}"
            _inline(graph, name, chain, nodes)
            report.change(f"{name}: {method}, {ranks}, MACs {macs[0]:,} -> {macs[1]:,}{note}")
        return graph


def _inline(graph: Graph, name: str, chain: nn.Sequential, nodes) -> None:
    """Put ``chain`` at ``name`` (parameters become name.0.weight, ...) and call its layers one by
    one in the graph, so later passes and codegen see plain Conv2d/Linear layers."""
    graph.module.set_submodule(name, chain.train(graph.module.get_submodule(name).training))
    fx_graph = graph.module.graph
    for node in nodes:
        with fx_graph.inserting_before(node):
            x = node.args[0]
            for i in range(len(chain)):
                x = fx_graph.call_module(f"{name}.{i}", (x,))
        node.replace_all_uses_with(x)
        fx_graph.erase_node(node)


def _measure_pair(dense: nn.Module, chain: nn.Module, shape: tuple, target: str, rounds: int = 3) -> tuple[float, float]:
    """Compiled latency of the layer and of its split, each compiled once and timed interleaved
    (medians over ``rounds``), so drifts in machine load hit both alike."""
    from compiler.latency import latency_timer

    x = (torch.randn(shape, generator=torch.Generator().manual_seed(0)),)
    timers = latency_timer(dense, x, target), latency_timer(chain, x, target)
    d, s = [], []
    for _ in range(rounds):
        d.append(timers[0]())
        s.append(timers[1]())
    return float(np.median(d)), float(np.median(s))
