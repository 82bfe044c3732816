"""Merging workbench databases: the runs of several files (one per worker of a
comparison, say) into one, each run and each of its rows once.

A run is known by its id. A run already in the target, or in an earlier source,
with the same rows (every column of every table that belongs to a run, the row
ids aside) is left as it is: merging the same files again adds nothing. Two
copies of one run whose rows differ are refused, both files named, and nothing
is written. Every source is checked before the target is touched: a file that is
not a workbench database (or one newer than this code) is refused the same way.

Sources are opened read-only. A source of an older schema reads as it would after
its migrations (the columns added since are NULL, as the migrations leave them).
``runs`` picks some runs of the sources (by id or a prefix of one that names one run):
a run made by hand, say, adopted into a comparison's database for that run.
"""

from __future__ import annotations

import hashlib
import logging
import sqlite3
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .errors import StoreError
from .schema import SCHEMA_VERSION

log = logging.getLogger(__name__)


class MergeInputError(StoreError):
    """A merge refused before anything was written: a source that is not a workbench
    database, a target among the sources, or two different copies of one run."""


@dataclass
class MergeResult:
    """What a merge did: the runs it added and those already there (by id)."""

    target: Path
    added: list[str] = field(default_factory=list)
    already: list[str] = field(default_factory=list)
    rows: int = 0  # rows written, every table


@dataclass(frozen=True)
class _Copy:
    """One copy of a run: where it is, and the digest of its rows."""

    path: Path
    digest: str
    n_edits: int
    status: str


def _ro_connect(path: Path) -> sqlite3.Connection:
    uri = path.expanduser().absolute().as_uri() + "?mode=ro"
    return sqlite3.connect(uri, uri=True)


