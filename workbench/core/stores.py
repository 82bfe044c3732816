"""Opening and closing the history database, and which runs can be resumed."""

from __future__ import annotations

import logging
from collections.abc import Iterable
from pathlib import Path

from workbench.store import RESUMABLE_STATUSES, Run, Store

log = logging.getLogger(__name__)


def open_store(path: str | Path | None = None, *, create: bool = True) -> Store:
    """Open the database at ``path`` (default: ``$ROME_WORKBENCH_DB`` or the user's
    data folder). ``create=False`` refuses a path where there is no database."""
    return Store.open(path, create=create)


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
