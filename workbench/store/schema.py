"""The database schema: migrations applied in order, the version kept in ``meta``.

A migration is a function of an open ``sqlite3`` connection, run inside the
caller's ``BEGIN IMMEDIATE`` transaction. The list is append-only: a database
written by an older rome-workbench opens unchanged and is migrated forward; one
written by a newer one raises :class:`SchemaTooNewError` and is left as it was.
"""

from __future__ import annotations

import logging
import sqlite3
from collections.abc import Callable
from pathlib import Path

from .errors import CorruptDatabaseError, ForeignDatabaseError, SchemaTooNewError

log = logging.getLogger(__name__)


def _exec_script(conn: sqlite3.Connection, script: str) -> None:
    """Execute a multi-statement script inside the caller's open transaction
    (``executescript`` would COMMIT it first)."""
    buf = ""
    for line in script.splitlines(keepends=True):
        buf += line
        if sqlite3.complete_statement(buf):
            conn.execute(buf)
            buf = ""
    if buf.strip():
        conn.execute(buf)


def _m001_initial(conn: sqlite3.Connection) -> None:
    """Schema 1 (long: its SQL is the tables as first shipped; a migration never changes)."""
    _exec_script(
        conn,
        """
        CREATE TABLE IF NOT EXISTS meta (
            key TEXT PRIMARY KEY,
            value TEXT
        );
        CREATE TABLE runs (
            id TEXT PRIMARY KEY,
            kind TEXT NOT NULL,
            model TEXT NOT NULL,
            preset TEXT,
            mode TEXT,
            hparams TEXT,
            data_source TEXT,
            n_edits_planned INTEGER,
            glue_every INTEGER,
            glue_tasks TEXT,
            glue_limit INTEGER,
            guard INTEGER NOT NULL DEFAULT 0,
            status TEXT NOT NULL,
            created_at TEXT NOT NULL,
            updated_at TEXT NOT NULL,
            base_fingerprint TEXT,
            notes TEXT,
            error TEXT
        );
        CREATE INDEX runs_model ON runs(model);
        CREATE TABLE edits (
            id INTEGER PRIMARY KEY,
            run_id TEXT NOT NULL REFERENCES runs(id),
            seq INTEGER NOT NULL,
            case_id INTEGER,
            request TEXT NOT NULL,
            mode TEXT NOT NULL,
            layer INTEGER NOT NULL,
            weight_name TEXT NOT NULL,
            factors BLOB,
            update_norm REAL,
            update_norm_ratio REAL,
            denominator REAL,
            cos_kstar_ks REAL,
            record TEXT,
            metrics TEXT,
            timings TEXT,
            flagged INTEGER NOT NULL DEFAULT 0,
            flag_reason TEXT,
            refused INTEGER NOT NULL DEFAULT 0,
            applied INTEGER NOT NULL DEFAULT 1,
            fingerprint TEXT,
            created_at TEXT NOT NULL,
            UNIQUE (run_id, seq)
        );
        CREATE TABLE checkpoints (
            id INTEGER PRIMARY KEY,
            run_id TEXT NOT NULL REFERENCES runs(id),
            step INTEGER NOT NULL,
            task TEXT NOT NULL,
            accuracy REAL,
            f1 REAL,
            mcc REAL,
            invalid INTEGER,
            n INTEGER,
            created_at TEXT NOT NULL,
            UNIQUE (run_id, step, task)
        );
        CREATE TABLE generations (
            id INTEGER PRIMARY KEY,
            run_id TEXT NOT NULL REFERENCES runs(id),
            edit_seq INTEGER NOT NULL,
            prompt TEXT NOT NULL,
            before TEXT,
            after TEXT,
            created_at TEXT NOT NULL
        );
        CREATE INDEX generations_run ON generations(run_id, edit_seq);
        """,
    )


