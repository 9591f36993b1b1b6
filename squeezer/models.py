"""Resolving a model named on the command line: ``package.module:factory`` or a zoo name."""

from __future__ import annotations

import importlib
import inspect
from typing import Sequence

import torch
from torch import nn

from compiler.errors import SqueezerError


def load_model(spec: str) -> nn.Module:
    """``pkg.mod:factory`` (factory() -> nn.Module, or an nn.Module instance; ``factory`` may be a
    dotted path such as ``Class.build``) or a zoo entry name. Anything else is one SqueezerError
    line naming ``spec`` and what is wrong with it: the user typed it, a traceback helps nobody."""
    from . import zoo

    if ":" not in spec:
        if spec in zoo.ZOO:
            return zoo.ZOO[spec].build()
        raise SqueezerError(f"model {spec!r} is neither 'package.module:factory' nor a zoo model "
                            f"({', '.join(zoo.ZOO)})")
    mod_name, _, attr = spec.partition(":")
    if not mod_name or not attr or ":" in attr:
        raise SqueezerError(f"model {spec!r}: expected 'package.module:factory' with both parts given")
    obj = _resolve(spec, _import(spec, mod_name), mod_name, attr)
    if isinstance(obj, nn.Module):
        return obj.eval()
    if not callable(obj):
        raise SqueezerError(f"model {spec!r} names a {type(obj).__name__}, not an nn.Module or a factory "
                            "function returning one")
    _check_no_arguments(spec, obj)
    try:
        model = obj()
    except Exception as exc:  # noqa: BLE001 - the user's factory failed: its message, in one line
        raise SqueezerError(f"model {spec!r}: calling it raised {type(exc).__name__}: {_first_line(exc)}") from None
    if not isinstance(model, nn.Module):
        raise SqueezerError(f"model {spec!r} returned a {type(model).__name__}, not a torch.nn.Module")
    return model.eval()


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else "(no message)"


def _import(spec: str, mod_name: str):
    try:
        return importlib.import_module(mod_name)
    except ImportError as exc:
        raise SqueezerError(f"cannot import module {mod_name!r} of model {spec!r}: {exc}") from None
    except Exception as exc:  # noqa: BLE001 - importing ran the module's code and it failed
        raise SqueezerError(f"cannot import module {mod_name!r} of model {spec!r}: importing it raised "
                            f"{type(exc).__name__}: {_first_line(exc)}") from None


def _resolve(spec: str, module, mod_name: str, attr: str):
    obj = module
    for part in attr.split("."):
        if not part.isidentifier() or not hasattr(obj, part):
            raise SqueezerError(f"module {mod_name!r} has no attribute {attr!r} (model {spec!r})")
        obj = getattr(obj, part)
    return obj


def _check_no_arguments(spec: str, factory) -> None:
    """A factory is called with no arguments: one that needs some (``torch.nn:Linear``,
    ``math:sqrt``) is refused naming them, before it is called."""
    try:
        signature = inspect.signature(factory)
    except (TypeError, ValueError):  # some builtins have no signature: calling them tells
        return
    required = [p.name for p in signature.parameters.values()
                if p.default is p.empty and p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)]
    if required:
        what = "class" if isinstance(factory, type) else "function"
        raise SqueezerError(f"model {spec!r} is a {what} that needs arguments ({', '.join(required)}); "
                            "give a factory that takes none and returns an nn.Module")


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
