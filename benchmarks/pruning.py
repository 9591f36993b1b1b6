"""Suite "pruning": does a MAC cut from channel pruning become a latency cut once compiled?

A ResNet-style network (3 stages of 2 basic blocks, widths 64-128-256, 3x32x32 inputs) is pruned
to half its MACs with L1 filter pruning, channel counts rounded to 16 (one AVX-512 vector of
fp32: the issue's ``round_to`` for the target's vector width). Both models are compiled with TVM
for this CPU and timed side by side. The headline is *realized ratio* = latency cut / MAC cut
(1.0: the compiled model got exactly as much faster as its arithmetic shrank; target >= 0.9).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Sequence

import torch
from torch import nn

from . import harness as h

COLUMNS = [("batch", "batch", "d"), ("mac_cut", "MAC cut", ".1%"), ("latency_cut", "latency cut", ".1%"),
           ("realized", "realized ratio", ".2f"), ("dense_ms", "dense ms", ".3f"), ("pruned_ms", "pruned ms", ".3f"),
           ("max_abs_err", "max abs err (pruned, tvm vs torch)", ".1e")]


class _Block(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.short = (nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))
                      if stride != 1 or cin != cout else nn.Identity())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.relu(self.bn1(self.conv1(x)))
        return torch.relu(self.bn2(self.conv2(y)) + self.short(x))


class ResNetSmall(nn.Module):
    """ResNet-style: stem + 3 stages x 2 basic blocks (64/128/256), global pool, linear."""

    def __init__(self, classes: int = 10) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 64, 3, 1, 1, bias=False), nn.BatchNorm2d(64), nn.ReLU())
        widths, blocks, cin = (64, 128, 256), [], 64
        for i, w in enumerate(widths):
            blocks += [_Block(cin, w, 1 if i == 0 else 2), _Block(w, w, 1)]
            cin = w
        self.blocks = nn.Sequential(*blocks)
        self.fc = nn.Linear(cin, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.blocks(self.stem(x)).mean((2, 3)))


def run(models: Sequence[str] | None = None, batches: Sequence[int] | None = None, *, quick: bool = False,
        out: str | Path | None = None, threads: int | None = None) -> dict[str, Any]:
    import codegen
    import compiler
    from passes import ChannelPruning

    threads = threads or h.CPU_COUNT
    h.set_thread_counts(threads)
    torch.manual_seed(0)
    model = ResNetSmall().eval()
    with torch.no_grad():  # non-trivial BN statistics so pruning has something to rank
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.uniform_(-0.1, 0.1)
                m.running_var.uniform_(0.5, 1.5)
    rows = []
    for batch in batches or ([1] if quick else [1, 8]):
        x = torch.randn(batch, 3, 32, 32, generator=torch.Generator().manual_seed(batch))
        dense = compiler.trace(model, (x,))
        pruned = ChannelPruning(target_macs=0.5, round_to=16)(dense)
        macs = compiler.summarize(dense).total_macs, compiler.summarize(pruned).total_macs
        cd, cp = codegen.build(dense), codegen.build(pruned)
        err = h.max_abs_err(pruned.run_example(), cp(x))
        flagged = err > h.ERR_TOL
        n, r = (5, 3) if quick else (20, 5)
        med, _ = h.interleaved({"dense_ms": lambda: cd.benchmark(x, number=n, repeat=r)["median_ms"],
                                "pruned_ms": lambda: cp.benchmark(x, number=n, repeat=r)["median_ms"]},
                               rounds=3 if quick else 5)
        mac_cut = 1 - macs[1] / macs[0]
        lat_cut = 1 - med["pruned_ms"] / med["dense_ms"]
        rows.append({"batch": batch, "macs_dense": macs[0], "macs_pruned": macs[1], "mac_cut": mac_cut,
                     "latency_cut": lat_cut, "realized": lat_cut / mac_cut, **med, "max_abs_err": err,
                     "flagged": flagged})
    header = [f"## pruning (ResNet-style, L1 to half the MACs, round_to=16; TVM llvm, {threads} thread(s))", "",
              f"{h.machine_info().get('date', '')}", "",
              "realized ratio = latency cut / MAC cut, dense and pruned compiled and timed side by side in one run.", ""]
    markdown = "\n".join(header) + h.markdown_table(rows, COLUMNS)
    result = {"suite": "pruning", "machine": h.machine_info(), "rows": rows, "markdown": markdown}
    h.write_results("pruning_quick" if quick else "pruning", result, markdown,
                    out or Path(__file__).parent / "results")
    return result
