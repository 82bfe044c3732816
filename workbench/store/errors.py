"""The store's named errors. Every message is one line that says what to do."""

from __future__ import annotations

import os
import socket
import sqlite3
from collections.abc import Sequence

from .location import DB_ENV_VAR
from .writer import WriterInfo


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
    def __init__(self, run_id: str, path: str = "", *, min_prefix: int = 0) -> None:
        where = f" in {path}" if path else ""
        msg = f"no run with id {run_id!r}{where}; list the runs to see the valid ids"
        if min_prefix:  # a prefix shorter than the store looks up
            msg = (
                f"run id prefix {run_id!r} is too short: give the whole id or at least "
                f"{min_prefix} characters of it (list the runs to see them)"
            )
        StoreError.__init__(self, msg)
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


def translate(exc: sqlite3.Error, path: str, timeout_s: float) -> StoreError:
    """The StoreError that says in words what an sqlite3 error means."""
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
