"""Channel-importance criteria of the channel-pruning pass (``passes.channel_pruning``) that need
more than a filter norm: BatchNorm scales (Network Slimming), first-order Taylor scores from
gradients, and ThiNet's sampled reconstruction of the next layers (with its least-squares
rescaling of the kept channels)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from compiler.coupling import CouplingAnalysis, Group
from compiler.coupling_rules import HEADS
from compiler.graph import Graph, flatten_tensors

THINET_SAMPLES = 4096  # sampled (image, position, output channel) triples per group


def bn_gammas(graph: Graph, group: Group, analysis: CouplingAnalysis) -> torch.Tensor | None:
    """|γ| of the BatchNorms that scale this group's channels, summed (Network Slimming)."""
    root = group.root
    total, found = torch.zeros(group.size, dtype=torch.float64), False
    for c in group.consumers:
        m = graph.module.get_submodule(c.module) if c.role == "param" else None
        if not isinstance(m, nn.modules.batchnorm._BatchNorm) or m.weight is None:
            continue
        pos = 0
        for seg in c.layout:
            if analysis.find(seg.space) == root:   # (BatchNorm1d after a flatten: `repeat` entries per channel)
                gamma = m.weight.detach().double().abs()[pos: pos + seg.length * seg.repeat]
                total[seg.start: seg.start + seg.length] += gamma.reshape(seg.length, seg.repeat).sum(1)
                found = True
            pos += seg.length * seg.repeat
    return total if found else None


def slimming_penalty(model: nn.Module, strength: float = 1e-4) -> torch.Tensor:
    """Network Slimming's sparsity regularizer: ``strength * sum |γ|`` over every BatchNorm; add it
    to the training loss (``finetune.TrainConfig(regularizer=...)``)."""
    terms = [m.weight.abs().sum() for m in model.modules()
             if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.weight is not None]
    return strength * torch.stack(terms).sum() if terms else torch.zeros(())


