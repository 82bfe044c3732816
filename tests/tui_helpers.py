"""What the app test modules share: the app made on the tiny random GPT-2 (``app_factory``,
one cache per module), filling the form, reading a widget's text, and waiting for the
app's workers to settle."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import pytest
import torch
from rich.console import Console
from textual.app import App
from textual.widgets import Input
from textual.worker import WorkerCancelled

from workbench.tui.app import WorkbenchApp

SIZE = (120, 40)


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One cache for the module: the tiny model's covariance is computed once."""
    return tmp_path_factory.mktemp("rwb-cache")


@pytest.fixture
def app_factory(cache_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setenv("ROME_WORKBENCH_CACHE", str(cache_dir))
    db = tmp_path / "wb.db"

    def make(**kw) -> WorkbenchApp:
        kw.setdefault("model", "tiny-gpt2")
        kw.setdefault("device", "cpu")
        app = WorkbenchApp(db_path=db, **kw)
        notices: list[str] = []
        notify = app.notify

        def recording_notify(message, *args, **kwargs):
            notices.append(str(message))
            return notify(message, *args, **kwargs)

        app.notify = recording_notify  # type: ignore[method-assign]
        app.notices = notices  # type: ignore[attr-defined]
        return app

    make.db = db  # type: ignore[attr-defined]
    return make


def text_of(widget) -> str:
    """The plain text a Static shows."""
    console = Console(width=200, record=True, file=open("/dev/null", "w"))  # noqa: SIM115
    console.print(widget.content)
    return console.export_text()


async def type_into(pilot, selector: str, text: str) -> None:
    app = pilot.app
    widget = app.query_one(selector, Input)
    widget.focus()
    widget.value = ""
    await pilot.pause()
    await pilot.press(*list(text))


async def fill_eiffel(pilot, prompt: str = "{} is located in the city of") -> None:
    await type_into(pilot, "#f-prompt", prompt)
    await type_into(pilot, "#f-subject", "The Eiffel Tower")
    await type_into(pilot, "#f-target_new", "Rome")
    await type_into(pilot, "#f-target_true", "Paris")
    await type_into(pilot, "#f-neighbourhood", "The Louvre is located in the city of")


def weight(app: WorkbenchApp) -> torch.Tensor:
    lm, ed = app.session.require()
    return ed.module(lm.hparams.layer).weight.detach().clone()


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
