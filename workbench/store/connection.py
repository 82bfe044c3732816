"""The store's connection: opening and migrating, transactions, the writer lock.

:class:`StoreBase` owns one ``sqlite3`` connection (WAL, busy timeout) behind a
re-entrant lock. Reads go through sqlite-utils' ``query`` (rows as dicts); every
write is plain parameterised SQL inside :meth:`StoreBase._write`, one committed
``BEGIN IMMEDIATE`` transaction each, after :meth:`StoreBase._check_writable`.

Opened to read (``access="read"``, or ``"read-until-write"`` until its first write),
the file is opened with SQLite's ``mode=ro``: no WAL switch, no migration, nothing
written. A database of an older schema is then read as it is, through a migrated copy
in memory; it is migrated in place only when a write comes (``"read-until-write"``,
or a store opened to write), and a warning says so once.
"""

from __future__ import annotations

import contextlib
import logging
import sqlite3
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any, Literal
from urllib.parse import quote

import sqlite_utils

from . import lock
from .codec import check_run_id
from .errors import RunLockedError, StoreClosedError, StoreError, StoreNotFoundError, translate
from .lock import WriterLease
from .records import DEFAULT_BUSY_TIMEOUT_S
from .schema import SCHEMA_VERSION, migrate, read_version
from .writer import WriterInfo

log = logging.getLogger(__name__)

#: how a store opens its file: to write (created, WAL, migrated), only to read, or to
#: read until its first write (then as to write: the app's browsing that may save)
Access = Literal["write", "read", "read-until-write"]


class ReadOnlyStoreError(StoreError):
    def __init__(self, path: str) -> None:
        super().__init__(f"the store {path} was opened to read only; open it to write")
        self.path = path


