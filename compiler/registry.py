"""Name -> pass registry, and the ``name:key=value,...`` spec syntax of the CLI and recipe files."""

from __future__ import annotations

import dataclasses
import functools
import json
import typing
from importlib.metadata import entry_points
from pathlib import Path
from typing import Any

from .errors import OptionError
from .pass_infra import Pass

_REGISTRY: dict[str, type[Pass]] = {}


def register_pass(cls: type[Pass]) -> type[Pass]:
    """Class decorator: make ``cls`` reachable by its kebab-case ``name``."""
    name = cls.name
    if not name or name != name.lower() or " " in name or "_" in name:
        raise ValueError(f"pass name {name!r} of {cls.__name__} must be kebab-case")
    if name in _REGISTRY and _REGISTRY[name] is not cls:
        raise ValueError(f"pass name {name!r} already registered by {_REGISTRY[name].__name__}")
    _REGISTRY[name] = cls
    return cls


PASS_PLUGIN_GROUP = "squeezer.passes"


@functools.cache
def _load_pass_plugins() -> None:
    """Import the pass packages named in the ``squeezer.passes`` entry-point group (our own
    ``passes`` is one, see pyproject.toml); they register themselves on import. The core never
    imports a pass family by name: the passes depend on the core, never the other way."""
    for entry in entry_points(group=PASS_PLUGIN_GROUP):
        try:
            entry.load()
        except ImportError as exc:
            raise OptionError(f"pass plugin {entry.name!r} ({entry.value}) failed to import: {exc}") from None


def registered_passes() -> dict[str, type[Pass]]:
    _load_pass_plugins()
    return dict(sorted(_REGISTRY.items()))


def get_pass(name: str) -> type[Pass]:
    passes = registered_passes()
    if name not in passes:
        hint = "" if passes else (f" (the pass families register through the {PASS_PLUGIN_GROUP!r} entry-point "
                                  "group: install the project with `pip install -e .`, or import them)")
        raise OptionError(f"unknown pass {name!r}; registered passes: {sorted(passes) or 'none'}{hint}")
    return passes[name]


def _convert(cls: type[Pass], field: dataclasses.Field, raw: str) -> Any:
    hints = typing.get_type_hints(cls)
    hint = hints.get(field.name, str)
    origin = typing.get_origin(hint)
    args = [a for a in typing.get_args(hint) if a is not type(None)]
    if raw.lower() == "none" and type(None) in typing.get_args(hint):
        return None
    if origin in (typing.Union, getattr(__import__("types"), "UnionType", None)) and args:
        hint = args[0]
        origin = typing.get_origin(hint)
    try:
        if hint is bool:
            if raw.lower() in ("1", "true", "yes", "on"):
                return True
            if raw.lower() in ("0", "false", "no", "off"):
                return False
            raise ValueError(raw)
        if hint in (int, float, str):
            return hint(raw)
        if origin in (tuple, list):
            inner = typing.get_args(hint)[0] if typing.get_args(hint) else str
            items = [x for x in raw.strip("[]").split(";") if x]
            return tuple(inner(x) for x in items)
    except ValueError:
        raise OptionError(f"{cls.name}: option '{field.name}'={raw!r} is not a valid {getattr(hint, '__name__', hint)}") from None
    return raw


def parse_pass_spec(spec: str) -> Pass:
    """``"channel-pruning:ratio=0.5,round_to=8"`` -> ``ChannelPruning(ratio=0.5, round_to=8)``."""
    name, _, rest = spec.strip().partition(":")
    cls = get_pass(name.strip())
    fields = {f.name: f for f in dataclasses.fields(cls) if f.metadata.get("spec", True)}
    kwargs: dict[str, Any] = {}
    for item in filter(None, (s.strip() for s in rest.split(","))):
        key, eq, raw = item.partition("=")
        key = key.strip().replace("-", "_")
        if not eq:
            raise OptionError(f"{name}: option {item!r} must be written key=value")
        if key not in fields:
            raise OptionError(f"{name}: unknown option {key!r}; options: {sorted(fields)}")
        if key in kwargs:
            raise OptionError(f"{name}: option {key!r} is given twice in {spec.strip()!r}")
        kwargs[key] = _convert(cls, fields[key], raw.strip())
    missing = [f.name for f in dataclasses.fields(cls) if f.name not in kwargs
               and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING]
    if missing:
        raise OptionError(f"{name}: required option(s) {missing} not given (write {name}:{missing[0]}=...)")
    return cls(**kwargs)


def load_recipe(path: str | Path) -> list[Pass]:
    """A recipe is a JSON list of specs, or a text file with one spec per line (``#`` comments).
    Errors name the file and the line (or list position) at fault."""
    path = Path(path)
    try:
        text = path.read_bytes().decode("utf-8")
    except OSError as exc:
        raise OptionError(f"recipe {path}: cannot read it ({exc.strerror})") from None
    except UnicodeDecodeError as exc:  # a binary file given by mistake: say so, not a codec traceback
        raise OptionError(f"recipe {path}: not a text file (byte {exc.start} is not UTF-8); a recipe is one "
                          "'name:key=value' per line or a JSON list of them") from None
    if "\x00" in text:
        raise OptionError(f"recipe {path}: not a text file (it holds NUL bytes); a recipe is one "
                          "'name:key=value' per line or a JSON list of them")
    if text.lstrip().startswith("["):
        try:
            specs = json.loads(text)
        except json.JSONDecodeError as exc:
            raise OptionError(f"recipe {path}: invalid JSON at line {exc.lineno}: {exc.msg}") from None
        if not all(isinstance(s, str) for s in specs):
            raise OptionError(f"recipe {path}: a JSON recipe is a list of strings like \"name:key=value\"")
        numbered = [(f"item {i + 1}", s) for i, s in enumerate(specs)]
    else:
        numbered = [(f"line {i + 1}", ln.split("#", 1)[0].strip()) for i, ln in enumerate(text.splitlines())]
    if not any(spec for _, spec in numbered):
        raise OptionError(f"recipe {path}: it holds no pass spec (one 'name:key=value' per line, or a JSON list)")
    passes = []
    for where, spec in numbered:
        if not spec:
            continue
        try:
            passes.append(parse_pass_spec(spec))
        except OptionError as exc:
            raise OptionError(f"recipe {path}, {where}: {exc}") from None
    return passes
