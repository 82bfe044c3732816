"""The workbench's SQLite store: runs, edits (with their rank-one factors),
GLUE/fluency checkpoints, generations and end-of-run re-scoring.

Built on ``sqlite-utils`` over one ``sqlite3`` connection in WAL mode with a
busy timeout. Every write is its own ``BEGIN IMMEDIATE`` transaction, committed
before the method returns, so an interrupted replay keeps every finished edit.

One writer per run: :meth:`Store.acquire_writer` takes an exclusive ``flock``
on ``<db>.<run_id>.lock``. The kernel drops the lock when the holder dies
(SIGKILL included), so a resume after a crash just takes it over. Writes to a
run whose lock is held by someone else raise :class:`RunLockedError`.

Schema changes go through :data:`MIGRATIONS` (applied in order, the version
kept in ``meta``); a database newer than this code raises
:class:`SchemaTooNewError`.

Typical replay use::

    with Store.open() as store:
        run = store.create_run(model="smollm2-135m", mode="rrome", kind="replay")
        with store.acquire_writer(run.id):
            store.add_edit(run.id, 0, request=req, mode="rrome", layer=5,
                           weight_name="model.layers.5.mlp.down_proj.weight", u=u, v=v)
            store.set_status(run.id, "finished")
"""

from __future__ import annotations

import contextlib
import csv
import dataclasses
import inspect
import io
import json
import logging
import math
import os
import re
import socket
import sqlite3
import tempfile
import threading
import time
import uuid
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import sqlite_utils

try:  # POSIX only; the writer lock needs flock.
    import fcntl
except ImportError:  # pragma: no cover - not exercised on Linux
    fcntl = None  # type: ignore[assignment]

if TYPE_CHECKING:
    import torch

log = logging.getLogger(__name__)

APP_NAME = "rome-workbench"
DB_ENV_VAR = "ROME_WORKBENCH_DB"
DEFAULT_BUSY_TIMEOUT_S = 10.0

RUN_KINDS = ("replay", "session")
RUN_STATUSES = ("running", "finished", "cancelled", "failed", "interrupted")
FLUENCY_TASK = "fluency"

RunKind = Literal["replay", "session"]
RunStatus = Literal["running", "finished", "cancelled", "failed", "interrupted"]

_RUN_ID_RE = re.compile(r"^[A-Za-z0-9_-]{1,64}$")
# Top-level keys of an engine record that hold the factors themselves; they
# live in the safetensors blob, not in the JSON record.
_FACTOR_KEYS = frozenset({"u", "v", "factors"})


# --------------------------------------------------------------------------- errors


class StoreError(Exception):
    """Base class of every error the store raises. Messages are one line."""


class StoreClosedError(StoreError):
    def __init__(self, path: str) -> None:
        super().__init__(f"the store {path} is closed; open it again with Store.open()")
        self.path = path


class StoreNotFoundError(StoreError):
    def __init__(self, path: str) -> None:
        super().__init__(
            f"no workbench database at {path}; check the path or ${DB_ENV_VAR}, "
            "or open it with create=True"
        )
        self.path = path


class DatabaseLockedError(StoreError):
    def __init__(self, path: str, timeout_s: float) -> None:
        super().__init__(
            f"database {path} stayed locked by another connection for more than "
            f"{timeout_s:g} s; wait for the other process to finish its write and retry, "
            "or open the store with a longer busy_timeout"
        )
        self.path = path


class CorruptDatabaseError(StoreError):
    def __init__(self, path: str, detail: str) -> None:
        super().__init__(
            f"{path} is not a readable SQLite database ({detail}); move it aside "
            f"or point ${DB_ENV_VAR} at another file"
        )
        self.path = path


class ForeignDatabaseError(StoreError):
    def __init__(self, path: str) -> None:
        super().__init__(
            f"{path} is an SQLite database but not a rome-workbench one (no meta table); "
            f"point ${DB_ENV_VAR} at another file"
        )
        self.path = path


class SchemaTooNewError(StoreError):
    def __init__(self, path: str, found: int, known: int) -> None:
        super().__init__(
            f"{path} has schema version {found} but this rome-workbench knows only up to "
            f"{known}; upgrade rome-workbench to open it"
        )
        self.found = found
        self.known = known


class UnknownRunError(StoreError, KeyError):
    def __init__(self, run_id: str, path: str = "") -> None:
        where = f" in {path}" if path else ""
        StoreError.__init__(
            self, f"no run with id {run_id!r}{where}; list the runs to see the valid ids"
        )
        self.run_id = run_id

    def __str__(self) -> str:  # KeyError would otherwise quote the message
        return str(self.args[0])


class AmbiguousRunError(StoreError):
    def __init__(self, prefix: str, matches: Sequence[str]) -> None:
        shown = ", ".join(matches[:5])
        super().__init__(
            f"run id prefix {prefix!r} matches {len(matches)} runs ({shown}); give more characters"
        )
        self.prefix = prefix
        self.matches = list(matches)


class UnknownEditError(StoreError, KeyError):
    def __init__(self, run_id: str, seq: int) -> None:
        StoreError.__init__(
            self, f"run {run_id!r} has no edit with seq {seq}; list the run's edits to see them"
        )
        self.run_id = run_id
        self.seq = seq

    def __str__(self) -> str:
        return str(self.args[0])


class DuplicateEditError(StoreError):
    def __init__(self, run_id: str, seq: int, next_seq: int) -> None:
        super().__init__(
            f"run {run_id!r} already has an edit with seq {seq}; nothing was written "
            f"(the next free seq is {next_seq})"
        )
        self.run_id = run_id
        self.seq = seq
        self.next_seq = next_seq


class DuplicateCheckpointError(StoreError):
    def __init__(self, run_id: str, step: int, task: str) -> None:
        super().__init__(
            f"run {run_id!r} already has a {task!r} checkpoint at step {step}; "
            "pass replace=True to overwrite it"
        )


class MissingFactorsError(StoreError):
    def __init__(self, run_id: str, seq: int) -> None:
        super().__init__(
            f"edit {seq} of run {run_id!r} was stored without its factors, so the "
            "weights cannot be rebuilt from the store; start a new run"
        )


class RunLockedError(StoreError):
    def __init__(self, run_id: str, holder: WriterInfo | None) -> None:
        if holder is None or holder.pid is None:
            who = "another process"
        else:
            who = f"pid {holder.pid}" + (f" on {holder.host}" if holder.host else "")
            if holder.pid == os.getpid() and holder.host == socket.gethostname():
                who += " (this process, through another Store or lease)"
            elif holder.alive is False:
                who += " (not alive: a process it forked may still hold the lock)"
        super().__init__(
            f"run {run_id!r} is being written by {who}; stop that process or wait for it "
            "to finish (a lock left by a dead process is taken over automatically)"
        )
        self.run_id = run_id
        self.holder = holder
        self.pid = holder.pid if holder else None