def _m002_fluency_and_rescore(conn: sqlite3.Connection) -> None:
    _exec_script(
        conn,
        """
        ALTER TABLE checkpoints ADD COLUMN value REAL;
        ALTER TABLE checkpoints ADD COLUMN extra TEXT;
        CREATE TABLE rescore (
            id INTEGER PRIMARY KEY,
            run_id TEXT NOT NULL REFERENCES runs(id),
            seq INTEGER NOT NULL,
            metrics TEXT NOT NULL,
            created_at TEXT NOT NULL,
            UNIQUE (run_id, seq)
        );
        CREATE INDEX edits_flagged ON edits(run_id, flagged);
        """,
    )


def _m003_steps(conn: sqlite3.Connection) -> None:
    """Steps: an edit row belongs to a step (one edit, or one batch of a batched method);
    a step's per-layer rank-k factors (and the keys a method's state is rebuilt from)
    live in ``step_factors``. Rows written before hold ``step`` NULL (their own seq),
    ``method`` NULL (rome) and their rank-one factors in ``edits.factors``, as before."""
    _exec_script(
        conn,
        """
        ALTER TABLE edits ADD COLUMN step INTEGER;
        ALTER TABLE edits ADD COLUMN method TEXT;
        CREATE TABLE step_factors (
            id INTEGER PRIMARY KEY,
            run_id TEXT NOT NULL REFERENCES runs(id),
            step INTEGER NOT NULL,
            layer INTEGER NOT NULL,
            weight_name TEXT NOT NULL,
            factors BLOB NOT NULL,
            update_norm REAL,
            created_at TEXT NOT NULL,
            UNIQUE (run_id, step, layer)
        );
        CREATE INDEX edits_step ON edits(run_id, step);
        """,
    )


# Applied in order; the schema version is the number applied. Append only:
# never edit or reorder a migration that has shipped.
MIGRATIONS: list[Callable[[sqlite3.Connection], None]] = [
    _m001_initial,
    _m002_fluency_and_rescore,
    _m003_steps,
]
SCHEMA_VERSION = len(MIGRATIONS)


def read_version(conn: sqlite3.Connection, tables: set[str], path: Path) -> int:
    """The schema version of the open database (0 for an empty file).

    Raises :class:`ForeignDatabaseError` for an SQLite file with tables but no
    ``meta``, :class:`SchemaTooNewError` for a version above :data:`SCHEMA_VERSION`.
    """
    if "meta" not in tables:
        if tables - {"sqlite_sequence"}:
            raise ForeignDatabaseError(str(path))
        return 0
    row = conn.execute("SELECT value FROM meta WHERE key = 'schema_version'").fetchone()
    try:
        version = int(row[0]) if row else 0
    except (TypeError, ValueError):
        raise CorruptDatabaseError(
            str(path), f"its schema version {row[0]!r} is not a number"
        ) from None
    if version > SCHEMA_VERSION:
        raise SchemaTooNewError(str(path), version, SCHEMA_VERSION)
    return version


def migrate(
    conn: sqlite3.Connection, path: Path, target: int = SCHEMA_VERSION, *, quiet: bool = False
) -> str | None:
    """Apply the missing migrations up to ``target`` in one write transaction; a
    database of an older schema gets one warning that says so, also returned (``quiet``:
    none, for a new file or a copy in memory)."""
    conn.execute("BEGIN IMMEDIATE")
    try:
        # Re-read inside the write lock: another process may have migrated.
        tables = {r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type='table'")}
        version = read_version(conn, tables, path)
        note = None
        if version and version < target and not quiet:
            note = (
                f"migrating {path} from schema {version} to {target} to write to it (an "
                "older rome-workbench cannot open it afterwards)"
            )
            log.warning("%s", note)
        for i in range(version, target):
            migration = MIGRATIONS[i]
            log.info("migrating %s to schema %d (%s)", path, i + 1, migration.__name__)
            migration(conn)
            conn.execute(
                "INSERT INTO meta(key, value) VALUES ('schema_version', ?) "
                "ON CONFLICT(key) DO UPDATE SET value = excluded.value",
                (str(i + 1),),
            )
        conn.execute("COMMIT")
    except BaseException:
        if conn.in_transaction:
            conn.execute("ROLLBACK")
        raise
    return note
