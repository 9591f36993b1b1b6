"""Tuning databases: MetaSchedule's JSON records in a directory, opened for reading by ``build``
and for appending by ``tune``.

MetaSchedule's JSONDatabase keeps two append-only files: ``database_workload.json`` (one workload a
line) and ``database_tuning_record.json`` (one record a line, naming its workload by line index).
Two writers would each number their new workloads from the same count and interleave their lines,
so records end up pointing at the wrong workloads: ``tune`` holds ``lock_database`` (an
inter-process lock file in the directory) for its whole run, and a second tuner is refused at once.
A line is appended with a write of the line and a separate write of its newline, so a run killed
in between leaves a complete line without its newline, and one killed mid-write a torn last line:
the writer repairs both under the lock before appending (``repair``), never dropping a complete
record, and renames the repaired file into place so a reader never sees half of it."""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
from pathlib import Path
from typing import Any, Iterator

from compiler.errors import BuildError

WORKLOADS, RECORDS = "database_workload.json", "database_tuning_record.json"
LOCK = ".tune.lock"   # flock'ed by the running tune; holds its pid (the lock itself dies with the process)


def open_database(database, *, create: bool = False):
    """A MetaSchedule database from a directory path (JSON records) or a Database object.

    ``create`` (tuning, the writer, which holds ``lock_database``): make the directory if missing and
    repair what a killed run left (``repair``). Otherwise (build, a reader) the files must exist and
    be whole. Any other damage is a BuildError naming the file and line."""
    if database is None:
        return None
    from tvm.s_tir import meta_schedule as ms

    if isinstance(database, ms.database.Database):
        return database
    path = Path(database)
    if path.exists() and not path.is_dir():
        raise BuildError(f"tuning database {path} is a file; give a directory")
    wl, rec = path / WORKLOADS, path / RECORDS
    if create:
        path.mkdir(parents=True, exist_ok=True)
    elif not wl.exists() or not rec.exists():
        raise BuildError(f"tuning database {path} has no {wl.name}/{rec.name}; run codegen tuning first")
    n_workloads = len(_checked_lines(wl, repair=create)) if wl.exists() else 0
    if rec.exists():
        _check_workload_indices(rec, _checked_lines(rec, repair=create), n_workloads)
    try:
        return ms.database.JSONDatabase(path_workload=str(wl), path_tuning_record=str(rec), allow_missing=create)
    except Exception as exc:  # noqa: BLE001
        raise BuildError(f"tuning database {path} is corrupt or unreadable ({type(exc).__name__}: {exc}); "
                         "move it aside to start over") from exc


@contextlib.contextmanager
def lock_database(database: str | os.PathLike) -> Iterator[Path]:
    """Hold the database directory for one tuning run, or fail at once naming the holder: two
    tuners on one directory corrupt it (their workload indices collide), and waiting for a run that
    may last hours would look like a hang. The lock is an flock, released by the OS when its
    process dies however it dies, so a killed run never leaves the directory locked."""
    from filelock import FileLock, Timeout

    path = Path(database)
    if path.exists() and not path.is_dir():
        raise BuildError(f"tuning database {path} is a file; give a directory")
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise BuildError(f"tuning database {path} cannot be created ({exc.strerror or exc})") from None
    lock = FileLock(str(path / LOCK), timeout=0)
    try:
        lock.acquire()
    except Timeout:
        raise BuildError(f"tuning database {path} is in use by another tune (pid {_holder(path)}); "
                         "wait for it to finish or give another database directory") from None
    try:
        (path / LOCK).write_text(f"{os.getpid()}\n")
        yield path
    finally:
        lock.release()


def _holder(path: Path) -> str:
    try:
        return (path / LOCK).read_text().strip() or "unknown"
    except OSError:
        return "unknown"


def _checked_lines(f: Path, *, repair: bool) -> list[Any]:
    """The JSON values of ``f``, one a line. With ``repair`` (the writer, under the lock): a last
    line cut short by a killed append is dropped, but any complete value before the cut is kept;
    complete values glued onto one line (a newline lost before the next append) are split; a
    missing final newline is added, so the next append starts a line of its own. Anything else
    (damage in the middle, not explained by an interrupted append) is a BuildError."""
    text = f.read_text()
    lines = text.split("\n")
    values: list[Any] = []
    raw: list[str] = []
    changed = bool(text) and not text.endswith("\n")
    for i, line in enumerate(lines, 1):
        found, rest = _values_of(line)
        if rest and not (repair and i == len(lines)):   # only an append killed mid-write tears the end
            raise BuildError(f"tuning database file {f} is corrupt at line {i}: {_reason(rest)}; "
                             "move the directory aside to start over")
        if len(found) > 1 and not repair:
            raise BuildError(f"tuning database file {f} has {len(found)} records on line {i} (a newline lost "
                             "by a killed tune); the next `tune` on it repairs that")
        changed |= len(found) > 1 or bool(rest)
        values.extend(v for v, _ in found)
        raw.extend(r for _, r in found)
    if repair and changed:   # each complete value kept byte for byte, one a line
        _replace(f, "".join(r + "\n" for r in raw))
    return values


def _values_of(line: str) -> tuple[list[tuple[Any, str]], str]:
    """The complete JSON values at the start of ``line``, each with its text, and what is left
    after them (empty when the whole line parsed)."""
    decoder, values, pos = json.JSONDecoder(), [], 0
    while True:
        while pos < len(line) and line[pos].isspace():
            pos += 1
        if pos == len(line):
            return values, ""
        try:
            value, end = decoder.raw_decode(line, pos)
        except json.JSONDecodeError:
            return values, line[pos:]
        if not isinstance(value, list):   # every line of both files is a JSON array
            return values, line[pos:]
        values.append((value, line[pos:end]))
        pos = end


def _reason(rest: str) -> str:
    try:
        value = json.loads(rest)
    except json.JSONDecodeError as exc:
        return exc.msg
    return "extra data" if isinstance(value, list) else "not a JSON array"


def _check_workload_indices(f: Path, records: list[Any], n_workloads: int) -> None:
    """Every record names its workload by line index: one out of range (a second writer's, or an
    edit) is reported here rather than crashing MetaSchedule's loader."""
    for i, record in enumerate(records, 1):
        index = record[0] if isinstance(record, list) and record else None
        if not isinstance(index, int) or isinstance(index, bool) or not 0 <= index < n_workloads:
            raise BuildError(f"tuning database file {f} is corrupt at record {i}: it refers to workload "
                             f"{index!r} but the database has {n_workloads}; move the directory aside "
                             "to start over")


def _replace(f: Path, text: str) -> None:
    """Write ``f`` whole beside itself and rename it into place: a crash leaves the old file or the
    new one, and a reader never sees a half-written one."""
    fd, tmp = tempfile.mkstemp(prefix=f".{f.name}.", dir=f.parent)
    try:
        with os.fdopen(fd, "w") as out:
            out.write(text)
            out.flush()
            os.fsync(out.fileno())
        os.replace(tmp, f)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
