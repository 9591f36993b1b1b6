"""Feature-based distillation losses, added to Hinton's soft targets (``TrainConfig.feature_loss``):
the student also learns from the teacher's intermediate activations, recorded by forward hooks on
the layers named in ``pairs`` (student layer -> teacher layer; after channel pruning the names are
the same and only the widths differ).

* :class:`HintLoss` — FitNets (Romero et al., "FitNets: Hints for Thin Deep Nets", ICLR 2015): a
  learned regressor (a 1×1 convolution, or a linear map for flat features) maps the student's
  *guided* layer to the teacher's *hint* layer, and ``1/2 ||hint - r(guided)||^2`` (per element,
  batch-averaged) is minimized together with the student, so a thinner student may have other
  widths than its teacher.
* :class:`AttentionTransfer` — Zagoruyko & Komodakis, "Paying More Attention to Attention", ICLR
  2017: the spatial attention map ``Q = sum_c |A_c|^p`` (p = 2), flattened and L2-normalized per
  sample, is matched between student and teacher: ``beta/2 * sum_j ||Q_s/|Q_s| - Q_t/|Q_t| ||^2``,
  squared and averaged over positions and the batch as the authors' code does (beta = 1e3 there).
  It has no parameters and does not depend on the channel count.

Each loss is an ``nn.Module``: its parameters (FitNets' regressors) train with the student, and
under DDP their gradients are averaged like the student's.
"""

from __future__ import annotations

import contextlib
from typing import Iterator, Mapping

import torch
import torch.nn.functional as F
from torch import nn

from .errors import OptionError


def _as_pairs(pairs: Mapping[str, str] | tuple[str, ...] | list[str]) -> dict[str, str]:
    mapping = dict(pairs) if isinstance(pairs, Mapping) else {name: name for name in pairs}
    if not mapping:
        raise OptionError("feature distillation needs at least one layer pair (student layer -> teacher layer)")
    return mapping


def _layer(model: nn.Module, name: str, side: str) -> nn.Module:
    try:
        return model.get_submodule(name)
    except AttributeError:
        layers = [n for n, _ in model.named_modules() if n][:12]
        raise OptionError(f"feature distillation: the {side} has no layer {name!r} (its layers include "
                          f"{', '.join(layers)})") from None


class FeatureDistillation(nn.Module):
    """What both losses share: recording the paired layers' outputs during one forward pass."""

    def __init__(self, pairs: Mapping[str, str] | tuple[str, ...] | list[str], weight: float) -> None:
        super().__init__()
        if not weight > 0:
            raise OptionError(f"feature distillation weight must be > 0, got {weight!r}")
        self.pairs = _as_pairs(pairs)
        self.weight = float(weight)
        self._student: dict[str, torch.Tensor] = {}
        self._teacher: dict[str, torch.Tensor] = {}

    @contextlib.contextmanager
    def recording(self, student: nn.Module, teacher: nn.Module | None) -> Iterator[None]:
        """Inside, forward passes of ``student`` and ``teacher`` record the paired layers' outputs."""
        if teacher is None:
            raise OptionError("feature distillation needs a teacher: train(..., teacher=model)")
        self._student, self._teacher = {}, {}
        hooks = []
        for s_name, t_name in self.pairs.items():
            hooks.append(_layer(student, s_name, "student").register_forward_hook(self._keeper(self._student, s_name)))
            hooks.append(_layer(teacher, t_name, "teacher").register_forward_hook(self._keeper(self._teacher, s_name)))
        try:
            yield
        finally:
            for h in hooks:
                h.remove()

    @staticmethod
    def _keeper(store: dict[str, torch.Tensor], key: str):
        def hook(_module, _inputs, output):
            store[key] = output if isinstance(output, torch.Tensor) else output[0]
        return hook

    def recorded(self) -> list[tuple[str, torch.Tensor, torch.Tensor]]:
        missing = [k for k in self.pairs if k not in self._student or k not in self._teacher]
        if missing:
            raise OptionError(f"feature distillation: layer(s) {missing} did not run in this forward pass")
        return [(k, self._student[k], self._teacher[k]) for k in self.pairs]

    def loss(self) -> torch.Tensor:
        raise NotImplementedError

    def extra_repr(self) -> str:
        return f"pairs={self.pairs}, weight={self.weight}"


