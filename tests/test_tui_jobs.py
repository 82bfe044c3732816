"""The Textual workbench driven with Pilot on the tiny random GPT-2: a replay's charts and
its run, cancel and resume, and keys, worker errors and quit while a long job runs."""

# ruff: noqa: F811  (the fixtures imported from tui_helpers are used as arguments)
from __future__ import annotations

import threading
import time

import pytest
import torch

pytest.importorskip("textual")
pytest.importorskip("textual_plotext")

from textual.widgets import DataTable, Input, Tabs  # noqa: E402
from tui_helpers import SIZE, app_factory, cache_dir, settle, text_of, wait_idle, weight  # noqa: E402, F401

from workbench.store import Store  # noqa: E402
from workbench.tui.screens.dialogs import ConfirmDialog, ErrorDialog  # noqa: E402
from workbench.tui.screens.help import HelpScreen  # noqa: E402
from workbench.tui.widgets.norm_chart import NormChart  # noqa: E402


async def test_replay_updates_charts_and_writes_run(app_factory) -> None:
    app = app_factory()
    async with app.run_test(size=SIZE) as pilot:
        await wait_idle(app, pilot)
        base = weight(app)
        app.show_tab("replay")
        await pilot.pause()
        pane = app.replay_pane
        pane.query_one("#r-n_edits", Input).value = "3"
        pane.query_one("#r-glue_every", Input).value = "2"
        pane.query_one("#r-glue_limit", Input).value = "4"
        for task in ("mrpc", "cola", "rte"):
            pane.query_one(f"#r-task-{task}").value = False
        await pilot.pause()
        await pilot.click("#replay-start")
        await wait_idle(app, pilot, timeout=300)
        series = pane.all_series()
        assert len(series) == 1
        s = series[0]
        assert [n for n, _ in s.norms] == [1, 2, 3]
        assert "sst2" in s.glue and [step for step, _ in s.glue["sst2"]] == [0, 2, 3]
        # the collapse probes and the drift of the edited matrix are charted too
        assert [step for step, _ in s.perplexity] == [0, 2, 3]
        assert [step for step, _ in s.fluency] == [0, 2, 3]
        assert [n for n, _ in s.drift] == [1, 2, 3]
        assert any("‖W−W₀‖" in n.label for n in pane.query_one(NormChart).series)
        assert pane.query_one(NormChart).series
        assert "finished" in text_of(pane.query_one("#replay-status"))
        assert torch.equal(base, weight(app)), "the replay's edits are taken off the model"
        await pilot.pause(0.2)
        await settle(app)
        await pilot.pause()
        assert pane.query_one("#replay-runs", DataTable).row_count == 1
    with Store.open(app_factory.db) as store:
        (run,) = store.list_runs(kind="replay")
        assert run.status == "finished" and run.n_edits == 3
        tasks = {c.task for c in store.checkpoints(run.id)}
        assert tasks == {"sst2", "fluency", "perplexity", "retention"}


async def test_cancel_keeps_finished_edits_and_resume(app_factory) -> None:
    app = app_factory()
    async with app.run_test(size=SIZE) as pilot:
        await wait_idle(app, pilot)
        pane = app.replay_pane
        pane.query_one("#r-n_edits", Input).value = "8"
        pane.query_one("#r-glue_every", Input).value = "100"
        pane.query_one("#r-glue_limit", Input).value = "2"
        for task in ("mrpc", "cola", "rte"):
            pane.query_one(f"#r-task-{task}").value = False
        await pilot.pause()
        app.action_start_replay()
        deadline = time.monotonic() + 120
        while not (pane.live and pane.live.norms):
            assert time.monotonic() < deadline
            await pilot.pause(0.05)
        await pilot.press("escape")
        await wait_idle(app, pilot, timeout=120)
        assert "cancelled" in text_of(pane.query_one("#replay-status"))
        done = len(pane.all_series()[0].norms)
        assert 1 <= done < 8
        with Store.open(app_factory.db) as store:
            (run,) = store.list_runs(kind="replay")
            assert run.status == "cancelled"
            assert run.n_edits == done
            assert len(list(store.iter_factors(run.id))) == done
        # the stopped run is offered for resuming: select it and resume
        await settle(app)
        await pilot.pause()
        assert pane.selected_run() == run.id
        await pilot.click("#run-resume")
        await wait_idle(app, pilot, timeout=120)
        assert "finished" in text_of(pane.query_one("#replay-status"))
        assert [n for n, _ in pane.all_series()[-1].norms] == list(range(1, 9))
    with Store.open(app_factory.db) as store:
        run = store.get_run(run.id)
        assert run.status == "finished" and run.n_edits == 8


