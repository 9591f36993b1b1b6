"""Minimal versions of the structures of a standard classification zoo (the real torchvision zoo
is too heavy to install here): each keeps the family's characteristic wiring at toy width."""

import torch
import torch.nn.functional as F
from torch import nn


def cbr(cin, cout, k=3, s=1, g=1, act=nn.ReLU):
    return nn.Sequential(nn.Conv2d(cin, cout, k, s, k // 2, groups=g, bias=False), nn.BatchNorm2d(cout), act())


class VGG(nn.Module):
    def __init__(self):
        super().__init__()
        self.features = nn.Sequential(cbr(3, 16), cbr(16, 16), nn.MaxPool2d(2), cbr(16, 32), nn.MaxPool2d(2))
        self.classifier = nn.Sequential(nn.Flatten(), nn.Linear(32 * 8 * 8, 64), nn.ReLU(), nn.Dropout(), nn.Linear(64, 10))

    def forward(self, x):
        return self.classifier(self.features(x))


class DenseNet(nn.Module):
    """Dense block: every layer's output concatenated onto the running feature map."""

    def __init__(self, growth=8):
        super().__init__()
        self.stem = cbr(3, 16)
        self.layers = nn.ModuleList([cbr(16 + i * growth, growth) for i in range(3)])
        self.transition = nn.Sequential(nn.BatchNorm2d(16 + 3 * growth), nn.ReLU(), nn.Conv2d(16 + 3 * growth, 16, 1))
        self.fc = nn.Linear(16, 10)

    def forward(self, x):
        x = self.stem(x)
        for layer in self.layers:
            x = torch.cat([x, layer(x)], 1)
        return self.fc(self.transition(x).mean((2, 3)))


class MobileNetV3Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = cbr(3, 16, act=nn.Hardswish)
        self.expand = cbr(16, 48, 1, act=nn.Hardswish)
        self.dw = cbr(48, 48, 3, g=48, act=nn.Hardswish)
        self.se_reduce, self.se_expand = nn.Conv2d(48, 12, 1), nn.Conv2d(12, 48, 1)
        self.project = nn.Sequential(nn.Conv2d(48, 16, 1, bias=False), nn.BatchNorm2d(16))
        self.head = nn.Linear(16, 10)

    def forward(self, x):
        x = self.stem(x)
        y = self.dw(self.expand(x))
        s = F.hardsigmoid(self.se_expand(F.relu(self.se_reduce(F.adaptive_avg_pool2d(y, 1)))))
        x = x + self.project(y * s)
        return self.head(x.mean((2, 3)))


class SqueezeNetFire(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 32, 3, padding=1)
        self.squeeze = nn.Conv2d(32, 8, 1)
        self.e1, self.e3 = nn.Conv2d(8, 16, 1), nn.Conv2d(8, 16, 3, padding=1)
        self.final = nn.Conv2d(32, 10, 1)

    def forward(self, x):
        s = F.relu(self.squeeze(F.relu(self.stem(x))))
        x = torch.cat([F.relu(self.e1(s)), F.relu(self.e3(s))], 1)
        return F.adaptive_avg_pool2d(self.final(x), 1).flatten(1)


class ResNeXtBlock(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = cbr(3, 32)
        self.a, self.b = cbr(32, 32, 1), cbr(32, 32, 3, g=8)
        self.c = nn.Sequential(nn.Conv2d(32, 32, 1, bias=False), nn.BatchNorm2d(32))
        self.fc = nn.Linear(32, 10)

    def forward(self, x):
        x = self.stem(x)
        return self.fc(F.relu(x + self.c(self.b(self.a(x)))).mean((2, 3)))


class ConvNeXtBlock(nn.Module):
    """Depthwise 7x7, channels-last LayerNorm via permute, inverted MLP, layer scale, residual."""

    def __init__(self, dim=32):
        super().__init__()
        self.stem = nn.Conv2d(3, dim, 4, 4)
        self.dw = nn.Conv2d(dim, dim, 7, padding=3, groups=dim)
        self.norm = nn.LayerNorm(dim)
        self.fc1, self.fc2 = nn.Linear(dim, 4 * dim), nn.Linear(4 * dim, dim)
        self.gamma = nn.Parameter(torch.full((dim,), 1e-1))
        self.head = nn.Linear(dim, 10)

    def forward(self, x):
        x = self.stem(x)
        y = self.dw(x).permute(0, 2, 3, 1)
        y = self.fc2(F.gelu(self.fc1(self.norm(y)))) * self.gamma
        x = x + y.permute(0, 3, 1, 2)
        return self.head(x.mean((2, 3)))


class EfficientNetMBConv(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = cbr(3, 16, act=nn.SiLU)
        self.expand = cbr(16, 64, 1, act=nn.SiLU)
        self.dw = cbr(64, 64, 3, g=64, act=nn.SiLU)
        self.se = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Conv2d(64, 4, 1), nn.SiLU(), nn.Conv2d(4, 64, 1), nn.Sigmoid())
        self.project = nn.Sequential(nn.Conv2d(64, 16, 1, bias=False), nn.BatchNorm2d(16))
        self.head = nn.Linear(16, 10)

    def forward(self, x):
        x = self.stem(x)
        y = self.dw(self.expand(x))
        x = x + self.project(y * self.se(y))
        return self.head(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))


class WideResNetBlock(nn.Module):
    """Pre-activation wide basic block with a strided 1x1 projection shortcut."""

    def __init__(self, width=48):
        super().__init__()
        self.stem = nn.Conv2d(3, 16, 3, padding=1, bias=False)
        self.bn1, self.conv1 = nn.BatchNorm2d(16), nn.Conv2d(16, width, 3, 2, 1, bias=False)
        self.bn2, self.conv2 = nn.BatchNorm2d(width), nn.Conv2d(width, width, 3, padding=1, bias=False)
        self.shortcut = nn.Conv2d(16, width, 1, 2, bias=False)
        self.bn, self.fc = nn.BatchNorm2d(width), nn.Linear(width, 10)

    def forward(self, x):
        o = F.relu(self.bn1(self.stem(x)))
        y = self.conv2(F.dropout(F.relu(self.bn2(self.conv1(o))), 0.3, self.training))
        x = y + self.shortcut(o)
        return self.fc(F.adaptive_avg_pool2d(F.relu(self.bn(x)), 1).flatten(1))


class MobileNetV2Block(nn.Module):
    """Inverted residual: 1x1 expand (ReLU6) -> depthwise (ReLU6) -> linear 1x1 project, residual."""

    def __init__(self):
        super().__init__()
        self.stem = cbr(3, 16, s=2, act=nn.ReLU6)
        self.block = nn.Sequential(cbr(16, 96, 1, act=nn.ReLU6), cbr(96, 96, 3, g=96, act=nn.ReLU6),
                                   nn.Conv2d(96, 16, 1, bias=False), nn.BatchNorm2d(16))
        self.head = nn.Sequential(cbr(16, 64, 1, act=nn.ReLU6), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                                  nn.Dropout(0.2), nn.Linear(64, 10))

    def forward(self, x):
        x = self.stem(x)
        return self.head(x + self.block(x))


def channel_shuffle(x, groups: int):
    b, c, h, w = x.size()
    x = x.view(b, groups, c // groups, h, w)
    x = torch.transpose(x, 1, 2).contiguous()
    return x.view(b, -1, h, w)


class ShuffleNetV2Unit(nn.Module):
    """chunk -> (identity, 1x1 -> dw -> 1x1) -> cat -> channel shuffle (torchvision's wiring)."""

    def __init__(self, c=32):
        super().__init__()
        self.stem = cbr(3, c)
        half = c // 2
        self.branch2 = nn.Sequential(cbr(half, half, 1), nn.Conv2d(half, half, 3, 1, 1, groups=half, bias=False),
                                     nn.BatchNorm2d(half), cbr(half, half, 1))
        self.fc = nn.Linear(c, 10)

    def forward(self, x):
        x = self.stem(x)
        x1, x2 = x.chunk(2, dim=1)
        x = channel_shuffle(torch.cat((x1, self.branch2(x2)), dim=1), 2)
        return self.fc(x.mean([2, 3]))


class ShuffleNetV1Unit(nn.Module):
    """Grouped 1x1 -> channel shuffle -> depthwise -> grouped 1x1, residual, and a GroupNorm head."""

    def __init__(self, c=48, g=3):
        super().__init__()
        self.stem = cbr(3, c)
        self.g1, self.dw, self.g2 = cbr(c, c, 1, g=g), nn.Conv2d(c, c, 3, 1, 1, groups=c, bias=False), \
            nn.Conv2d(c, c, 1, groups=g, bias=False)
        self.bn2, self.bn3 = nn.BatchNorm2d(c), nn.BatchNorm2d(c)
        self.g = g
        self.norm = nn.GroupNorm(4, c)
        self.fc = nn.Linear(c, 10)

    def forward(self, x):
        x = self.stem(x)
        y = self.bn3(self.g2(self.bn2(self.dw(channel_shuffle(self.g1(x), self.g)))))
        return self.fc(self.norm(F.relu(x + y)).mean((2, 3)))


class RegNetYBlock(nn.Module):
    """RegNetY bottleneck: 1x1 -> grouped 3x3 (group width 8) -> SE -> 1x1, projection shortcut."""

    def __init__(self, cin=24, w=48, group_width=8):
        super().__init__()
        self.stem = cbr(3, cin, s=2)
        self.a = cbr(cin, w, 1)
        self.b = cbr(w, w, 3, s=2, g=w // group_width)
        self.se = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Conv2d(w, 6, 1), nn.ReLU(), nn.Conv2d(6, w, 1), nn.Sigmoid())
        self.c = nn.Sequential(nn.Conv2d(w, w, 1, bias=False), nn.BatchNorm2d(w))
        self.proj = nn.Sequential(nn.Conv2d(cin, w, 1, 2, bias=False), nn.BatchNorm2d(w))
        self.fc = nn.Linear(w, 10)

    def forward(self, x):
        x = self.stem(x)
        y = self.b(self.a(x))
        x = F.relu(self.proj(x) + self.c(y * self.se(y)))
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))


class MNASNetBlock(nn.Module):
    """MNASNet: separable stem, then MBConv 5x5 (expansion 3) with a residual, 1x1 head."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Sequential(cbr(3, 16, s=2), cbr(16, 16, 3, g=16), nn.Conv2d(16, 8, 1, bias=False),
                                  nn.BatchNorm2d(8))
        self.mb = nn.Sequential(cbr(8, 24, 1), cbr(24, 24, 5, g=24), nn.Conv2d(24, 8, 1, bias=False), nn.BatchNorm2d(8))
        self.head = cbr(8, 64, 1)
        self.classifier = nn.Sequential(nn.Dropout(0.2), nn.Linear(64, 10))

    def forward(self, x):
        x = self.stem(x)
        x = self.head(x + self.mb(x))
        return self.classifier(x.mean([2, 3]))


class InceptionBlock(nn.Module):
    """GoogLeNet Inception module: 1x1 / 1x1->3x3 / 1x1->5x5 / pool->1x1 branches concatenated."""

    def __init__(self):
        super().__init__()
        self.stem = cbr(3, 32)
        self.b1 = cbr(32, 16, 1)
        self.b2 = nn.Sequential(cbr(32, 12, 1), cbr(12, 16, 3))
        self.b3 = nn.Sequential(cbr(32, 4, 1), cbr(4, 8, 5))
        self.b4 = nn.Sequential(nn.MaxPool2d(3, 1, 1), cbr(32, 8, 1))
        self.fc = nn.Linear(48, 10)

    def forward(self, x):
        x = self.stem(x)
        x = torch.cat([self.b1(x), self.b2(x), self.b3(x), self.b4(x)], 1)
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))


class ViT(nn.Module):
    """Patch embedding, class token, position embedding, pre-norm encoder block (MHA + MLP)."""

    def __init__(self, dim=32, patch=8, tokens=16):
        super().__init__()
        self.patch = nn.Conv2d(3, dim, patch, patch)
        self.cls = nn.Parameter(torch.zeros(1, 1, dim))
        self.pos = nn.Parameter(torch.randn(1, tokens + 1, dim) * 0.02)
        self.ln1, self.attn = nn.LayerNorm(dim), nn.MultiheadAttention(dim, 4, batch_first=True)
        self.ln2 = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, 4 * dim), nn.GELU(), nn.Dropout(0.0), nn.Linear(4 * dim, dim))
        self.head = nn.Linear(dim, 10)

    def forward(self, x):
        x = self.patch(x).flatten(2).transpose(1, 2)
        x = torch.cat([self.cls.expand(x.shape[0], -1, -1), x], dim=1) + self.pos
        y = self.ln1(x)
        x = x + self.attn(y, y, y, need_weights=False)[0]
        x = x + self.mlp(self.ln2(x))
        return self.head(x[:, 0])


class SwinBlock(nn.Module):
    """Swin: channels-last patch embedding, (shifted) window partition via view/permute and
    torch.roll, window attention with a relative position bias, MLP, residuals."""

    def __init__(self, dim=32, heads=4, window=4, shift=2):
        super().__init__()
        self.patch = nn.Conv2d(3, dim, 4, 4)
        self.norm0, self.ln1, self.ln2 = nn.LayerNorm(dim), nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.qkv, self.proj = nn.Linear(dim, 3 * dim), nn.Linear(dim, dim)
        self.bias = nn.Parameter(torch.randn(heads, window * window, window * window) * 0.02)
        self.fc1, self.fc2 = nn.Linear(dim, 4 * dim), nn.Linear(4 * dim, dim)
        self.head = nn.Linear(dim, 10)
        self.heads, self.window, self.shift = heads, window, shift

    def forward(self, x):
        x = self.norm0(self.patch(x).permute(0, 2, 3, 1))           # B, H, W, C
        b, h, w, c = x.shape
        ws, nh = self.window, self.heads
        y = torch.roll(self.ln1(x), (-self.shift, -self.shift), (1, 2))
        y = y.view(b, h // ws, ws, w // ws, ws, c).permute(0, 1, 3, 2, 4, 5).reshape(-1, ws * ws, c)
        q, k, v = self.qkv(y).reshape(y.shape[0], ws * ws, 3, nh, c // nh).permute(2, 0, 3, 1, 4)
        a = ((q @ k.transpose(-2, -1)) * (c // nh) ** -0.5 + self.bias).softmax(-1)
        y = self.proj((a @ v).transpose(1, 2).reshape(y.shape[0], ws * ws, c))
        y = y.view(b, h // ws, w // ws, ws, ws, c).permute(0, 1, 3, 2, 4, 5).reshape(b, h, w, c)
        x = x + torch.roll(y, (self.shift, self.shift), (1, 2))
        x = x + self.fc2(F.gelu(self.fc1(self.ln2(x))))
        return self.head(x.mean((1, 2)))


FAMILIES = {"vgg": VGG, "densenet": DenseNet, "mobilenetv3": MobileNetV3Block, "squeezenet": SqueezeNetFire,
            "resnext": ResNeXtBlock, "convnext": ConvNeXtBlock, "efficientnet": EfficientNetMBConv,
            "wide-resnet": WideResNetBlock, "mobilenetv2": MobileNetV2Block, "shufflenetv2": ShuffleNetV2Unit,
            "shufflenetv1-groupnorm": ShuffleNetV1Unit, "regnet": RegNetYBlock, "mnasnet": MNASNetBlock,
            "inception": InceptionBlock, "vit": ViT, "swin": SwinBlock}