class InvalidFieldError(StoreError, ValueError):
    """A value the store refuses (unknown status or kind, bad run id, ...)."""


# --------------------------------------------------------------------------- records


@dataclass(frozen=True)
class Run:
    id: str
    kind: str
    model: str
    preset: str | None
    mode: str | None
    hparams: dict[str, Any]
    data_source: str | None
    n_edits_planned: int | None
    glue_every: int | None
    glue_tasks: list[str]
    glue_limit: int | None
    guard: bool
    status: str
    created_at: str
    updated_at: str
    base_fingerprint: str | None
    notes: str | None
    error: str | None
    n_edits: int = 0
    n_flagged: int = 0

    @property
    def label(self) -> str:
        """Short label for legends and lists: ``"<id> <mode>"``."""
        return f"{self.id} {self.mode}" if self.mode else self.id


@dataclass(frozen=True)
class Edit:
    id: int
    run_id: str
    seq: int
    case_id: int | None
    request: dict[str, Any]
    mode: str
    layer: int
    weight_name: str
    update_norm: float | None
    update_norm_ratio: float | None
    denominator: float | None
    cos_kstar_ks: float | None
    record: dict[str, Any]
    metrics: dict[str, Any]
    timings: dict[str, Any]
    flagged: bool
    flag_reason: str | None
    refused: bool
    applied: bool
    fingerprint: str | None
    created_at: str
    has_factors: bool


@dataclass(frozen=True)
class Checkpoint:
    run_id: str
    step: int
    task: str
    accuracy: float | None
    f1: float | None
    mcc: float | None
    invalid: int | None
    n: int | None
    value: float | None
    extra: dict[str, Any]
    created_at: str


@dataclass(frozen=True)
class Generation:
    id: int
    run_id: str
    edit_seq: int
    prompt: str
    before: str | None
    after: str | None
    created_at: str


@dataclass(frozen=True)
class Rescore:
    run_id: str
    seq: int
    metrics: dict[str, Any]
    created_at: str


@dataclass(frozen=True)
class WriterInfo:
    """Who holds (or last held) a run's writer lock, as written in the lock file."""

    pid: int | None
    host: str | None
    since: str | None
    alive: bool | None = None


# --------------------------------------------------------------------------- helpers


def default_db_path() -> Path:
    """``$ROME_WORKBENCH_DB`` if set, else ``<user data dir>/rome-workbench/workbench.db``."""
    env = os.environ.get(DB_ENV_VAR)
    if env:
        return Path(env).expanduser()
    import platformdirs

    return Path(platformdirs.user_data_dir(APP_NAME)) / "workbench.db"


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="milliseconds")


def _jsonable(obj: Any) -> Any:
    """Convert dataclasses, numpy/torch scalars, paths, tuples to plain JSON values."""
    if obj is None or isinstance(obj, (str, bool, int, float)):
        return obj
    if isinstance(obj, Mapping):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple, set, frozenset)):
        return [_jsonable(v) for v in obj]
    if hasattr(obj, "to_dict") and callable(obj.to_dict):
        # rome's EditResult.to_dict(factors=False) skips the factor lists.
        try:
            takes_factors = "factors" in inspect.signature(obj.to_dict).parameters
        except (TypeError, ValueError):
            takes_factors = False
        return _jsonable(obj.to_dict(factors=False) if takes_factors else obj.to_dict())
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return _jsonable(dataclasses.asdict(obj))
    if isinstance(obj, Path):
        return str(obj)
    if hasattr(obj, "tolist") and hasattr(obj, "ndim"):  # numpy arrays / torch tensors
        if obj.ndim == 0:
            return obj.item()
        n = obj.numel() if hasattr(obj, "numel") else int(obj.size)
        if n > 64:
            raise InvalidFieldError(
                f"refusing to store a {tuple(obj.shape)} array as JSON; "
                "pass factors as u= and v=, and summarise other arrays"
            )
        return obj.tolist()
    if hasattr(obj, "item"):  # numpy scalar
        return obj.item()
    raise InvalidFieldError(f"cannot store a {type(obj).__name__} as JSON")


def _dumps(obj: Any) -> str | None:
    if obj is None:
        return None
    return json.dumps(_jsonable(obj))


def _loads(text: str | None, default: Any) -> Any:
    if text is None:
        return default
    return json.loads(text)


def _opt_float(x: Any) -> float | None:
    return None if x is None else float(x)


def _opt_int(x: Any) -> int | None:
    return None if x is None else int(x)


def _check_run_id(run_id: str) -> str:
    if not isinstance(run_id, str) or not _RUN_ID_RE.match(run_id):
        raise InvalidFieldError(f"invalid run id {run_id!r}: use 1-64 letters, digits, '-' or '_'")
    return run_id


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _translate(exc: sqlite3.Error, path: str, timeout_s: float) -> StoreError:
    msg = str(exc)
    low = msg.lower()
    if isinstance(exc, sqlite3.ProgrammingError) and "closed" in low:
        return StoreClosedError(path)
    if "locked" in low or "busy" in low:
        return DatabaseLockedError(path, timeout_s)
    if "not a database" in low or "malformed" in low or "disk image" in low:
        return CorruptDatabaseError(path, msg)
    if "readonly" in low or "read-only" in low:
        return StoreError(f"cannot write to {path} ({msg}); check the file's permissions")
    if "disk is full" in low or "disk i/o" in low:
        return StoreError(f"cannot write to {path} ({msg}); free disk space and retry")
    return StoreError(f"SQLite error on {path}: {msg}")


# --------------------------------------------------------------------------- schema


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


# Applied in order; the schema version is the number applied. Append only:
# never edit or reorder a migration that has shipped.
MIGRATIONS: list[Callable[[sqlite3.Connection], None]] = [
    _m001_initial,
    _m002_fluency_and_rescore,
]
SCHEMA_VERSION = len(MIGRATIONS)


# --------------------------------------------------------------------------- writer lock