async def test_key_press_handled_while_a_long_job_runs(app_factory, monkeypatch) -> None:
    app = app_factory()
    async with app.run_test(size=SIZE) as pilot:
        await wait_idle(app, pilot)
        app.action_example("eiffel")
        await pilot.pause()
        release = threading.Event()
        steps = []

        def slow_compute(form, progress=None):
            for i in range(400):  # ~20 s at most; cancelled long before
                if release.is_set():
                    break
                time.sleep(0.05)
                steps.append(i)
                if progress:
                    progress("v*", i, 400)
            raise AssertionError("not cancelled")

        monkeypatch.setattr(app.session, "compute", slow_compute)
        await pilot.press("f5")
        await pilot.pause(0.2)
        assert app.busy
        await pilot.press("f1")  # the UI answers while the worker runs
        await pilot.pause()
        assert isinstance(app.screen, HelpScreen)
        await pilot.press("escape")
        await pilot.pause()
        app.query_one(Tabs).focus()  # the cursor is in the Prompt field after the load
        await pilot.pause()
        await pilot.press("3")
        await pilot.pause()
        assert app.query_one("#tabs").active == "tab-compare"
        job = app.jobs.current
        await pilot.press("f5")  # disabled while busy (dimmed in the footer)
        await pilot.pause()
        assert app.jobs.current is job
        app.action_compute()  # from the palette: refused with a message
        await pilot.pause()
        assert any("running" in m for m in app.notices)
        await pilot.press("escape")  # cancel between two steps
        await wait_idle(app, pilot, timeout=30)
        release.set()
        assert not app.busy
        assert len(steps) < 400
        assert app.session.n_applied == 0


async def test_worker_errors_become_messages(app_factory, monkeypatch) -> None:
    from rome import UnsafeUpdateError

    app = app_factory()
    async with app.run_test(size=SIZE) as pilot:
        await wait_idle(app, pilot)
        app.action_example("eiffel")
        await pilot.pause()

        def refuse(form, progress=None):
            raise UnsafeUpdateError("refused to apply: the update norm is 50x the weight's norm")

        monkeypatch.setattr(app.session, "compute", refuse)
        await pilot.press("f5")
        await wait_idle(app, pilot)
        assert any("rrome or prompt" in m for m in app.notices)

        def crash(form, progress=None):
            raise RuntimeError("something odd")

        monkeypatch.setattr(app.session, "compute", crash)
        await pilot.press("f5")
        await wait_idle(app, pilot)
        assert isinstance(app.screen, ErrorDialog)
        assert "RuntimeError: something odd" in app.screen.message
        await pilot.press("enter")
        await pilot.pause()
        assert not isinstance(app.screen, ErrorDialog)


async def test_quit_asks_while_a_job_runs(app_factory, monkeypatch) -> None:
    app = app_factory()
    async with app.run_test(size=SIZE) as pilot:
        await wait_idle(app, pilot)
        release = threading.Event()

        def slow(prompts, max_new_tokens=24):
            release.wait(10)
            return ["x"] * len(prompts)

        monkeypatch.setattr(app.session, "generate", slow)
        app.query_one("#gen-prompt", Input).value = "Hello"
        await pilot.press("f9")
        await pilot.pause()
        assert app.busy
        app.query_one(Tabs).focus()  # the cursor is in the Prompt field after the load
        await pilot.pause()
        await pilot.press("q")
        await pilot.pause()
        assert isinstance(app.screen, ConfirmDialog)
        await pilot.press("n")
        await pilot.pause()
        assert not isinstance(app.screen, ConfirmDialog)
        release.set()
        await wait_idle(app, pilot)
        assert "x" in text_of(app.query_one("#gen-own"))
