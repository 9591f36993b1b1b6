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


FAMILIES = {"vgg": VGG, "densenet": DenseNet, "mobilenetv3": MobileNetV3Block, "squeezenet": SqueezeNetFire,
            "resnext": ResNeXtBlock, "convnext": ConvNeXtBlock, "efficientnet": EfficientNetMBConv}
