"""What a job or a read is and how it ended: the names the job runner and the
messages share (a leaf module, so neither imports the other for them)."""

from __future__ import annotations

from enum import Enum


class JobId(Enum):
    """The model jobs (one runs at a time)."""

    LOAD = "load"
    PREPARE = "prepare"
    COMPUTE = "compute"
    COMPARE = "compare"
    APPLY = "apply"
    UNDO = "undo"
    REVERT = "revert"
    REAPPLY = "reapply"
    GENERATE = "generate"
    REPLAY = "replay"
    SAVE = "save"


class ReadId(Enum):
    """Store reads that may run beside a model job (each kind replaces its older one)."""

    STORE = "open-store"
    HISTORY = "history"
    REPLAY_RUNS = "replay-runs"
    RUN_SERIES = "run-series"
    SERIES_REFRESH = "series-refresh"


class JobEnd(Enum):
    DONE = "done"
    CANCELLED = "cancelled"
    FAILED = "failed"
