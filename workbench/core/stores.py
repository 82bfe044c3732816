"""Opening and closing the history database, and which runs can be resumed."""

from __future__ import annotations

import logging
from collections.abc import Iterable
from pathlib import Path

from workbench.store import (
    DB_ENV_VAR,
    RESUMABLE_STATUSES,
    Access,
    Run,
    Store,
    StoreError,
    StoreNotFoundError,
    default_db_path,
)

log = logging.getLogger(__name__)


class NoDatabaseError(StoreNotFoundError):
    """No workbench database at a path opened without ``create`` (or the path is a
    folder); nothing was created there."""

    def __init__(self, path: str | Path, folder: bool = False) -> None:
        what = "is a folder, not a workbench database" if folder else "holds no workbench database"
        StoreError.__init__(
            self,
            f"{path} {what}; nothing was created there. Check the path (or "
            f"${DB_ENV_VAR}); a replay creates the database",
        )
        self.path = str(path)


def open_store(
    path: str | Path | None = None, *, create: bool = True, access: Access = "write"
) -> Store:
    """Open the database at ``path`` (default: ``$ROME_WORKBENCH_DB`` or the user's
    data folder). ``create=False`` refuses a path where there is no database with
    :class:`NoDatabaseError`, creating no file or folder; a folder is refused either
    way. ``access``: see :meth:`Store.open` (``"read"``: what a command that only
    reads uses; nothing is written to the file, nor created)."""
    where = Path(default_db_path() if path is None else path)
    if str(where) != ":memory:":
        if where.is_dir():
            raise NoDatabaseError(where, folder=True)
        if (not create or access != "write") and not where.exists():
            raise NoDatabaseError(where)
    return Store.open(where, create=create, access=access)


def open_to_read(path: str | Path | None = None) -> Store:
    """The database as the commands that only read open it: read-only (no migration,
    no WAL switch, no recovery stored: a run whose writer is gone reads as
    ``interrupted``); where there is none, :class:`NoDatabaseError`."""
    return open_store(path, create=False, access="read")


def recover(store: Store) -> list[str]:
    """Mark ``running`` runs whose writer died as ``interrupted``; their ids."""
    stale = store.recover_stale_runs()
    if stale:
        log.info("interrupted runs: %s", ", ".join(stale))
    return stale


def open_and_recover(path: str | Path | None = None, *, create: bool = True) -> Store:
    """:func:`open_store`, then :func:`recover`: how both faces open the history."""
    store = open_store(path, create=create)
    try:
        recover(store)
    except BaseException:
        store.close()
        raise
    return store


def database_path(path: str | Path | None = None) -> Path:
    """Where the history database is: ``path``, else ``$ROME_WORKBENCH_DB`` or the
    user's data folder."""
    return Path(default_db_path() if path is None else path).expanduser()


class NewDatabase:
    """The database a command that writes opens (creating it where there is none),
    as a context manager: where the block fails and the database this created still
    holds no run, it is removed again, with the folders made for it.

    Entering checks that a database can be created there
    (:class:`~workbench.core.errors.OutputPathError`, exit 2, before any work).
    """

    def __init__(self, path: str | Path | None = None, *, active: bool = True) -> None:
        self.path = database_path(path)
        self.store: Store | None = None
        self.active = active  # False: does nothing (a command that only reads this time)
        self._made: Path | None = None  # the first file or folder this will create

    def __enter__(self) -> NewDatabase:
        from .errors import OutputPathError, where_problem

        if not self.active or str(self.path) == ":memory:" or self.path.exists():
            return self
        problem = where_problem(self.path)
        if problem is not None:
            raise OutputPathError(f"cannot create the database {self.path}: {problem}")
        made = self.path.absolute()
        while not made.parent.exists():
            made = made.parent
        self._made = made
        return self

    def open(self) -> Store:
        """The store (opened once; stale runs marked interrupted)."""
        if self.store is None:
            self.store = open_and_recover(self.path, create=True)
        return self.store

    def __exit__(self, exc_type: object, exc: object, tb: object) -> None:
        if exc_type is None or self._made is None:
            return
        try:
            if self.store is not None and self.store.list_runs():
                return
        except StoreError:
            return
        close_store(self.store)
        for suffix in ("", "-wal", "-shm", "-journal"):
            Path(f"{self.path}{suffix}").unlink(missing_ok=True)
        folder = self.path.absolute().parent
        while self._made != self.path.absolute() and folder.is_relative_to(self._made):
            try:
                folder.rmdir()
            except OSError:
                break
            folder = folder.parent
        log.info("removed the database %s, created for a command that failed", self.path)


def close_store(store: Store | None) -> None:
    """Close ``store`` (releasing its writer leases); ``None`` is fine."""
    if store is not None:
        store.close()


def is_resumable(run: Run) -> bool:
    """A run that stopped (interrupted, cancelled, failed) before its last edit."""
    return run.status in RESUMABLE_STATUSES and (
        run.n_edits_planned is None or run.n_edits < run.n_edits_planned
    )


def resumable(runs: Iterable[Run]) -> list[Run]:
    """The runs of ``runs`` that :func:`is_resumable`, in the same order."""
    return [r for r in runs if is_resumable(r)]


def writer_gone(store: Store, run: Run) -> bool:
    """A ``running`` run whose writer lock nobody holds: its process died (SIGTERM,
    SIGKILL, a crash) before it could say so; the lock file tells."""
    return run.status == "running" and store.writer_info(run.id) is None


def can_resume(store: Store, run: Run) -> bool:
    """What the CLI resumes: a run that stopped before it finished (interrupted,
    cancelled, failed, even after its last edit: the resume re-scores and finishes
    it), or a ``running`` one whose writer is gone."""
    return run.status in RESUMABLE_STATUSES or writer_gone(store, run)
