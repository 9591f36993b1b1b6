"""Foundation test set of small PyTorch architectures for the compression compiler.

The set exists so that every graph structure the channel-coupling analysis and the
code generator must handle (residual adds, concat, depthwise/grouped convs, shuffles,
splits, tied weights, attention, upsampling skips, plain MLPs) is covered by one
tiny, deterministic, fx-traceable and torch.export-able model.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F

__all__ = [
    "LeNet5",
    "ResidualNet",
    "ConcatNet",
    "DepthwiseGroupedNet",
    "SqueezeExciteNet",
    "ChannelShuffleNet",
    "SplitNet",
    "SharedModuleNet",
    "AttentionNet",
    "UNetLike",
    "MLPNet",
    "ZooEntry",
    "ZOO",
    "get",
]


def _conv_bn(cin: int, cout: int, k: int, stride: int = 1, groups: int = 1) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(cin, cout, k, stride=stride, padding=k // 2, groups=groups, bias=False),
        nn.BatchNorm2d(cout),
    )


# --------------------------------------------------------------------------- models


class LeNet5(nn.Module):
    """Classic LeNet-5 on 1x28x28: plain conv/pool chain ending in a flatten -> linear coupling."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, 6, 5, padding=2)
        self.pool1 = nn.MaxPool2d(2)
        self.conv2 = nn.Conv2d(6, 16, 5)
        self.pool2 = nn.MaxPool2d(2)
        self.fc1 = nn.Linear(16 * 5 * 5, 120)
        self.fc2 = nn.Linear(120, 84)
        self.fc3 = nn.Linear(84, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.pool1(F.relu(self.conv1(x)))
        x = self.pool2(F.relu(self.conv2(x)))
        x = torch.flatten(x, 1)
        x = F.relu(self.fc1(x))
        x = F.relu(self.fc2(x))
        return self.fc3(x)


class LeNet300100(nn.Module):
    """LeNet-300-100 (LeCun et al. 1998): the MLP of Deep Compression's MNIST results, on 1x28x28."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(784, 300)
        self.fc2 = nn.Linear(300, 100)
        self.fc3 = nn.Linear(100, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.flatten(x, 1)
        return self.fc3(F.relu(self.fc2(F.relu(self.fc1(x)))))


class _BasicBlock(nn.Module):
    """ResNet basic block; residual add couples the channels of both addends."""

    def __init__(self, cin: int, cout: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.downsample: nn.Module
        if stride != 1 or cin != cout:
            self.downsample = nn.Sequential(
                nn.Conv2d(cin, cout, 1, stride=stride, bias=False),
                nn.BatchNorm2d(cout),
            )
        else:
            self.downsample = nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.downsample(x))


class ResidualNet(nn.Module):
    """Conv-BN stem plus two ResNet basic blocks (identity and 1x1-downsample shortcuts) to exercise residual-add channel coupling."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = _conv_bn(3, 16, 3)
        self.block1 = _BasicBlock(16, 16, stride=1)
        self.block2 = _BasicBlock(16, 32, stride=2)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(32, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.stem(x))
        x = self.block1(x)
        x = self.block2(x)
        x = torch.flatten(self.pool(x), 1)
        return self.fc(x)


class ConcatNet(nn.Module):
    """Inception-style parallel branches joined by torch.cat on channels, exercising concat offset bookkeeping."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = _conv_bn(3, 16, 3)
        self.b1 = nn.Conv2d(16, 8, 1)
        self.b3 = nn.Conv2d(16, 16, 3, padding=1)
        self.bpool = nn.MaxPool2d(3, stride=1, padding=1)
        self.bpool_proj = nn.Conv2d(16, 8, 1)
        self.post = nn.Conv2d(8 + 16 + 8, 32, 3, padding=1)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(32, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.stem(x))
        a = F.relu(self.b1(x))
        b = F.relu(self.b3(x))
        c = F.relu(self.bpool_proj(self.bpool(x)))
        x = torch.cat([a, b, c], dim=1)
        x = F.relu(self.post(x))
        x = torch.flatten(self.pool(x), 1)
        return self.fc(x)


class DepthwiseGroupedNet(nn.Module):
    """MobileNetV2 inverted residual (depthwise groups=C) plus a groups=4 conv, exercising per-group channel coupling."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = _conv_bn(3, 16, 3, stride=2)
        self.expand = _conv_bn(16, 64, 1)
        self.dw = _conv_bn(64, 64, 3, groups=64)
        self.project = _conv_bn(64, 16, 1)
        self.grouped = _conv_bn(16, 32, 3, groups=4)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(32, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.stem(x))
        y = F.relu6(self.expand(x))
        y = F.relu6(self.dw(y))
        y = self.project(y)
        x = x + y
        x = F.relu(self.grouped(x))
        x = torch.flatten(self.pool(x), 1)
        return self.fc(x)


class SqueezeExciteNet(nn.Module):
    """Squeeze-excitation gate (pool -> reduce -> expand -> sigmoid -> broadcast mul), exercising channel-wise multiplicative coupling."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = _conv_bn(3, 32, 3)
        self.se_reduce = nn.Conv2d(32, 8, 1)
        self.se_expand = nn.Conv2d(8, 32, 1)
        self.conv2 = _conv_bn(32, 32, 3, stride=2)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(32, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.conv(x))
        s = F.adaptive_avg_pool2d(x, 1)
        s = F.relu(self.se_reduce(s))
        s = torch.sigmoid(self.se_expand(s))
        x = x * s
        x = F.relu(self.conv2(x))
        x = torch.flatten(self.pool(x), 1)
        return self.fc(x)


class ChannelShuffleNet(nn.Module):
    """ShuffleNetV2 unit (chunk, branch, cat, view/transpose channel shuffle), exercising channel permutations via reshapes."""

    def __init__(self) -> None:
        super().__init__()
        self.groups = 2
        self.stem = _conv_bn(3, 32, 3)
        self.branch = nn.Sequential(
            _conv_bn(16, 16, 1),
            nn.ReLU(),
            _conv_bn(16, 16, 3, groups=16),
            _conv_bn(16, 16, 1),
            nn.ReLU(),
        )
        self.post = _conv_bn(32, 32, 3, stride=2)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(32, 10)

    def channel_shuffle(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.size(0), x.size(1), x.size(2), x.size(3)
        g = self.groups
        x = x.view(b, g, c // g, h, w).transpose(1, 2).contiguous()
        return x.view(b, c, h, w)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.stem(x))
        x1, x2 = x.chunk(2, dim=1)
        x = torch.cat([x1, self.branch(x2)], dim=1)
        x = self.channel_shuffle(x)
        x = F.relu(self.post(x))
        x = torch.flatten(self.pool(x), 1)
        return self.fc(x)


class SplitNet(nn.Module):
    """Unequal torch.split along channels with different convs per part, then cat, exercising split-size bookkeeping."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = _conv_bn(3, 32, 3)
        self.conv_a = nn.Conv2d(8, 8, 3, padding=1)
        self.conv_b = nn.Conv2d(24, 16, 1)
        self.post = nn.Conv2d(24, 32, 3, stride=2, padding=1)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(32, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.stem(x))
        a, b = torch.split(x, [8, 24], dim=1)
        a = F.relu(self.conv_a(a))
        b = F.relu(self.conv_b(b))
        x = torch.cat([b, a], dim=1)
        x = F.relu(self.post(x))
        x = torch.flatten(self.pool(x), 1)
        return self.fc(x)


class SharedModuleNet(nn.Module):
    """One Conv2d instance applied twice (tied weights), exercising coupling of a module's input and output channels."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 16, 3, padding=1)
        self.shared = nn.Conv2d(16, 16, 3, padding=1)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(16, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.stem(x))
        x = F.relu(self.shared(x))
        x = F.max_pool2d(x, 2)
        x = F.relu(self.shared(x))
        x = torch.flatten(self.pool(x), 1)
        return self.fc(x)


class AttentionNet(nn.Module):
    """Tiny ViT (patch embed, pos-embed parameter, explicit MHA with SDPA, MLP, residuals), exercising head-structured linear coupling."""

    def __init__(self) -> None:
        super().__init__()
        self.dim = 32
        self.heads = 4
        self.head_dim = self.dim // self.heads
        self.num_tokens = (32 // 4) * (32 // 4)
        self.patch = nn.Conv2d(3, self.dim, 4, stride=4)
        self.pos = nn.Parameter(torch.randn(1, self.num_tokens, self.dim) * 0.02)
        self.norm1 = nn.LayerNorm(self.dim)
        self.qkv = nn.Linear(self.dim, 3 * self.dim)
        self.proj = nn.Linear(self.dim, self.dim)
        self.norm2 = nn.LayerNorm(self.dim)
        self.mlp_fc1 = nn.Linear(self.dim, 4 * self.dim)
        self.mlp_fc2 = nn.Linear(4 * self.dim, self.dim)
        self.norm_out = nn.LayerNorm(self.dim)
        self.head = nn.Linear(self.dim, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.patch(x)  # (B, D, 8, 8)
        x = x.flatten(2).transpose(1, 2)  # (B, N, D)
        x = x + self.pos
        b, n = x.size(0), x.size(1)

        h = self.norm1(x)
        qkv = self.qkv(h).reshape(b, n, 3, self.heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)  # each (B, H, N, hd)
        a = F.scaled_dot_product_attention(q, k, v)
        a = a.transpose(1, 2).reshape(b, n, self.dim)
        x = x + self.proj(a)

        h = self.norm2(x)
        h = self.mlp_fc2(F.gelu(self.mlp_fc1(h)))
        x = x + h

        x = x.mean(dim=1)
        return self.head(self.norm_out(x))


class UNetLike(nn.Module):
    """Encoder/bottleneck/decoder with nn.Upsample and F.interpolate plus skip concats, exercising spatial resampling and per-pixel heads."""

    def __init__(self) -> None:
        super().__init__()
        self.enc1 = _conv_bn(3, 16, 3)
        self.enc2 = _conv_bn(16, 32, 3)
        self.bottleneck = _conv_bn(32, 32, 3)
        self.up = nn.Upsample(scale_factor=2, mode="nearest")
        self.dec2 = _conv_bn(32 + 32, 32, 3)
        self.dec1 = _conv_bn(32 + 16, 16, 3)
        self.head = nn.Conv2d(16, 2, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        e1 = F.relu(self.enc1(x))  # 16 @ 32x32
        e2 = F.relu(self.enc2(F.max_pool2d(e1, 2)))  # 32 @ 16x16
        bott = F.relu(self.bottleneck(F.max_pool2d(e2, 2)))  # 32 @ 8x8
        d2 = torch.cat([self.up(bott), e2], dim=1)  # 64 @ 16x16
        d2 = F.relu(self.dec2(d2))
        d1 = F.interpolate(d2, scale_factor=2.0, mode="nearest")  # 32 @ 32x32
        d1 = F.relu(self.dec1(torch.cat([d1, e1], dim=1)))
        return self.head(d1)


class MLPNet(nn.Module):
    """Linear/LayerNorm/GELU/Dropout MLP with a residual on a flat vector, exercising pure feature-dim coupling."""

    def __init__(self) -> None:
        super().__init__()
        self.fc_in = nn.Linear(64, 128)
        self.norm = nn.LayerNorm(128)
        self.drop = nn.Dropout(0.1)
        self.fc_mid = nn.Linear(128, 128)
        self.head = nn.Linear(128, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.fc_in(x)
        y = self.drop(F.gelu(self.norm(h)))
        y = self.fc_mid(y)
        h = h + y
        return self.head(h)


# --------------------------------------------------------------------------- registry


@dataclass(frozen=True)
class ZooEntry:
    """A zoo model: how to build it, its per-sample input shape, and the structures it covers."""

    name: str
    factory: Callable[[], nn.Module]
    input_shape: tuple[int, ...]
    structures: tuple[str, ...]

    def example_inputs(self, batch: int = 1, seed: int = 0) -> tuple[torch.Tensor, ...]:
        """Deterministic float32 randn inputs of shape (batch, *input_shape)."""
        g = torch.Generator().manual_seed(seed)
        return (torch.randn((batch, *self.input_shape), generator=g, dtype=torch.float32),)

    def build(self, seed: int = 0) -> nn.Module:
        """Seed torch, construct the model, and return it in eval mode."""
        torch.manual_seed(seed)
        return self.factory().eval()


_ENTRIES: tuple[ZooEntry, ...] = (
    ZooEntry("lenet5", LeNet5, (1, 28, 28), ("conv", "maxpool", "flatten-linear")),
    ZooEntry("lenet-300-100", LeNet300100, (1, 28, 28), ("flatten", "linear")),
    ZooEntry("residual", ResidualNet, (3, 32, 32), ("residual-add", "batchnorm", "downsample-shortcut", "global-pool")),
    ZooEntry("concat", ConcatNet, (3, 32, 32), ("concat", "parallel-branches", "maxpool")),
    ZooEntry("depthwise-grouped", DepthwiseGroupedNet, (3, 32, 32), ("depthwise-conv", "grouped-conv", "residual-add", "batchnorm")),
    ZooEntry("squeeze-excite", SqueezeExciteNet, (3, 32, 32), ("squeeze-excite", "broadcast-mul", "sigmoid")),
    ZooEntry("channel-shuffle", ChannelShuffleNet, (3, 32, 32), ("chunk", "concat", "channel-shuffle", "view-transpose")),
    ZooEntry("split", SplitNet, (3, 32, 32), ("split-unequal", "concat")),
    ZooEntry("shared-module", SharedModuleNet, (3, 32, 32), ("shared-module", "tied-weights")),
    ZooEntry("attention", AttentionNet, (3, 32, 32), ("patch-embed", "parameter-add", "layernorm", "multi-head-attention", "sdpa", "residual-add", "gelu")),
    ZooEntry("unet", UNetLike, (3, 32, 32), ("upsample", "interpolate", "skip-concat", "per-pixel-head", "batchnorm")),
    ZooEntry("mlp", MLPNet, (64,), ("linear", "layernorm", "gelu", "dropout", "residual-add")),
)

ZOO: dict[str, ZooEntry] = {e.name: e for e in _ENTRIES}


def get(name: str) -> ZooEntry:
    """Return the zoo entry called ``name``; raise KeyError listing valid names otherwise."""
    try:
        return ZOO[name]
    except KeyError:
        raise KeyError(f"unknown zoo model {name!r}; valid names: {', '.join(ZOO)}") from None
