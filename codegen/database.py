"""Tuning databases: MetaSchedule's JSON records in a directory, opened for reading by ``build``
and for appending by ``tune``."""

from __future__ import annotations

import json
from pathlib import Path

from compiler.errors import BuildError


def open_database(database, *, create: bool = False):
    """A MetaSchedule database from a directory path (JSON records) or a Database object.

    ``create`` (tuning, the writer): make the directory if missing and drop a torn last line left by
    a run killed mid-append. Otherwise (build, a reader) the files must exist and be whole. Any
    other damage is a BuildError naming the file and line."""
    if database is None:
        return None
    from tvm.s_tir import meta_schedule as ms

    if isinstance(database, ms.database.Database):
        return database
    path = Path(database)
    if path.exists() and not path.is_dir():
        raise BuildError(f"tuning database {path} is a file; give a directory")
    wl, rec = path / "database_workload.json", path / "database_tuning_record.json"
    if create:
        path.mkdir(parents=True, exist_ok=True)
    elif not wl.exists() or not rec.exists():
        raise BuildError(f"tuning database {path} has no {wl.name}/{rec.name}; run codegen tuning first")
    for f in (wl, rec):
        if f.exists():
            _check_json_lines(f, repair_torn_tail=create)
    try:
        return ms.database.JSONDatabase(path_workload=str(wl), path_tuning_record=str(rec), allow_missing=create)
    except Exception as exc:  # noqa: BLE001
        raise BuildError(f"tuning database {path} is corrupt or unreadable ({type(exc).__name__}: {exc}); "
                         "move it aside to start over") from exc


def _check_json_lines(f: Path, *, repair_torn_tail: bool) -> None:
    """Each line of a MetaSchedule JSON database is one JSON value. A truncated last line (a run
    killed mid-write) is dropped when ``repair_torn_tail``; other damage is reported by line."""
    lines = f.read_text().splitlines()
    good = []
    for i, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            json.loads(line)
            good.append(line)
        except json.JSONDecodeError as exc:
            if repair_torn_tail and i == len(lines):  # interrupted while appending: keep what was complete
                f.write_text("\n".join(good) + ("\n" if good else ""))
                return
            raise BuildError(f"tuning database file {f} is corrupt at line {i}: {exc.msg}; "
                             "move the directory aside to start over") from None
