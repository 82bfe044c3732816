"""Who holds a run's writer lock (a leaf module: the lock, the connection and the
error that names the holder all read it)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class WriterInfo:
    """Who holds (or last held) a run's writer lock, as written in the lock file."""

    pid: int | None
    host: str | None
    since: str | None
    alive: bool | None = None
