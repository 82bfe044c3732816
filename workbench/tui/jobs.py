"""What a thread worker gets to report progress and to notice a cancel request."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable

from textual.message import Message

from .messages import Progress

ProgressCallback = Callable[[str, int, int], None]


class JobCancelled(Exception):
    """Raised inside a job when the user cancelled it (between two steps)."""


class JobContext:
    """Handed to the function a worker runs: post messages, report progress, see cancel."""

    def __init__(self, job: str, label: str, post: Callable[[Message], object]):
        self.job = job
        self.label = label
        self.cancel_event = threading.Event()
        self._post = post
        self._last = 0.0
        self.started = time.monotonic()

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
