"""What the app test modules share: waiting for the app's workers to settle."""

from __future__ import annotations

import asyncio
import time

from textual.app import App
from textual.worker import WorkerCancelled


async def settle(app: App) -> None:
    """Wait for every worker the app has started.

    A store read is an exclusive worker: a newer read of the same kind (the periodic refresh
    of the runs table, on a loaded machine) cancels the one before it. Cancelled that way a
    worker is done, not failed; any other error still fails the test.
    """
    outcomes = await asyncio.gather(
        *(worker.wait() for worker in list(app.workers)), return_exceptions=True
    )
    for outcome in outcomes:
        if isinstance(outcome, BaseException) and not isinstance(outcome, WorkerCancelled):
            raise outcome


async def wait_idle(app: App, pilot, timeout: float = 120.0) -> None:
    """Until no job runs and the messages it posted are handled."""
    deadline = time.monotonic() + timeout
    await pilot.pause()
    while True:
        await settle(app)
        await pilot.pause()
        if not app.busy:  # type: ignore[attr-defined]
            break
        assert time.monotonic() < deadline, "the job did not finish in time"
        await pilot.pause(0.05)
    await pilot.pause()