def taylor_scores(graph: Graph, batches) -> dict[str, torch.Tensor]:
    """Molchanov et al.'s first-order Taylor criterion for the output channels of every Conv2d and
    Linear: |mean over batch and positions of activation * dLoss/dactivation|, averaged over
    batches. Labels default to the model's own predictions."""
    batches = list(batches) or [(graph.example_inputs, None)]
    module = graph.module
    acts: dict[str, torch.Tensor] = {}
    sums: dict[str, torch.Tensor] = {}

    def hook(name):
        def fn(_m, _inp, out):
            out.retain_grad()
            acts[name] = out
        return fn

    inputs_of: dict[str, torch.Tensor] = {}
    head_sums: dict[str, list[torch.Tensor]] = {}

    def pre_hook(name):   # a Linear's input: an attention's heads, merged (Michel et al.'s score)
        def fn(_m, args):
            if args and isinstance(args[0], torch.Tensor) and args[0].requires_grad:
                args[0].retain_grad()
                inputs_of[name] = args[0]
        return fn

    names = [n for n, m in module.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    handles = [module.get_submodule(n).register_forward_hook(hook(n)) for n in names]
    handles += [m.register_forward_pre_hook(pre_hook(n)) for n, m in module.named_modules() if isinstance(m, nn.Linear)]
    was_training = module.training
    module.eval()
    try:
        for inputs, labels in batches:
            inputs = inputs if isinstance(inputs, (tuple, list)) else (inputs,)
            module.zero_grad(set_to_none=True)
            out = flatten_tensors(module(*inputs))[0]   # (a dict of outputs: its first tensor by key)
            logits = out.reshape(-1, out.shape[-1]) if out.dim() > 1 else out.unsqueeze(0)
            target = labels if labels is not None else logits.detach().argmax(-1)
            torch.nn.functional.cross_entropy(logits, target.reshape(-1)).backward()
            for n in names:
                a = acts.get(n)   # a layer whose forward never ran (MultiheadAttention's out_proj) has none
                if a is None or a.grad is None:
                    continue
                prod = (a * a.grad).detach().double()
                ch_dim = 1 if a.dim() == 4 else a.dim() - 1
                other = [d for d in range(a.dim()) if d != ch_dim and d != 0]
                per_sample = prod.mean(dim=other) if other else prod  # (batch, channels)
                score = per_sample.abs().mean(0) if ch_dim != 0 else per_sample.abs()
                sums[n] = sums.get(n, 0) + score
            for n, x in inputs_of.items():   # per sample and input feature: sum over tokens of x * dL/dx
                if x.grad is not None and x.dim() >= 2:
                    head_sums.setdefault(n, []).append((x * x.grad).detach().double().reshape(x.shape[0], -1, x.shape[-1]).sum(1))
            inputs_of.clear()
    finally:
        for h in handles:
            h.remove()
        module.train(was_training)
        module.zero_grad(set_to_none=True)
    return {n: sums[n] / len(batches) for n in sums} | {f"in:{n}": torch.cat(v) for n, v in head_sums.items()}


def head_importance(graph: Graph, group: Group, analysis: CouplingAnalysis, signals: dict) -> torch.Tensor | None:
    """Michel et al. (2019)'s head importance, |Σ over a head's outputs of a · dL/da| (the
    gradient of a gate on the head) averaged over samples, for an attention-heads group: per
    channel, the head's score shared among its channels (the planner sums a unit's channels).
    None where the heads' merged output reaches no Linear that ran (nn.MultiheadAttention)."""
    for name, _ in group.producers:
        if name.endswith(HEADS):   # an attention layer: one channel per head
            layer = graph.module.get_submodule(name[: -len(HEADS)])
            proj = "out_proj" if hasattr(layer, "out_proj") else "proj"
            inner = signals.get(f"in:{name[: -len(HEADS)]}.{proj}")
            if inner is None:
                return None
            return inner.reshape(inner.shape[0], group.size, -1).sum(-1).abs().mean(0)
    for c in group.consumers:   # hand-written heads: the merged heads reach the output projection
        inner = signals.get(f"in:{c.module}") if c.role == "in" else None
        if inner is None:
            continue
        per_channel, pos = torch.zeros(inner.shape[0], group.size, dtype=torch.float64), 0
        for seg in c.layout:
            if analysis.find(seg.space) == group.root:
                per_channel[:, seg.start: seg.start + seg.length] += inner[:, pos: pos + seg.length]
            pos += seg.length * seg.repeat
        scores = torch.zeros(group.size, dtype=torch.float64)
        for unit in group.classes:
            scores[unit] = per_channel[:, unit].sum(1).abs().mean() / len(unit)
        return scores
    return None


def thinet_contributions(graph: Graph, analysis: CouplingAnalysis, batches, seed: int) -> dict:
    """Per group, sampled per-channel contributions x̂ (samples × channels) to the outputs of the
    Conv2d/Linear layers that consume it, from the consumers' real inputs on ``batches``."""
    batches = list(batches) or [(graph.example_inputs, None)]
    module = graph.module
    consumers = {c.module for c in analysis.consumers
                 if c.role == "in" and isinstance(module.get_submodule(c.module), (nn.Conv2d, nn.Linear))}
    seen: dict[str, list[torch.Tensor]] = {n: [] for n in consumers}
    handles = [module.get_submodule(n).register_forward_pre_hook(
        lambda m, args, n=n: seen[n].append(args[0].detach())) for n in consumers]
    try:
        with torch.no_grad():
            was = module.training
            module.eval()
            for inputs, _ in batches:
                module(*(inputs if isinstance(inputs, (tuple, list)) else (inputs,)))
            module.train(was)
    finally:
        for hnd in handles:
            hnd.remove()
    gen = torch.Generator().manual_seed(seed)
    per_consumer: dict[str, torch.Tensor] = {}   # module -> (samples, input positions) contributions
    for name, xs in seen.items():
        m = module.get_submodule(name)
        x = torch.cat(xs).double()
        w = m.weight.detach().double()
        if isinstance(m, nn.Conv2d):
            cols = F.unfold(x, m.kernel_size, m.dilation, m.padding, m.stride)       # (N, C*K, L)
            n, ck, length = cols.shape
            k = ck // m.in_channels
            s = THINET_SAMPLES
            ni = torch.randint(0, n, (s,), generator=gen)
            li = torch.randint(0, length, (s,), generator=gen)
            oi = torch.randint(0, m.out_channels, (s,), generator=gen)
            u = cols[ni, :, li].reshape(s, m.in_channels, k)
            per_consumer[name] = (u * w[oi].reshape(s, m.in_channels, k)).sum(-1)
        else:  # Linear: one contribution per input feature
            x2 = x.reshape(-1, x.shape[-1])
            s = THINET_SAMPLES
            ri = torch.randint(0, x2.shape[0], (s,), generator=gen)
            oi = torch.randint(0, w.shape[0], (s,), generator=gen)
            per_consumer[name] = x2[ri] * w[oi]
    out = {}
    for group in analysis.groups:
        if not group.producers:
            continue
        root = group.root
        blocks = []
        for c in group.consumers:
            if c.role != "in" or c.module not in per_consumer or any(c.module == b[0] for b in blocks):
                continue
            contrib, pos, cols = per_consumer[c.module], 0, torch.zeros(THINET_SAMPLES, group.size, dtype=torch.float64)
            for seg in c.layout:
                if analysis.find(seg.space) == root:
                    part = contrib[:, pos: pos + seg.length * seg.repeat]
                    cols[:, seg.start: seg.start + seg.length] += part.reshape(-1, seg.length, seg.repeat).sum(-1)
                pos += seg.length * seg.repeat
            blocks.append((c.module, cols))
        if blocks:
            out[("thinet", group.id)] = torch.cat([b for _, b in blocks])
    return out


def thinet_order(xhat: torch.Tensor) -> torch.Tensor:
    """Greedy removal (ThiNet Alg. 1): repeatedly remove the channel whose contribution, added to
    the already-removed ones, changes the sampled outputs least. Earlier removal = lower score."""
    n = xhat.shape[1]
    removed = torch.zeros(n, dtype=torch.bool)
    running = torch.zeros(xhat.shape[0], dtype=xhat.dtype)
    score = torch.empty(n, dtype=torch.float64)
    for step in range(n):
        cost = (running.unsqueeze(1) + xhat).pow(2).sum(0)
        cost[removed] = float("inf")
        c = int(cost.argmin())
        removed[c] = True
        running += xhat[:, c]
        score[c] = step
    return score


def thinet_rescale(graph: Graph, analysis: CouplingAnalysis, group: Group, keep: torch.Tensor,
                    xhat: torch.Tensor) -> None:
    """Least squares: kept-channel scales w minimizing ||Σ_all x̂ - x̂_keep w||² on the samples;
    folded into the consuming layers' weights (input columns of the kept channels)."""
    target = xhat.sum(1)
    sol = torch.linalg.lstsq(xhat[:, keep], target.unsqueeze(1)).solution.squeeze(1)
    scale = torch.ones(group.size, dtype=torch.float64)
    scale[keep] = sol
    root = group.root
    done = set()
    with torch.no_grad():
        for c in group.consumers:
            if c.role != "in" or c.module in done:
                continue
            done.add(c.module)
            w = graph.module.get_submodule(c.module).weight
            pos = 0
            for seg in c.layout:
                if analysis.find(seg.space) == root:
                    factors = scale[seg.start: seg.start + seg.length].repeat_interleave(seg.repeat).to(w.dtype)
                    shape = [1, -1] + [1] * (w.dim() - 2)
                    w[:, pos: pos + seg.length * seg.repeat] *= factors.reshape(shape)
                pos += seg.length * seg.repeat
