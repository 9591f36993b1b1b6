"""Resolving a model named on the command line: ``package.module:factory`` or a zoo name."""

from __future__ import annotations

import importlib
from typing import Sequence

import torch
from torch import nn

from compiler.errors import SqueezerError


def load_model(spec: str) -> nn.Module:
    """``pkg.mod:factory`` (factory() -> nn.Module, or an nn.Module instance) or a zoo entry name."""
    from . import zoo

    if ":" not in spec:
        if spec in zoo.ZOO:
            return zoo.ZOO[spec].build()
        raise SqueezerError(f"model {spec!r} is neither 'package.module:factory' nor a zoo model "
                            f"({', '.join(zoo.ZOO)})")
    mod_name, _, attr = spec.partition(":")
    try:
        module = importlib.import_module(mod_name)
    except ImportError as exc:
        raise SqueezerError(f"cannot import module {mod_name!r} of model {spec!r}: {exc}") from None
    if not hasattr(module, attr):
        raise SqueezerError(f"module {mod_name!r} has no attribute {attr!r} (model {spec!r})")
    obj = getattr(module, attr)
    model = obj if isinstance(obj, nn.Module) else obj()
    if not isinstance(model, nn.Module):
        raise SqueezerError(f"{spec!r} returned {type(model).__name__}, not a torch.nn.Module")
    return model.eval()


def parse_shape(text: str) -> tuple[int, ...]:
    """``"1,3,32,32"`` or ``"1x3x32x32"`` -> (1, 3, 32, 32)."""
    try:
        dims = tuple(int(d) for d in text.replace("x", ",").split(",") if d.strip())
    except ValueError:
        raise SqueezerError(f"input shape {text!r} must be integers separated by ',' e.g. 1,3,32,32") from None
    if not dims or any(d <= 0 for d in dims):
        raise SqueezerError(f"input shape {text!r} must have positive dimensions")
    return dims


def example_inputs_for(model_spec: str, shapes: Sequence[str] | None, batch: int = 1) -> tuple[torch.Tensor, ...]:
    from . import zoo

    if shapes:
        gen = torch.Generator().manual_seed(0)
        return tuple(torch.randn(parse_shape(s), generator=gen) for s in shapes)
    if model_spec in zoo.ZOO:
        return zoo.ZOO[model_spec].example_inputs(batch)
    raise SqueezerError(f"model {model_spec!r} needs --input-shape (e.g. --input-shape 1,3,32,32)")