class HintLoss(FeatureDistillation):
    """FitNets' hint loss with learned regressors (see the module docstring). ``channels`` gives each
    pair's (student width, teacher width), e.g. from the two models' layers."""

    def __init__(self, pairs: Mapping[str, str] | tuple[str, ...] | list[str], channels: Mapping[str, tuple[int, int]],
                 weight: float = 1.0) -> None:
        super().__init__(pairs, weight)
        self.regressors = nn.ModuleDict()
        for s_name in self.pairs:
            if s_name not in channels:
                raise OptionError(f"HintLoss: no (student, teacher) widths given for layer {s_name!r}")
            cs, ct = channels[s_name]
            r = nn.Conv2d(cs, ct, 1, bias=False)
            nn.init.kaiming_uniform_(r.weight, a=5 ** 0.5)
            if cs == ct:   # equal widths start from the identity: an unpruned student starts with zero hint loss
                with torch.no_grad():
                    r.weight.copy_(torch.eye(cs).reshape(cs, cs, 1, 1))
            self.regressors[s_name.replace(".", "__")] = r

    @classmethod
    def between(cls, student: nn.Module, teacher: nn.Module, pairs: Mapping[str, str] | tuple[str, ...] | list[str],
                weight: float = 1.0) -> HintLoss:
        """Regressors sized from the paired layers' output widths (Conv2d out_channels, Linear out_features)."""
        widths = {}
        for s_name, t_name in _as_pairs(pairs).items():
            widths[s_name] = (_width(_layer(student, s_name, "student")), _width(_layer(teacher, t_name, "teacher")))
        return cls(pairs, widths, weight)

    def loss(self) -> torch.Tensor:
        total = 0.0
        for key, s, t in self.recorded():
            r = self.regressors[key.replace(".", "__")]
            guided = r(s) if s.dim() == 4 else F.linear(s, r.weight.flatten(1))
            if guided.shape != t.shape:
                raise OptionError(f"HintLoss: layer {key!r}: regressed student features {tuple(guided.shape)} do not "
                                  f"match the teacher's hint {tuple(t.shape)}")
            total = total + 0.5 * (guided - t.detach()).pow(2).mean()
        return self.weight * total


def _width(layer: nn.Module) -> int:
    for attr in ("out_channels", "out_features", "num_features"):
        if isinstance(getattr(layer, attr, None), int):
            return getattr(layer, attr)
    raise OptionError(f"HintLoss: cannot tell the output width of a {type(layer).__name__}; give channels= explicitly")


def attention_map(a: torch.Tensor, p: float = 2.0) -> torch.Tensor:
    """Zagoruyko & Komodakis' activation-based spatial attention: ``sum_c |A_c|^p`` per position,
    flattened and L2-normalized per sample (the channel mean in their code: the same after normalizing)."""
    return F.normalize(a.abs().pow(p).mean(1).flatten(1), dim=1)


class AttentionTransfer(FeatureDistillation):
    """Attention transfer (see the module docstring); ``weight`` is the paper's beta (1e3 in its code)."""

    def __init__(self, pairs: Mapping[str, str] | tuple[str, ...] | list[str], weight: float = 1e3,
                 p: float = 2.0) -> None:
        super().__init__(pairs, weight)
        self.p = float(p)

    def loss(self) -> torch.Tensor:
        total = 0.0
        for key, s, t in self.recorded():
            if s.dim() != 4 or s.shape[2:] != t.shape[2:]:
                raise OptionError(f"AttentionTransfer: layer {key!r}: needs NCHW maps of the same spatial size, got "
                                  f"{tuple(s.shape)} (student) and {tuple(t.shape)} (teacher)")
            total = total + (attention_map(s, self.p) - attention_map(t.detach(), self.p)).pow(2).mean()
        return self.weight / 2 * total
