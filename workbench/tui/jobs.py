"""The job runner: one model job at a time in a thread worker, store reads beside it.

A *job* (:class:`JobId`) has the model to itself: load, compute, apply, replay...
A *read* (:class:`ReadId`) only reads the store and may run while a job does.
Both run in Textual thread workers and report back by messages; every error
they raise becomes one :class:`~.messages.JobFailed`, which the app's single
error handler turns into a notification or a dialog.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from enum import Enum
from functools import partial
from typing import Any

from textual.app import App
from textual.message import Message

from .messages import JobFailed, JobFinished, Progress

log = logging.getLogger(__name__)

ProgressCallback = Callable[[str, int, int], None]


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


class JobCancelled(Exception):
    """Raised inside a job when the user cancelled it (between two steps)."""


class JobContext:
    """Handed to the function a worker runs: post messages, report progress, see cancel."""

    def __init__(self, job: JobId, label: str, post: Callable[[Message], object]):
        self.job = job
        self.label = label
        self.cancel_event = threading.Event()
        self._post = post
        self._last = 0.0

    @property
    def cancelled(self) -> bool:
        return self.cancel_event.is_set()

    def cancel(self) -> None:
        self.cancel_event.set()

    def check(self) -> None:
        """Raise :class:`JobCancelled` if the user asked to stop."""
        if self.cancel_event.is_set():
            raise JobCancelled(self.label)

    def post(self, message: Message) -> None:
        self._post(message)

    def progress(self, phase: str, done: int, total: int | None, detail: str = "") -> None:
        """Report a step (throttled to ~20 a second) and stop here if cancelled."""
        self.check()
        now = time.monotonic()
        if total is not None and done < total and now - self._last < 0.05:
            return
        self._last = now
        self._post(Progress(self.job, phase, done, total, detail))

    def engine_callback(self, describe: Callable[[str], str] | None = None) -> ProgressCallback:
        """A ``(phase, done, total)`` callback for the engine that reports and can cancel."""

        def cb(phase: str, done: int, total: int) -> None:
            self.progress(phase, done, total, describe(phase) if describe else "")

        return cb


class JobRunner:
    """Starts jobs and reads in thread workers of ``app``; knows the running job."""

    def __init__(self, app: App[Any]) -> None:
        self._app = app
        self.current: JobContext | None = None

    @property
    def busy(self) -> bool:
        return self.current is not None

    def start(self, job: JobId, label: str, fn: Callable[[JobContext], None]) -> JobContext | None:
        """Run ``fn`` in a thread worker; None (nothing started) while another job runs."""
        if self.current is not None:
            return None
        ctx = JobContext(job, label, self._app.post_message)
        self.current = ctx
        self._app.run_worker(
            partial(self._body, ctx, fn),
            name=job.value,
            group="model",
            thread=True,
            exit_on_error=False,
        )
        return ctx

    def _body(self, ctx: JobContext, fn: Callable[[JobContext], None]) -> None:
        t0 = time.monotonic()
        end = JobEnd.DONE
        try:
            fn(ctx)
        except JobCancelled:
            end = JobEnd.CANCELLED
        except Exception as exc:  # every job error goes to the one handler
            end = JobEnd.FAILED
            log.error("job %s failed", ctx.job.value, exc_info=exc)
            self._app.post_message(JobFailed(ctx.job, ctx.label, exc))
        finally:
            self._app.post_message(JobFinished(ctx.job, ctx.label, end, time.monotonic() - t0))

    def finished(self, msg: JobFinished) -> None:
        """The app saw ``msg``: the job is over."""
        if self.current is not None and self.current.job is msg.job:
            self.current = None

    def read(self, read: ReadId, label: str, fn: Callable[[], Message | None]) -> None:
        """Run a store read in a worker; the message it returns is posted to the app."""

        def body() -> None:
            try:
                msg = fn()
            except Exception as exc:
                log.error("%s failed", read.value, exc_info=exc)
                self._app.post_message(JobFailed(read, label, exc))
                return
            if msg is not None:
                self._app.post_message(msg)

        self._app.run_worker(
            body,
            name=read.value,
            group=read.value,
            thread=True,
            exclusive=True,
            exit_on_error=False,
        )