class WriterLease:
    """An exclusive writer lock on one run; a context manager. Release it with
    :meth:`release` or by leaving the ``with`` block. Idempotent."""

    def __init__(self, store: Store, run_id: str, path: Path, fd: int) -> None:
        self.store = store
        self.run_id = run_id
        self.path = path
        self._fd: int | None = fd

    @property
    def held(self) -> bool:
        return self._fd is not None

    def release(self) -> None:
        fd, self._fd = self._fd, None
        if fd is None:
            return
        try:
            # Unlink while still holding the lock: a waiter that opened the old
            # inode notices (inode check in _try_lock) and retries on a new file.
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.path)
        finally:
            os.close(fd)
            self.store._leases.pop(self.run_id, None)
            log.debug("released writer lock on run %s", self.run_id)

    def __enter__(self) -> WriterLease:
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()

    def __repr__(self) -> str:
        return f"<WriterLease run={self.run_id} held={self.held}>"


def _read_lock_file(path: Path) -> WriterInfo | None:
    try:
        text = path.read_text()
    except OSError:
        return None
    try:
        data = json.loads(text)
    except ValueError:
        return WriterInfo(None, None, None)
    pid = data.get("pid")
    host = data.get("host")
    alive = _pid_alive(pid) if isinstance(pid, int) and host == socket.gethostname() else None
    return WriterInfo(pid, host, data.get("since"), alive)


# --------------------------------------------------------------------------- the store