class StoreBase:
    """Connection, transactions and writer leases; :class:`~workbench.store.Store`
    adds the tables. Thread-safe: one connection guarded by a re-entrant lock."""

    def __init__(
        self,
        path: str | Path,
        *,
        busy_timeout: float = DEFAULT_BUSY_TIMEOUT_S,
        create: bool = True,
        access: Access = "write",
    ) -> None:
        self._memory = str(path) == ":memory:"
        self.access: Access = "write" if self._memory else access
        #: a store opened to read shows a ``running`` run whose writer lock nobody holds
        #: as ``interrupted`` (what a writer's recovery would store), writing nothing (the
        #: app, opening to read until it writes, shows such a run as "writer gone")
        self.infer_interrupted = self.access == "read"
        #: told (besides the log's warning) when opening to write migrates an older file
        self.on_migrate: Callable[[str], None] | None = None
        self.path = Path(path) if not self._memory else Path(":memory:")
        self.busy_timeout = float(busy_timeout)
        self._mutex = threading.RLock()
        self._closed = True
        self._leases: dict[str, WriterLease] = {}
        self._lock_dir_tmp: tempfile.TemporaryDirectory[str] | None = None
        if not lock.lock_available():  # pragma: no cover
            raise StoreError("the workbench store needs a POSIX system (fcntl.flock)")
        if not self._memory:
            if not self.path.exists():
                if not create or self.access != "write":
                    raise StoreNotFoundError(str(self.path))
                self.path.parent.mkdir(parents=True, exist_ok=True)
        else:
            self._lock_dir_tmp = tempfile.TemporaryDirectory(prefix="rome-wb-locks-")
        self._connect(self.access == "write")

    def _connect(self, write: bool) -> None:
        """Open the connection: to write (WAL, migrated), or read-only (``mode=ro``)."""
        try:
            if write:
                conn = sqlite3.connect(
                    str(self.path), timeout=self.busy_timeout, check_same_thread=False
                )
            else:
                conn = self._connect_read_only()
        except sqlite3.Error as exc:
            raise translate(exc, str(self.path), self.busy_timeout) from exc
        self._conn = conn
        self._db = sqlite_utils.Database(conn, execute_plugins=False)
        self._closed = False
        try:
            self._setup() if write else self._setup_read_only()
        except BaseException:
            self.close()
            raise

    def _connect_read_only(self) -> sqlite3.Connection:
        """``mode=ro``; where SQLite cannot open a WAL file so (no ``-shm`` beside it in a
        folder it may not write), ``immutable=1``: nobody can be writing it then."""
        uri = f"file:{quote(str(self.path.absolute()))}?mode=ro"
        conn = sqlite3.connect(uri, uri=True, timeout=self.busy_timeout, check_same_thread=False)
        try:
            conn.execute("SELECT name FROM sqlite_master LIMIT 1").fetchall()
            return conn
        except sqlite3.OperationalError as exc:
            conn.close()
            if "unable to open" not in str(exc).lower():
                raise
        return sqlite3.connect(
            uri + "&immutable=1", uri=True, timeout=self.busy_timeout, check_same_thread=False
        )

    def _setup_read_only(self) -> None:
        """Check the file as :meth:`_setup` does, writing nothing; an older schema is read
        through a copy in memory migrated there (the file stays as it is)."""
        with self._op() as db:
            conn = self._conn
            conn.execute(f"PRAGMA busy_timeout = {int(self.busy_timeout * 1000)}")
            version = read_version(conn, set(db.table_names()), self.path)
            if version < SCHEMA_VERSION:
                copy = sqlite3.connect(":memory:", check_same_thread=False)
                conn.backup(copy)
                conn.close()
                migrate(copy, self.path, quiet=True)
                self._conn = copy
                self._db = sqlite_utils.Database(copy, execute_plugins=False)
                log.info(
                    "read %s as it is (schema %d), through a copy in memory", self.path, version
                )
            self._conn.execute("PRAGMA query_only = ON")

    def _writable(self) -> None:
        """Before any write: refuse on a store opened to read; reopen one opened to read
        until its first write, as to write (migrating the file if older, saying so)."""
        if self.access == "write":
            return
        if self.access == "read":
            raise ReadOnlyStoreError(str(self.path))
        with self._mutex:
            self._check_open()
            self._conn.close()
            self.access = "write"
            try:
                self._connect(True)
            except BaseException:  # (a file it may not write): still open to read
                self.access = "read-until-write"
                self._connect(False)
                raise

    # -- opening / closing -------------------------------------------------------

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
                raise translate(exc, str(self.path), self.busy_timeout) from exc

    @contextlib.contextmanager
    def _write(self) -> Iterator[sqlite3.Connection]:
        """One committed write transaction (BEGIN IMMEDIATE takes the write lock up
        front, so WAL readers never need to upgrade mid-transaction)."""
        self._writable()
        with self._op():
            conn = self._conn
            conn.execute("BEGIN IMMEDIATE")
            try:
                yield conn
            except BaseException:
                if conn.in_transaction:
                    conn.execute("ROLLBACK")
                raise
            else:
                conn.execute("COMMIT")

    @staticmethod
    def _insert(conn: sqlite3.Connection, table: str, row: Mapping[str, Any]) -> None:
        """``INSERT`` one row (table and column names come from this package only)."""
        cols = ", ".join(row)
        marks = ", ".join("?" for _ in row)
        conn.execute(f"INSERT INTO {table} ({cols}) VALUES ({marks})", tuple(row.values()))

    @staticmethod
    def _update(
        conn: sqlite3.Connection, table: str, where: Mapping[str, Any], values: Mapping[str, Any]
    ) -> int:
        """``UPDATE`` the rows matching ``where`` (column = value, ANDed); the row count."""
        sets = ", ".join(f"{k} = ?" for k in values)
        cond = " AND ".join(f"{k} = ?" for k in where)
        cur = conn.execute(
            f"UPDATE {table} SET {sets} WHERE {cond}", (*values.values(), *where.values())
        )
        return cur.rowcount

    def _setup(self) -> None:
        with self._op() as db:
            conn = self._conn
            conn.execute(f"PRAGMA busy_timeout = {int(self.busy_timeout * 1000)}")
            # Reading the schema is what detects a file that is not a database.
            tables = set(db.table_names())
            # Check before touching the file: a foreign or too-new database is
            # left exactly as it was.
            version = read_version(conn, tables, self.path)
            if not self._memory:
                db.enable_wal()
            conn.execute("PRAGMA synchronous = FULL")
            conn.execute("PRAGMA foreign_keys = ON")
            if version < SCHEMA_VERSION:
                note = migrate(conn, self.path, quiet=version == 0)
                if note is not None and self.on_migrate is not None:
                    self.on_migrate(note)

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

    # -- runs, as far as the lock needs them -------------------------------------

    def _run_exists(self, run_id: str) -> bool:
        return (
            self._conn.execute("SELECT 1 FROM runs WHERE id = ?", (run_id,)).fetchone() is not None
        )

    def _require_run(self, run_id: str) -> None:
        from .errors import UnknownRunError

        with self._op():
            if not isinstance(run_id, str) or not self._run_exists(run_id):
                raise UnknownRunError(str(run_id), str(self.path))

    # -- writer lock -------------------------------------------------------------

    def lock_path(self, run_id: str) -> Path:
        check_run_id(run_id)
        if self._lock_dir_tmp is not None:
            return Path(self._lock_dir_tmp.name) / f"memory.{run_id}.lock"
        return self.path.with_name(f"{self.path.name}.{run_id}.lock")

    def acquire_writer(self, run_id: str, *, wait_s: float = 1.0) -> WriterLease:
        """Take the run's exclusive writer lock (a context manager; also usable as
        a plain object released with ``.release()``). Retries for ``wait_s``
        seconds, then raises :class:`RunLockedError` naming the holder's pid."""
        self._require_run(run_id)
        self._writable()
        if run_id in self._leases and self._leases[run_id].held:
            raise RunLockedError(run_id, lock.this_process())
        path = self.lock_path(run_id)
        deadline = time.monotonic() + max(0.0, wait_s)
        while True:
            fd = lock.try_lock(path)
            if fd is not None:
                break
            if time.monotonic() >= deadline:
                raise RunLockedError(run_id, lock.read_lock_file(path))
            time.sleep(0.05)
        lock.write_holder(fd)
        lease = WriterLease(run_id, path, fd, on_release=self._forget_lease)
        self._leases[run_id] = lease
        log.debug("acquired writer lock on run %s (%s)", run_id, path)
        return lease

    def _forget_lease(self, run_id: str) -> None:
        self._leases.pop(run_id, None)

    def writer_info(self, run_id: str) -> WriterInfo | None:
        """Who holds the run's writer lock now (``None`` if nobody)."""
        lease = self._leases.get(run_id)
        if lease is not None and lease.held:
            return lock.this_process(alive=True)
        return lock.holder_of(self.lock_path(run_id))

    def _check_writable(self, run_id: str) -> None:
        """Refuse writes to a run whose writer lock someone else holds."""
        lease = self._leases.get(run_id)
        if lease is not None and lease.held:
            return
        holder = self.writer_info(run_id)
        if holder is not None:
            raise RunLockedError(run_id, holder)


__all__ = ["Access", "ReadOnlyStoreError", "StoreBase"]