def _tables(conn: sqlite3.Connection) -> dict[str, list[tuple[str, str, int]]]:
    names = [r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'")]
    return {n: [(c[1], str(c[2]).upper(), int(c[5])) for c in _info(conn, n)] for n in names}


def _info(conn: sqlite3.Connection, table: str) -> list[Any]:
    return list(conn.execute(f'PRAGMA table_info("{table}")'))


def _layout() -> dict[str, list[str]]:
    """The tables that belong to a run (``runs`` first) and the columns a merge copies:
    this code's schema (an empty in-memory store), the row-id primary keys left out."""
    from .store import Store

    with Store.open(":memory:") as mem:
        tables = _tables(mem.db.conn)
    out: dict[str, list[str]] = {"runs": [c[0] for c in tables["runs"]]}
    for name in sorted(tables):
        cols = tables[name]
        if name == "runs" or not any(c[0] == "run_id" for c in cols):
            continue
        out[name] = [c[0] for c in cols if not (c[0] == "id" and c[1] == "INTEGER" and c[2])]
    return out


def _check_source(path: Path) -> None:
    """Refuse (one line) a file that is not a workbench database this code can read."""
    if not path.expanduser().is_file():
        raise MergeInputError(f"{path} is not a file; nothing was merged")
    try:
        conn = _ro_connect(path)
        try:
            tables = _tables(conn)
            row = (
                conn.execute("SELECT value FROM meta WHERE key = 'schema_version'").fetchone()
                if "meta" in tables
                else None
            )
        finally:
            conn.close()
    except sqlite3.Error as exc:
        raise MergeInputError(
            f"{path} is not a workbench database ({exc}); nothing was merged"
        ) from None
    if row is None or "runs" not in tables:
        raise MergeInputError(f"{path} is not a workbench database; nothing was merged")
    try:
        version = int(row[0])
    except (TypeError, ValueError):
        raise MergeInputError(
            f"{path} has no readable schema version; nothing was merged"
        ) from None
    if version > SCHEMA_VERSION:
        raise MergeInputError(
            f"{path} has schema version {version}, newer than this rome-workbench "
            f"({SCHEMA_VERSION}); upgrade it to merge; nothing was merged"
        )


def _select(conn: sqlite3.Connection, table: str, cols: list[str], run_id: str) -> Iterator[Any]:
    """The run's rows of ``table`` as tuples of ``cols`` (a column the file lacks: NULL),
    in one order whatever the file (every column, row ids aside)."""
    have = {c[1] for c in _info(conn, table)}
    exprs = ", ".join(f'"{c}"' if c in have else "NULL" for c in cols)
    key = "id" if table == "runs" else "run_id"
    order = ", ".join(f'"{c}"' for c in cols if c in have)
    yield from conn.execute(
        f'SELECT {exprs} FROM "{table}" WHERE "{key}" = ? ORDER BY {order}', (run_id,)
    )


def _digest(conn: sqlite3.Connection, layout: dict[str, list[str]], run_id: str) -> str:
    present = set(_tables(conn))
    h = hashlib.sha256()
    for table, cols in layout.items():
        if table not in present:
            continue
        h.update(f"\x00{table}\x00".encode())
        for row in _select(conn, table, cols, run_id):
            for value in row:
                h.update(type(value).__name__.encode() + b"=")
                h.update(value if isinstance(value, bytes) else repr(value).encode())
                h.update(b"\x1f")
    return h.hexdigest()


def _copies(path: Path, layout: dict[str, list[str]]) -> dict[str, _Copy]:
    """Every run of the database at ``path``, as a :class:`_Copy` by id."""
    conn = _ro_connect(path)
    try:
        out: dict[str, _Copy] = {}
        for rid, status in list(conn.execute("SELECT id, status FROM runs ORDER BY id")):
            n = conn.execute("SELECT COUNT(*) FROM edits WHERE run_id = ?", (rid,)).fetchone()
            out[rid] = _Copy(path, _digest(conn, layout, rid), int(n[0]), str(status))
        return out
    finally:
        conn.close()


def _differs(run_id: str, a: _Copy, b: _Copy) -> MergeInputError:
    what = (
        f"{a.n_edits} edits ({a.status}) against {b.n_edits} ({b.status})"
        if (a.n_edits, a.status) != (b.n_edits, b.status)
        else "the same number of edits, different rows"
    )
    return MergeInputError(
        f"run {run_id} has two different copies, in {a.path} and in {b.path} ({what}); "
        "keep one of them (or merge into another file); nothing was merged"
    )


def _picked(found: Sequence[str], runs: Sequence[str]) -> set[str]:
    """The run ids that ``runs`` (ids or prefixes) name among ``found``."""
    picked = set()
    for want in runs:
        hits = sorted({rid for rid in found if rid.startswith(want)})
        if len(hits) != 1:
            what = "no run" if not hits else f"{len(hits)} runs ({', '.join(hits)})"
            raise MergeInputError(f"--run {want}: {what} in the sources; nothing was merged")
        picked.add(hits[0])
    return picked


def plan_merge(
    sources: Sequence[Path], target: Path, runs: Sequence[str] | None = None
) -> tuple[dict[str, _Copy], list[str]]:
    """Check everything before a write: the runs to add (the first copy of each, by id;
    only those ``runs`` names, when given) and those the target already holds. Raises
    :class:`MergeInputError`."""
    if not sources:
        raise MergeInputError("give at least one database to merge")
    tgt = target.expanduser().absolute()
    if tgt.is_dir():
        raise MergeInputError(f"{target} is a folder; give the merged database's file name")
    for src in sources:
        if src.expanduser().absolute() == tgt:
            raise MergeInputError(f"{src} is both a source and the target; nothing was merged")
        _check_source(src)
    layout = _layout()
    have: dict[str, _Copy] = {}
    if target.exists():
        _check_source(target)
        have = _copies(target, layout)
    adding: dict[str, _Copy] = {}
    already: set[str] = set()
    found = [_copies(src, layout) for src in sources]
    picked = _picked([rid for f in found for rid in f], runs) if runs else None
    for copies in found:
        for rid, copy in copies.items():
            if picked is not None and rid not in picked:
                continue
            first = have.get(rid) or adding.get(rid)
            if first is None:
                adding[rid] = copy
            elif first.digest != copy.digest:
                raise _differs(rid, first, copy)
            elif rid in have:
                already.add(rid)
    return adding, sorted(already)


def merge_databases(
    sources: Sequence[Path], target: Path, runs: Sequence[str] | None = None
) -> MergeResult:
    """Merge the runs of ``sources`` (those ``runs`` names, when given) into ``target``
    (created where there is none), in one transaction; see the module's rules."""
    from .store import Store

    adding, already = plan_merge(sources, target, runs)
    result = MergeResult(target, already=already)
    Store.open(target).close()  # created and migrated to this code's schema
    layout = _layout()
    conn = sqlite3.connect(str(target), timeout=30.0)
    try:
        conn.execute("BEGIN IMMEDIATE")
        try:
            for rid, copy in adding.items():
                result.rows += _copy_run(conn, copy.path, layout, rid)
                result.added.append(rid)
            conn.execute("COMMIT")
        except BaseException:
            conn.execute("ROLLBACK")
            raise
    finally:
        conn.close()
    log.info("merged %d run(s) into %s (%d already there)", len(result.added), target, len(already))
    return result


def _copy_run(
    conn: sqlite3.Connection, source: Path, layout: dict[str, list[str]], rid: str
) -> int:
    src = _ro_connect(source)
    n = 0
    try:
        present = set(_tables(src))
        for table, cols in layout.items():
            if table not in present:
                continue
            names = ", ".join(f'"{c}"' for c in cols)
            marks = ", ".join("?" for _ in cols)
            insert = f'INSERT INTO "{table}" ({names}) VALUES ({marks})'
            for row in _select(src, table, cols, rid):
                conn.execute(insert, row)
                n += 1
    finally:
        src.close()
    return n
