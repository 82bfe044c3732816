"""Opening and closing the history database, and which runs can be resumed."""

from __future__ import annotations

import logging
from collections.abc import Iterable
from pathlib import Path

from workbench.store import (
    DB_ENV_VAR,
    RESUMABLE_STATUSES,
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


def open_store(path: str | Path | None = None, *, create: bool = True) -> Store:
    """Open the database at ``path`` (default: ``$ROME_WORKBENCH_DB`` or the user's
    data folder). ``create=False`` (what a command that only reads uses) refuses a
    path where there is no database with :class:`NoDatabaseError`, creating no
    file or folder; a folder is refused either way."""
    where = Path(default_db_path() if path is None else path)
    if str(where) != ":memory:":
        if where.is_dir():
            raise NoDatabaseError(where, folder=True)
        if not create and not where.exists():
            raise NoDatabaseError(where)
    return Store.open(where, create=create)


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
