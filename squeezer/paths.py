"""Checks on the directories a command will write or read, made before any long work starts: a
compress that fine-tunes and builds for minutes must not fail at the end on its ``--out``, nor
write over a directory of the user's."""

from __future__ import annotations

import contextlib
import json
import os
from pathlib import Path
from typing import Iterator

from compiler.errors import OptionError

EXPORT_FILES = ("model.so", "weights.bin", "manifest.json", "report.json")   # what compress writes


def is_squeezer_export(directory: Path) -> bool:
    """A directory Squeezer exported before: its ``manifest.json`` is a JSON object whose
    ``format`` is ``squeezer-module/<version>`` (any version, so an old export can be replaced)."""
    try:
        manifest = json.loads((directory / "manifest.json").read_bytes().decode())
    except (OSError, ValueError):
        return False
    return isinstance(manifest, dict) and str(manifest.get("format", "")).startswith("squeezer-module/")


@contextlib.contextmanager
def out_dir(path: str | os.PathLike, *, force: bool, option: str = "--out") -> Iterator[Path]:
    """The directory ``compress`` exports into, checked and made before the long work starts.

    Accepted: a new or empty directory, or a previous Squeezer export (``is_squeezer_export``: its
    model.so, weights.bin, manifest.json and report.json are replaced, other files kept). Any other
    non-empty directory holds the user's files and is refused unless ``force`` (then those four
    names are written into it, nothing else touched). Directories made here are removed again,
    when still empty, if the command fails: a failed run leaves nothing behind."""
    p = Path(path).expanduser()
    if p.exists() and not p.is_dir():
        raise OptionError(f"{option} {p} is a file, not a directory")
    if p.is_dir() and not force and any(p.iterdir()) and not is_squeezer_export(p):
        clashing = [name for name in EXPORT_FILES if (p / name).exists()]
        what = f"its {', '.join(clashing)} would be overwritten" if clashing else "it holds other files"
        raise OptionError(f"{option} {p} is a non-empty directory that is not a Squeezer export ({what}); "
                          f"give a new or empty directory, or --force to write {', '.join(EXPORT_FILES)} into it")
    created = [d for d in (p, *p.parents) if not d.exists()]
    try:
        p.mkdir(parents=True, exist_ok=True)
        probe = p / f".squeezer-write-test.{os.getpid()}"
        probe.touch()
        probe.unlink()
    except OSError as exc:
        _remove_empty(created)
        raise OptionError(f"{option} {p}: cannot create or write it ({exc.strerror or exc})") from None
    try:
        yield p
    except BaseException:
        _remove_empty(created)
        raise


def _remove_empty(created: list[Path]) -> None:
    for d in created:   # innermost first
        try:
            d.rmdir()
        except OSError:
            return


def check_database_dir(path: str | os.PathLike, option: str = "--database") -> Path:
    """A tuning database to read (compress): it must exist as a directory; its records are checked
    in full when the build opens it."""
    p = Path(path).expanduser()
    if not p.exists():
        raise OptionError(f"{option} {p} does not exist (make it with `squeezer tune ... --database {p}`)")
    if not p.is_dir():
        raise OptionError(f"{option} {p} is a file; a tuning database is a directory")
    return p