class Store:
    """The workbench database. Open with :meth:`open`; use as a context manager.

    Thread-safe: one connection guarded by a re-entrant lock, so Textual
    thread workers may share a Store.
    """

    def __init__(
        self, path: str | Path, *, busy_timeout: float = DEFAULT_BUSY_TIMEOUT_S, create: bool = True
    ) -> None:
        self._memory = str(path) == ":memory:"
        self.path = Path(path) if not self._memory else Path(":memory:")
        self.busy_timeout = float(busy_timeout)
        self._mutex = threading.RLock()
        self._closed = True
        self._leases: dict[str, WriterLease] = {}
        self._lock_dir_tmp: tempfile.TemporaryDirectory[str] | None = None
        if fcntl is None:  # pragma: no cover
            raise StoreError("the workbench store needs a POSIX system (fcntl.flock)")
        if not self._memory:
            if not self.path.exists():
                if not create:
                    raise StoreNotFoundError(str(self.path))
                self.path.parent.mkdir(parents=True, exist_ok=True)
        else:
            self._lock_dir_tmp = tempfile.TemporaryDirectory(prefix="rome-wb-locks-")
        try:
            conn = sqlite3.connect(
                str(self.path), timeout=self.busy_timeout, check_same_thread=False
            )
        except sqlite3.Error as exc:
            raise _translate(exc, str(self.path), self.busy_timeout) from exc
        self._conn = conn
        self._db = sqlite_utils.Database(conn, execute_plugins=False)
        self._closed = False
        try:
            self._setup()
        except BaseException:
            self.close()
            raise

    # -- opening / closing -------------------------------------------------------

    @classmethod
    def open(
        cls,
        path: str | Path | None = None,
        *,
        busy_timeout: float = DEFAULT_BUSY_TIMEOUT_S,
        create: bool = True,
    ) -> Store:
        """Open (creating and migrating as needed) the database at ``path``
        (default: :func:`default_db_path`)."""
        return cls(
            default_db_path() if path is None else path, busy_timeout=busy_timeout, create=create
        )

    def close(self) -> None:
        """Release this store's writer leases and close the connection. Idempotent."""
        with self._mutex:
            for lease in list(self._leases.values()):
                lease.release()
            if not self._closed:
                self._closed = True
                self._conn.close()
            if self._lock_dir_tmp is not None:
                self._lock_dir_tmp.cleanup()
                self._lock_dir_tmp = None

    @property
    def closed(self) -> bool:
        return self._closed

    def __enter__(self) -> Store:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"<Store {self.path} v{SCHEMA_VERSION}{' closed' if self._closed else ''}>"

    @property
    def db(self) -> sqlite_utils.Database:
        """The underlying sqlite-utils Database (read-only use, please)."""
        self._check_open()
        return self._db

    def _check_open(self) -> None:
        if self._closed:
            raise StoreClosedError(str(self.path))

    @contextlib.contextmanager
    def _op(self) -> Iterator[sqlite_utils.Database]:
        """Serialise access and translate sqlite errors into StoreErrors."""
        with self._mutex:
            self._check_open()
            try:
                yield self._db
            except sqlite3.Error as exc:
                raise _translate(exc, str(self.path), self.busy_timeout) from exc

    @contextlib.contextmanager
    def _write(self) -> Iterator[sqlite_utils.Database]:
        """One committed write transaction (BEGIN IMMEDIATE takes the write lock up
        front, so WAL readers never need to upgrade mid-transaction)."""
        with self._op() as db:
            conn = self._conn
            conn.execute("BEGIN IMMEDIATE")
            try:
                yield db
            except BaseException:
                if conn.in_transaction:
                    conn.execute("ROLLBACK")
                raise
            else:
                conn.execute("COMMIT")

    def _setup(self) -> None:
        with self._op() as db:
            conn = self._conn
            conn.execute(f"PRAGMA busy_timeout = {int(self.busy_timeout * 1000)}")
            # Reading the schema is what detects a file that is not a database.
            tables = set(db.table_names())
            # Check before touching the file: a foreign or too-new database is
            # left exactly as it was.
            version = self._read_version(tables)
            if not self._memory:
                db.enable_wal()
            conn.execute("PRAGMA synchronous = FULL")
            conn.execute("PRAGMA foreign_keys = ON")
            if version < SCHEMA_VERSION:
                self._migrate()

    def _read_version(self, tables: set[str]) -> int:
        if "meta" not in tables:
            if tables - {"sqlite_sequence"}:
                raise ForeignDatabaseError(str(self.path))
            return 0
        row = self._conn.execute("SELECT value FROM meta WHERE key = 'schema_version'").fetchone()
        version = int(row[0]) if row else 0
        if version > SCHEMA_VERSION:
            raise SchemaTooNewError(str(self.path), version, SCHEMA_VERSION)
        return version

    def _migrate(self, target: int = SCHEMA_VERSION) -> None:
        conn = self._conn
        conn.execute("BEGIN IMMEDIATE")
        try:
            # Re-read inside the write lock: another process may have migrated.
            tables = {
                r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type='table'")
            }
            version = self._read_version(tables)
            for i in range(version, target):
                migration = MIGRATIONS[i]
                log.info("migrating %s to schema %d (%s)", self.path, i + 1, migration.__name__)
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

    def schema_version(self) -> int:
        with self._op():
            row = self._conn.execute(
                "SELECT value FROM meta WHERE key = 'schema_version'"
            ).fetchone()
            return int(row[0]) if row else 0

    def integrity_ok(self) -> bool:
        """``PRAGMA integrity_check`` says ``ok``."""
        return self.integrity_report() == ["ok"]

    def integrity_report(self) -> list[str]:
        """The lines of ``PRAGMA integrity_check`` (``["ok"]`` when healthy)."""
        with self._op():
            return [r[0] for r in self._conn.execute("PRAGMA integrity_check").fetchall()]

    # -- writer lock -------------------------------------------------------------

    def lock_path(self, run_id: str) -> Path:
        _check_run_id(run_id)
        if self._lock_dir_tmp is not None:
            return Path(self._lock_dir_tmp.name) / f"memory.{run_id}.lock"
        return self.path.with_name(f"{self.path.name}.{run_id}.lock")

    def acquire_writer(self, run_id: str, *, wait_s: float = 1.0) -> WriterLease:
        """Take the run's exclusive writer lock (a context manager; also usable as
        a plain object released with ``.release()``). Retries for ``wait_s``
        seconds, then raises :class:`RunLockedError` naming the holder's pid."""
        self._require_run(run_id)
        if run_id in self._leases and self._leases[run_id].held:
            raise RunLockedError(run_id, WriterInfo(os.getpid(), socket.gethostname(), None))
        path = self.lock_path(run_id)
        deadline = time.monotonic() + max(0.0, wait_s)
        while True:
            fd = self._try_lock(path)
            if fd is not None:
                break
            if time.monotonic() >= deadline:
                raise RunLockedError(run_id, _read_lock_file(path))
            time.sleep(0.05)
        info = {"pid": os.getpid(), "host": socket.gethostname(), "since": _now()}
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(info).encode(), 0)
        lease = WriterLease(self, run_id, path, fd)
        self._leases[run_id] = lease
        log.debug("acquired writer lock on run %s (%s)", run_id, path)
        return lease

    @staticmethod
    def _try_lock(path: Path) -> int | None:
        """Lock ``path`` exclusively without blocking; the fd, or None if held."""
        for _ in range(20):
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)
                return None
            except BaseException:
                os.close(fd)
                raise
            try:
                same = os.fstat(fd).st_ino == os.stat(path).st_ino
            except FileNotFoundError:
                same = False
            if same:
                return fd
            os.close(fd)  # the holder unlinked it as we locked: retry on the new file
        return None

    def writer_info(self, run_id: str) -> WriterInfo | None:
        """Who holds the run's writer lock now (``None`` if nobody)."""
        lease = self._leases.get(run_id)
        if lease is not None and lease.held:
            return WriterInfo(os.getpid(), socket.gethostname(), None, True)
        path = self.lock_path(run_id)
        try:
            fd = os.open(path, os.O_RDONLY)
        except FileNotFoundError:
            return None
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            return _read_lock_file(path) or WriterInfo(None, None, None)
        finally:
            os.close(fd)
        return None

    def _check_writable(self, run_id: str) -> None:
        """Refuse writes to a run whose writer lock someone else holds."""
        lease = self._leases.get(run_id)
        if lease is not None and lease.held:
            return
        holder = self.writer_info(run_id)
        if holder is not None:
            raise RunLockedError(run_id, holder)

    # -- runs ----------------------------------------------------------------------

    def create_run(
        self,
        *,
        model: str,
        kind: RunKind = "replay",
        mode: str | None = None,
        preset: str | None = None,
        hparams: Any = None,
        data_source: str | None = None,
        n_edits_planned: int | None = None,
        glue_every: int | None = None,
        glue_tasks: Sequence[str] | None = None,
        glue_limit: int | None = None,
        guard: bool = False,
        base_fingerprint: str | None = None,
        notes: str | None = None,
        run_id: str | None = None,
    ) -> Run:
        """Insert a new run with status ``running``. ``hparams`` may be a dict or a
        dataclass (``EditHparams``). ``run_id`` defaults to 8 hex chars of a uuid4."""
        if kind not in RUN_KINDS:
            raise InvalidFieldError(f"run kind must be one of {RUN_KINDS}, not {kind!r}")
        now = _now()
        row = {
            "kind": kind,
            "model": str(model),
            "preset": preset,
            "mode": mode,
            "hparams": _dumps(hparams or {}),
            "data_source": data_source,
            "n_edits_planned": _opt_int(n_edits_planned),
            "glue_every": _opt_int(glue_every),
            "glue_tasks": _dumps(list(glue_tasks or [])),
            "glue_limit": _opt_int(glue_limit),
            "guard": bool(guard),
            "status": "running",
            "created_at": now,
            "updated_at": now,
            "base_fingerprint": base_fingerprint,
            "notes": notes,
            "error": None,
        }
        with self._write() as db:
            if run_id is not None:
                _check_run_id(run_id)
                if self._run_exists(run_id):
                    raise InvalidFieldError(f"a run with id {run_id!r} already exists")
            else:
                run_id = uuid.uuid4().hex[:8]
                while self._run_exists(run_id):
                    run_id = uuid.uuid4().hex[:8]
            db.table("runs").insert({"id": run_id, **row})
        log.info("created %s run %s (model %s, mode %s)", kind, run_id, model, mode)
        return self.get_run(run_id)

    _RUN_SELECT = """
        SELECT runs.*,
            (SELECT COUNT(*) FROM edits WHERE edits.run_id = runs.id) AS n_edits,
            (SELECT COUNT(*) FROM edits WHERE edits.run_id = runs.id AND flagged) AS n_flagged
        FROM runs
    """

    def _run_exists(self, run_id: str) -> bool:
        return (
            self._conn.execute("SELECT 1 FROM runs WHERE id = ?", (run_id,)).fetchone() is not None
        )

    def _require_run(self, run_id: str) -> None:
        with self._op():
            if not isinstance(run_id, str) or not self._run_exists(run_id):
                raise UnknownRunError(str(run_id), str(self.path))

    def get_run(self, run_id: str) -> Run:
        """The run with this id, or the only run whose id starts with it (4+ chars)."""
        with self._op() as db:
            rows = list(db.query(self._RUN_SELECT + " WHERE runs.id = ?", [run_id]))
            if not rows and isinstance(run_id, str) and len(run_id) >= 4:
                escaped = run_id.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")
                rows = list(
                    db.query(
                        self._RUN_SELECT + " WHERE runs.id LIKE ? ESCAPE '\\' ORDER BY runs.id",
                        [escaped + "%"],
                    )
                )
                if len(rows) > 1:
                    raise AmbiguousRunError(run_id, [r["id"] for r in rows])
            if not rows:
                raise UnknownRunError(str(run_id), str(self.path))
            return self._run_from_row(rows[0])

    def list_runs(self, model: str | None = None, *, kind: str | None = None) -> list[Run]:
        """Runs, newest first, optionally only one model's / one kind's."""
        clauses, params = [], []
        if model is not None:
            clauses.append("runs.model = ?")
            params.append(model)
        if kind is not None:
            clauses.append("runs.kind = ?")
            params.append(kind)
        where = (" WHERE " + " AND ".join(clauses)) if clauses else ""
        with self._op() as db:
            rows = db.query(
                self._RUN_SELECT + where + " ORDER BY runs.created_at DESC, runs.rowid DESC",
                params,
            )
            return [self._run_from_row(r) for r in rows]

    @staticmethod
    def _run_from_row(r: Mapping[str, Any]) -> Run:
        return Run(
            id=r["id"],
            kind=r["kind"],
            model=r["model"],
            preset=r["preset"],
            mode=r["mode"],
            hparams=_loads(r["hparams"], {}),
            data_source=r["data_source"],
            n_edits_planned=r["n_edits_planned"],
            glue_every=r["glue_every"],
            glue_tasks=_loads(r["glue_tasks"], []),
            glue_limit=r["glue_limit"],
            guard=bool(r["guard"]),
            status=r["status"],
            created_at=r["created_at"],
            updated_at=r["updated_at"],
            base_fingerprint=r["base_fingerprint"],
            notes=r["notes"],
            error=r["error"],
            n_edits=int(r.get("n_edits") or 0),
            n_flagged=int(r.get("n_flagged") or 0),
        )

    def set_status(self, run_id: str, status: RunStatus, error: str | None = None) -> None:
        """Set a run's status (and error text, for ``failed``/``interrupted``)."""
        if status not in RUN_STATUSES:
            raise InvalidFieldError(f"run status must be one of {RUN_STATUSES}, not {status!r}")
        self._require_run(run_id)
        self._check_writable(run_id)
        with self._write() as db:
            db.table("runs").update(
                run_id, {"status": status, "error": error, "updated_at": _now()}
            )
        log.info("run %s is now %s%s", run_id, status, f": {error}" if error else "")

    _UPDATABLE_RUN_FIELDS = frozenset(
        {
            "notes",
            "base_fingerprint",
            "n_edits_planned",
            "preset",
            "data_source",
            "hparams",
            "glue_every",
            "glue_tasks",
            "glue_limit",
            "guard",
            "mode",
        }
    )

    def update_run(self, run_id: str, **fields: Any) -> Run:
        """Change descriptive fields of a run (notes, base_fingerprint, ...)."""
        bad = set(fields) - self._UPDATABLE_RUN_FIELDS
        if bad:
            raise InvalidFieldError(
                f"cannot update run field(s) {sorted(bad)}; "
                f"updatable: {sorted(self._UPDATABLE_RUN_FIELDS)} (status: use set_status)"
            )
        values = dict(fields)
        for key in ("hparams", "glue_tasks"):
            if key in values:
                values[key] = _dumps(values[key])
        if "guard" in values:
            values["guard"] = bool(values["guard"])
        values["updated_at"] = _now()
        self._require_run(run_id)
        with self._write() as db:
            db.table("runs").update(run_id, values)
        return self.get_run(run_id)

    def delete_run(self, run_id: str) -> None:
        """Delete a run and everything recorded under it (one transaction)."""
        self._require_run(run_id)
        self._check_writable(run_id)
        with self._write():
            for table in ("rescore", "generations", "checkpoints", "edits"):
                self._conn.execute(f"DELETE FROM {table} WHERE run_id = ?", (run_id,))
            self._conn.execute("DELETE FROM runs WHERE id = ?", (run_id,))
        log.info("deleted run %s", run_id)

    def recover_stale_runs(self, min_age_s: float = 30.0) -> list[str]:
        """Mark ``running`` runs whose writer is gone (killed, crashed) as
        ``interrupted``; returns their ids. Runs updated in the last
        ``min_age_s`` seconds are left alone (their writer may be starting)."""
        cutoff = datetime.now(timezone.utc).timestamp() - min_age_s
        stale = []
        for run in self.list_runs():
            if run.status != "running":
                continue
            try:
                if datetime.fromisoformat(run.updated_at).timestamp() > cutoff:
                    continue
            except ValueError:
                pass  # an unparsable timestamp counts as old
            if self.writer_info(run.id) is None:
                stale.append(run.id)
        for run_id in stale:
            with self._write() as db:
                db.table("runs").update(
                    run_id,
                    {
                        "status": "interrupted",
                        "error": "writer process ended without finishing the run",
                        "updated_at": _now(),
                    },
                )
            log.info("run %s had no live writer: marked interrupted", run_id)
        return stale

    # -- edits ---------------------------------------------------------------------

    def next_seq(self, run_id: str) -> int:
        """One past the largest stored seq of the run (0 for a run without edits)."""
        self._require_run(run_id)
        with self._op():
            row = self._conn.execute(
                "SELECT MAX(seq) FROM edits WHERE run_id = ?", (run_id,)
            ).fetchone()
            return 0 if row[0] is None else int(row[0]) + 1

    def add_edit(
        self,
        run_id: str,
        seq: int,
        *,
        request: Any,
        mode: str,
        layer: int,
        weight_name: str,
        u: torch.Tensor | None,
        v: torch.Tensor | None,
        case_id: int | None = None,
        update_norm: float | None = None,
        update_norm_ratio: float | None = None,
        denominator: float | None = None,
        cos_kstar_ks: float | None = None,
        record: Any = None,
        metrics: Mapping[str, Any] | None = None,
        timings: Mapping[str, Any] | None = None,
        flagged: bool = False,
        flag_reason: str | None = None,
        refused: bool = False,
        applied: bool = True,
        fingerprint: str | None = None,
    ) -> Edit:
        """Store one edit and its factors, committed before returning.

        ``request`` is a dict or an ``EditRequest``-like object (dataclass or
        ``to_dict()``); ``record`` the engine's result (``EditResult`` or its
        dict) whose top-level ``u``/``v``/``factors`` keys are dropped (the
        factors go in the safetensors blob, bit-exact). A refused edit must
        have ``applied=False``. Raises :class:`DuplicateEditError` if
        ``(run_id, seq)`` exists, :class:`RunLockedError` if another process
        holds the run's writer lock.
        """
        if refused and applied:
            raise InvalidFieldError("a refused edit was not applied: pass applied=False")
        if (u is None) != (v is None):
            raise InvalidFieldError("pass both factors u and v, or neither")
        seq = int(seq)
        if seq < 0:
            raise InvalidFieldError(f"seq must be >= 0, not {seq}")
        rec = _jsonable(record) if record is not None else {}
        if isinstance(rec, dict):
            rec = {k: val for k, val in rec.items() if k not in _FACTOR_KEYS}
        blob = None
        if u is not None and v is not None:
            blob = _pack_factors(
                u,
                v,
                {
                    "run_id": run_id,
                    "seq": str(seq),
                    "layer": str(layer),
                    "weight_name": weight_name,
                },
            )
        row = {
            "run_id": run_id,
            "seq": seq,
            "case_id": _opt_int(case_id),
            "request": _dumps(request),
            "mode": str(mode),
            "layer": int(layer),
            "weight_name": str(weight_name),
            "factors": blob,
            "update_norm": _opt_float(update_norm),
            "update_norm_ratio": _opt_float(update_norm_ratio),
            "denominator": _opt_float(denominator),
            "cos_kstar_ks": _opt_float(cos_kstar_ks),
            "record": _dumps(rec),
            "metrics": _dumps(dict(metrics or {})),
            "timings": _dumps(dict(timings or {})),
            "flagged": bool(flagged),
            "flag_reason": flag_reason,
            "refused": bool(refused),
            "applied": bool(applied),
            "fingerprint": fingerprint,
            "created_at": _now(),
        }
        self._require_run(run_id)
        self._check_writable(run_id)
        with self._write() as db:
            try:
                db.table("edits").insert(row)
            except sqlite3.IntegrityError as exc:
                if "UNIQUE" not in str(exc):
                    raise
                raise DuplicateEditError(run_id, seq, self.next_seq(run_id)) from exc
            db.table("runs").update(run_id, {"updated_at": row["created_at"]})
        return self.edit(run_id, seq)

    def add_edit_result(
        self,
        run_id: str,
        seq: int,
        result: Any,
        *,
        case_id: int | None = None,
        metrics: Mapping[str, Any] | None = None,
        flagged: bool = False,
        flag_reason: str | None = None,
        refused: bool = False,
        applied: bool = True,
        fingerprint: str | None = None,
        timings: Mapping[str, Any] | None = None,
    ) -> Edit:
        """:meth:`add_edit` from an engine ``EditResult`` (duck-typed): request,
        mode, layer, weight_name, u, v, the update figures, timings and the
        record (``to_dict(factors=False)``) are taken from ``result``."""
        return self.add_edit(
            run_id,
            seq,
            request=result.request,
            mode=result.mode,
            layer=result.layer,
            weight_name=result.weight_name,
            u=result.u,
            v=result.v,
            case_id=case_id,
            update_norm=getattr(result, "update_norm", None),
            update_norm_ratio=getattr(result, "update_norm_ratio", None),
            denominator=getattr(result, "denominator", None),
            cos_kstar_ks=getattr(result, "cos_kstar_ks", None),
            record=result,
            metrics=metrics,
            timings=timings if timings is not None else getattr(result, "timings", None),
            flagged=flagged,
            flag_reason=flag_reason,
            refused=refused,
            applied=applied,
            fingerprint=fingerprint,
        )

    _EDIT_COLUMNS = (
        "id, run_id, seq, case_id, request, mode, layer, weight_name, update_norm, "
        "update_norm_ratio, denominator, cos_kstar_ks, record, metrics, timings, flagged, "
        "flag_reason, refused, applied, fingerprint, created_at, factors IS NOT NULL AS has_factors"
    )

    @staticmethod
    def _edit_from_row(r: Mapping[str, Any]) -> Edit:
        return Edit(
            id=r["id"],
            run_id=r["run_id"],
            seq=r["seq"],
            case_id=r["case_id"],
            request=_loads(r["request"], {}),
            mode=r["mode"],
            layer=r["layer"],
            weight_name=r["weight_name"],
            update_norm=r["update_norm"],
            update_norm_ratio=r["update_norm_ratio"],
            denominator=r["denominator"],
            cos_kstar_ks=r["cos_kstar_ks"],
            record=_loads(r["record"], {}),
            metrics=_loads(r["metrics"], {}),
            timings=_loads(r["timings"], {}),
            flagged=bool(r["flagged"]),
            flag_reason=r["flag_reason"],
            refused=bool(r["refused"]),
            applied=bool(r["applied"]),
            fingerprint=r["fingerprint"],
            created_at=r["created_at"],
            has_factors=bool(r["has_factors"]),
        )

    def edits(
        self, run_id: str, *, applied_only: bool = False, since_seq: int | None = None
    ) -> list[Edit]:
        """The run's edits ordered by seq (factors not loaded: see load_factors)."""
        self._require_run(run_id)
        sql = f"SELECT {self._EDIT_COLUMNS} FROM edits WHERE run_id = ?"
        params: list[Any] = [run_id]
        if applied_only:
            sql += " AND applied"
        if since_seq is not None:
            sql += " AND seq >= ?"
            params.append(int(since_seq))
        with self._op() as db:
            return [self._edit_from_row(r) for r in db.query(sql + " ORDER BY seq", params)]

    def edit(self, run_id: str, seq: int) -> Edit:
        self._require_run(run_id)
        with self._op() as db:
            rows = list(
                db.query(
                    f"SELECT {self._EDIT_COLUMNS} FROM edits WHERE run_id = ? AND seq = ?",
                    [run_id, int(seq)],
                )
            )
        if not rows:
            raise UnknownEditError(run_id, int(seq))
        return self._edit_from_row(rows[0])

    def last_edit(self, run_id: str) -> Edit | None:
        nxt = self.next_seq(run_id)
        return None if nxt == 0 else self.edit(run_id, nxt - 1)

    def load_factors(
        self, edit: Edit, *, device: str | torch.device | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The edit's ``(u, v)``, bit-identical to what was stored (dtype included)."""
        with self._op():
            row = self._conn.execute(
                "SELECT factors FROM edits WHERE run_id = ? AND seq = ?", (edit.run_id, edit.seq)
            ).fetchone()
        if row is None:
            raise UnknownEditError(edit.run_id, edit.seq)
        if row[0] is None:
            raise MissingFactorsError(edit.run_id, edit.seq)
        return _unpack_factors(row[0], device)

    def iter_factors(
        self, run_id: str, *, device: str | torch.device | None = None
    ) -> Iterator[tuple[Edit, torch.Tensor, torch.Tensor]]:
        """``(edit, u, v)`` for the run's applied edits in seq order: what a resume
        re-applies to the base model. Raises MissingFactorsError on a gap."""
        for edit in self.edits(run_id, applied_only=True):
            u, v = self.load_factors(edit, device=device)
            yield edit, u, v

    def set_applied(self, run_id: str, seq: int, applied: bool) -> None:
        """Record that a session edit was undone (False) or redone (True)."""
        self._require_run(run_id)
        self._check_writable(run_id)
        with self._write():
            cur = self._conn.execute(
                "UPDATE edits SET applied = ? WHERE run_id = ? AND seq = ?",
                (bool(applied), run_id, int(seq)),
            )
            if cur.rowcount == 0:
                raise UnknownEditError(run_id, int(seq))
            self._conn.execute("UPDATE runs SET updated_at = ? WHERE id = ?", (_now(), run_id))

    def mark_undone(self, run_id: str, seq: int) -> None:
        self.set_applied(run_id, seq, False)

    def update_edit(
        self,
        run_id: str,
        seq: int,
        *,
        metrics: Mapping[str, Any] | None = None,
        flagged: bool | None = None,
        flag_reason: str | None = None,
        fingerprint: str | None = None,
    ) -> Edit:
        """Change an edit's after-the-fact fields (metrics, flag, fingerprint)."""
        values: dict[str, Any] = {}
        if metrics is not None:
            values["metrics"] = _dumps(dict(metrics))
        if flagged is not None:
            values["flagged"] = bool(flagged)
        if flag_reason is not None:
            values["flag_reason"] = flag_reason
        if fingerprint is not None:
            values["fingerprint"] = fingerprint
        self._require_run(run_id)
        if values:
            self._check_writable(run_id)
            sets = ", ".join(f"{k} = ?" for k in values)
            with self._write():
                cur = self._conn.execute(
                    f"UPDATE edits SET {sets} WHERE run_id = ? AND seq = ?",
                    (*values.values(), run_id, int(seq)),
                )
                if cur.rowcount == 0:
                    raise UnknownEditError(run_id, int(seq))
        return self.edit(run_id, seq)

    def flag_edit(self, run_id: str, seq: int, reason: str) -> Edit:
        return self.update_edit(run_id, seq, flagged=True, flag_reason=reason)

    # -- checkpoints, generations, rescore --------------------------------------------

    def add_checkpoint(
        self,
        run_id: str,
        step: int,
        task: str,
        *,
        accuracy: float | None = None,
        f1: float | None = None,
        mcc: float | None = None,
        invalid: int | None = None,
        n: int | None = None,
        value: float | None = None,
        extra: Mapping[str, Any] | None = None,
        replace: bool = False,
    ) -> Checkpoint:
        """One GLUE task's figures after ``step`` edits (step 0 = baseline), or a
        fluency probe (``task="fluency"``, entropy in ``value``; see add_fluency)."""
        row = {
            "run_id": run_id,
            "step": int(step),
            "task": str(task),
            "accuracy": _opt_float(accuracy),
            "f1": _opt_float(f1),
            "mcc": _opt_float(mcc),
            "invalid": _opt_int(invalid),
            "n": _opt_int(n),
            "value": _opt_float(value),
            "extra": _dumps(dict(extra or {})),
            "created_at": _now(),
        }
        self._require_run(run_id)
        self._check_writable(run_id)
        with self._write() as db:
            if replace:
                self._conn.execute(
                    "DELETE FROM checkpoints WHERE run_id = ? AND step = ? AND task = ?",
                    (run_id, row["step"], row["task"]),
                )
            try:
                db.table("checkpoints").insert(row)
            except sqlite3.IntegrityError as exc:
                raise DuplicateCheckpointError(run_id, int(step), str(task)) from exc
            db.table("runs").update(run_id, {"updated_at": row["created_at"]})
        return self._checkpoint_from_row(row)

    def add_fluency(
        self,
        run_id: str,
        step: int,
        entropy: float,
        *,
        extra: Mapping[str, Any] | None = None,
        replace: bool = False,
    ) -> Checkpoint:
        return self.add_checkpoint(
            run_id, step, FLUENCY_TASK, value=entropy, extra=extra, replace=replace
        )

    @staticmethod
    def _checkpoint_from_row(r: Mapping[str, Any]) -> Checkpoint:
        return Checkpoint(
            run_id=r["run_id"],
            step=r["step"],
            task=r["task"],
            accuracy=r["accuracy"],
            f1=r["f1"],
            mcc=r["mcc"],
            invalid=r["invalid"],
            n=r["n"],
            value=r["value"],
            extra=_loads(r["extra"], {}),
            created_at=r["created_at"],
        )

    def checkpoints(self, run_id: str, task: str | None = None) -> list[Checkpoint]:
        """The run's checkpoints ordered by step, then task."""
        self._require_run(run_id)
        sql = (
            "SELECT run_id, step, task, accuracy, f1, mcc, invalid, n, value, extra, "
            "created_at FROM checkpoints WHERE run_id = ?"
        )
        params: list[Any] = [run_id]
        if task is not None:
            sql += " AND task = ?"
            params.append(task)
        with self._op() as db:
            rows = db.query(sql + " ORDER BY step, task", params)
            return [self._checkpoint_from_row(r) for r in rows]

    def add_generation(
        self, run_id: str, edit_seq: int, prompt: str, before: str | None, after: str | None
    ) -> None:
        self._require_run(run_id)
        self._check_writable(run_id)
        with self._write() as db:
            db.table("generations").insert(
                {
                    "run_id": run_id,
                    "edit_seq": int(edit_seq),
                    "prompt": prompt,
                    "before": before,
                    "after": after,
                    "created_at": _now(),
                }
            )

    def generations(self, run_id: str, edit_seq: int | None = None) -> list[Generation]:
        self._require_run(run_id)
        sql = "SELECT * FROM generations WHERE run_id = ?"
        params: list[Any] = [run_id]
        if edit_seq is not None:
            sql += " AND edit_seq = ?"
            params.append(int(edit_seq))
        with self._op() as db:
            return [Generation(**r) for r in db.query(sql + " ORDER BY edit_seq, id", params)]

    def add_rescore(self, run_id: str, seq: int, metrics: Mapping[str, Any]) -> None:
        """End-of-run re-scoring of edit ``seq``; a second call for the same edit
        replaces the first."""
        self._require_run(run_id)
        self._check_writable(run_id)
        with self._write():
            self._conn.execute(
                "INSERT INTO rescore(run_id, seq, metrics, created_at) VALUES (?, ?, ?, ?) "
                "ON CONFLICT(run_id, seq) DO UPDATE SET metrics = excluded.metrics, "
                "created_at = excluded.created_at",
                (run_id, int(seq), _dumps(dict(metrics)), _now()),
            )

    def rescores(self, run_id: str) -> list[Rescore]:
        self._require_run(run_id)
        with self._op() as db:
            rows = db.query(
                "SELECT run_id, seq, metrics, created_at FROM rescore WHERE run_id = ? "
                "ORDER BY seq",
                [run_id],
            )
            return [
                Rescore(r["run_id"], r["seq"], _loads(r["metrics"], {}), r["created_at"])
                for r in rows
            ]

    # -- export ----------------------------------------------------------------------

    def export_run(
        self, run_id: str, fmt: Literal["json", "csv"] = "json", path: str | Path | None = None
    ) -> Path:
        """Write a run to ``path`` (default ``./<run_id>.<fmt>``); returns the path.

        JSON: ``{"schema_version", "run", "edits" (no factors), "checkpoints",
        "generations", "rescore"}``, NaN written as null. CSV: one row per edit
        with the main figures, ``metric.<name>`` columns for its scalar metrics
        and ``rescore.<name>`` for the end-of-run ones.
        """
        if fmt not in ("json", "csv"):
            raise InvalidFieldError(f"export format must be 'json' or 'csv', not {fmt!r}")
        run = self.get_run(run_id)
        out = Path(path) if path is not None else Path.cwd() / f"{run.id}.{fmt}"
        edits = self.edits(run.id)
        rescores = {r.seq: r.metrics for r in self.rescores(run.id)}
        if fmt == "json":
            doc = {
                "schema_version": SCHEMA_VERSION,
                "run": dataclasses.asdict(run),
                "edits": [dataclasses.asdict(e) for e in edits],
                "checkpoints": [dataclasses.asdict(c) for c in self.checkpoints(run.id)],
                "generations": [dataclasses.asdict(g) for g in self.generations(run.id)],
                "rescore": [{"seq": s, "metrics": m} for s, m in sorted(rescores.items())],
            }
            text = json.dumps(_nan_to_none(doc), indent=2, allow_nan=False)
        else:
            text = _edits_csv(edits, rescores)
        _atomic_write(out, text)
        log.info("exported run %s to %s", run.id, out)
        return out


# --------------------------------------------------------------------------- internals


def _pack_factors(u: torch.Tensor, v: torch.Tensor, metadata: dict[str, str]) -> bytes:
    import safetensors.torch

    tensors = {
        "u": u.detach().to("cpu").contiguous().clone(),
        "v": v.detach().to("cpu").contiguous().clone(),
    }
    return safetensors.torch.save(tensors, metadata=metadata)


def _unpack_factors(blob: bytes, device: Any) -> tuple[torch.Tensor, torch.Tensor]:
    import safetensors.torch

    tensors = safetensors.torch.load(bytes(blob))
    u, v = tensors["u"], tensors["v"]
    if device is not None:
        u, v = u.to(device), v.to(device)
    return u, v


def _nan_to_none(obj: Any) -> Any:
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, dict):
        return {k: _nan_to_none(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_nan_to_none(v) for v in obj]
    return obj


def _flat_scalars(d: Mapping[str, Any], prefix: str) -> dict[str, Any]:
    """Scalars of ``d`` (one level of nested dicts as ``a.b``) under ``prefix``."""
    out: dict[str, Any] = {}
    for k, v in d.items():
        if isinstance(v, Mapping):
            for k2, v2 in v.items():
                if v2 is None or isinstance(v2, (bool, int, float, str)):
                    out[f"{prefix}{k}.{k2}"] = v2
        elif v is None or isinstance(v, (bool, int, float, str)):
            out[f"{prefix}{k}"] = v
    return out


_CSV_BASE_COLUMNS = [
    "run_id",
    "seq",
    "case_id",
    "subject",
    "prompt",
    "target_new",
    "target_true",
    "mode",
    "layer",
    "weight_name",
    "update_norm",
    "update_norm_ratio",
    "denominator",
    "cos_kstar_ks",
    "flagged",
    "flag_reason",
    "refused",
    "applied",
    "fingerprint",
    "created_at",
]


def _edits_csv(edits: Sequence[Edit], rescores: Mapping[int, Mapping[str, Any]]) -> str:
    rows: list[dict[str, Any]] = []
    extra_cols: dict[str, None] = {}
    for e in edits:
        row: dict[str, Any] = {
            "run_id": e.run_id,
            "seq": e.seq,
            "case_id": e.case_id,
            "subject": e.request.get("subject"),
            "prompt": e.request.get("prompt"),
            "target_new": e.request.get("target_new"),
            "target_true": e.request.get("target_true"),
            "mode": e.mode,
            "layer": e.layer,
            "weight_name": e.weight_name,
            "update_norm": e.update_norm,
            "update_norm_ratio": e.update_norm_ratio,
            "denominator": e.denominator,
            "cos_kstar_ks": e.cos_kstar_ks,
            "flagged": int(e.flagged),
            "flag_reason": e.flag_reason,
            "refused": int(e.refused),
            "applied": int(e.applied),
            "fingerprint": e.fingerprint,
            "created_at": e.created_at,
        }
        extra = _flat_scalars(e.metrics, "metric.")
        extra.update(_flat_scalars(rescores.get(e.seq, {}), "rescore."))
        for k in extra:
            extra_cols.setdefault(k, None)
        row.update(extra)
        rows.append(row)
    metric_cols = sorted(c for c in extra_cols if c.startswith("metric."))
    rescore_cols = sorted(c for c in extra_cols if c.startswith("rescore."))
    buf = io.StringIO()
    writer = csv.DictWriter(
        buf, fieldnames=_CSV_BASE_COLUMNS + metric_cols + rescore_cols, lineterminator="\n"
    )
    writer.writeheader()
    for row in rows:
        for k, v in row.items():
            if isinstance(v, float) and not math.isfinite(v):
                row[k] = ""
        writer.writerow(row)
    return buf.getvalue()


def _atomic_write(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8", newline="") as fh:
            fh.write(text)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


__all__ = [
    "APP_NAME",
    "DB_ENV_VAR",
    "FLUENCY_TASK",
    "MIGRATIONS",
    "RUN_KINDS",
    "RUN_STATUSES",
    "SCHEMA_VERSION",
    "AmbiguousRunError",
    "Checkpoint",
    "CorruptDatabaseError",
    "DatabaseLockedError",
    "DuplicateCheckpointError",
    "DuplicateEditError",
    "Edit",
    "ForeignDatabaseError",
    "Generation",
    "InvalidFieldError",
    "MissingFactorsError",
    "Rescore",
    "Run",
    "RunLockedError",
    "SchemaTooNewError",
    "Store",
    "StoreClosedError",
    "StoreError",
    "StoreNotFoundError",
    "UnknownEditError",
    "UnknownRunError",
    "WriterInfo",
    "WriterLease",
    "default_db_path",
]
