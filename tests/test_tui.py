"""The Textual workbench driven with Pilot on the tiny random GPT-2."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import pytest
import torch
from rich.console import Console

pytest.importorskip("textual")
pytest.importorskip("textual_plotext")

from textual.widgets import Button, DataTable, Input, Tabs  # noqa: E402
from tui_helpers import settle, wait_idle  # noqa: E402

from workbench.core.forms import field_errors  # noqa: E402
from workbench.core.generation import word_diff  # noqa: E402
from workbench.core.verdict import judge  # noqa: E402
from workbench.store import Store  # noqa: E402
from workbench.tui.app import WorkbenchApp  # noqa: E402
from workbench.tui.screens.dialogs import ConfirmDialog, ErrorDialog  # noqa: E402
from workbench.tui.screens.help import HelpScreen  # noqa: E402
from workbench.tui.widgets.form_field import FormField  # noqa: E402
from workbench.tui.widgets.norm_chart import NormChart  # noqa: E402

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


# --------------------------------------------------------------------------- pure parts


def test_field_errors_name_the_field() -> None:
    ok = {"prompt": "{} is in", "subject": "X", "target_new": "Rome", "mode": "rrome"}
    assert field_errors(ok) == {}
    bad = field_errors({**ok, "prompt": "X is in"})
    assert "{}" in bad["prompt"]
    assert "subject" in field_errors({**ok, "subject": " "})
    assert "target_new" in field_errors({**ok, "target_new": ""})
    assert "target_true" in field_errors({**ok, "target_true": "Rome"})
    assert "layer" in field_errors({**ok, "layer": "7"}, n_layers=4)


def test_word_diff_marks_changes() -> None:
    left, right = word_diff("in the city of Paris.", "in the city of Rome.")
    assert ("Paris", "removed") in left
    assert ("Rome", "added") in right


def test_judge_flags_disabling_mode() -> None:
    class R:
        def __init__(self, mode, norm, ratio, cos=0.9):
            self.mode, self.update_norm, self.update_norm_ratio = mode, norm, ratio
            self.cos_kstar_ks, self.unsafe_reason = cos, None

    rs = [R("original", 254, 1.48, 0.15), R("rrome", 29, 0.17, 0.15), R("prompt", 30, 0.17, 0.15)]
    verdicts = {r.mode: judge(r, others=rs) for r in rs}  # type: ignore[arg-type]
    assert verdicts["original"].disabling
    assert not verdicts["rrome"].disabling and not verdicts["prompt"].disabling


# --------------------------------------------------------------------------- the app


async def test_fill_form_and_apply_edit(app_factory) -> None:
    app = app_factory()
    async with app.run_test(size=SIZE) as pilot:
        await wait_idle(app, pilot)
        assert app.session.loaded
        app.show_tab("edit")
        await fill_eiffel(pilot)
        before = weight(app)
        await pilot.press("f7")
        await wait_idle(app, pilot)
        assert app.session.n_applied == 1
        body = text_of(app.query_one("#edit-result-body"))
        assert "Applied as session edit #1" in body
        assert "‖ΔW‖" in body and "neighbour" in body
        assert not torch.equal(before, weight(app))
        # the history tab shows the stored row
        await pilot.pause(0.2)
        await settle(app)
        await pilot.pause()
        table = app.query_one("#history-table", DataTable)
        assert table.row_count == 1
        # the generation tab has before / after continuations
        assert "Edit #1" in text_of(app.query_one("#gen-title"))
        # the weights tab charts the norm
        assert app.query_one("#weights-chart", NormChart).series
    with Store.open(app_factory.db) as store:
        runs = store.list_runs(kind="session")
        assert len(runs) == 1 and runs[0].status == "finished"
        edits = store.edits(runs[0].id)
        assert [e.request["subject"] for e in edits] == ["The Eiffel Tower"]
        assert edits[0].applied and edits[0].has_factors
        assert store.generations(runs[0].id)


async def test_compare_shows_three_modes(app_factory) -> None:
    app = app_factory()
    async with app.run_test(size=SIZE) as pilot:
        await wait_idle(app, pilot)
        app.action_example("eiffel")
        await pilot.pause()
        before = weight(app)
        await pilot.press("f6")
        await wait_idle(app, pilot)
        assert app.query_one("#tabs").active == "tab-compare"
        body = text_of(app.query_one("#compare-body"))
        for mode in ("original", "rrome", "prompt"):
            assert mode in body
        for row in (
            "‖ΔW‖ / ‖W‖",
            "denominator",
            "cos(k*, k(s))",
            "paraphrase p(new)",
            "neighbour p(true)",
            "verdict",
        ):
            assert row in body
        assert set(app.compare_pane.outcomes) == {"original", "rrome", "prompt"}
        assert torch.equal(before, weight(app)), "compare must not change the model"
        enabled = [
            b.id for b in app.query("#compare-buttons Button").results(Button) if not b.disabled
        ]
        assert "compare-discard" in enabled
        # apply one mode from the comparison
        mode = next(m for m, o in app.compare_pane.outcomes.items() if not o.verdict.disabling)
        await pilot.click(f"#apply-{mode}")
        await wait_idle(app, pilot)
        assert app.session.n_applied == 1
        assert app.session.timeline[-1].mode == mode


async def test_bad_input_marks_field_and_edits_nothing(app_factory) -> None:
    app = app_factory()
    async with app.run_test(size=SIZE) as pilot:
        await wait_idle(app, pilot)
        app.show_tab("edit")
        await fill_eiffel(pilot, prompt="The Eiffel Tower is located in the city of")
        before = weight(app)
        await pilot.press("f7")
        await pilot.pause()
        assert not app.busy
        field = app.query_one("#ff-prompt", FormField)
        assert field.has_class("-error")
        assert "{}" in field.error
        assert app.query_one("#f-prompt", Input).has_class("-invalid")
        await wait_idle(app, pilot)
        assert app.session.n_applied == 0
        assert torch.equal(before, weight(app))
        # fixing the field clears the error
        await type_into(pilot, "#f-prompt", "{} is located in")
        await pilot.pause()
        assert not field.has_class("-error")
    with Store.open(app_factory.db) as store:
        assert all(not store.edits(r.id) for r in store.list_runs())


async def test_undo_restores_weights(app_factory) -> None:
    app = app_factory()
    async with app.run_test(size=SIZE) as pilot:
        await wait_idle(app, pilot)
        app.action_example("eiffel")
        await pilot.pause()
        base = weight(app)
        await pilot.press("f7")
        await wait_idle(app, pilot)
        assert app.session.n_applied == 1
        assert not torch.equal(base, weight(app))
        await pilot.press("f8")
        await wait_idle(app, pilot)
        assert app.session.n_applied == 0
        assert torch.equal(base, weight(app))
        assert "Computed, not applied" in text_of(app.query_one("#edit-result-body"))
        run_id = app.session.run_id
    with Store.open(app_factory.db) as store:
        (edit,) = store.edits(run_id)
        assert not edit.applied


async def test_actions_before_a_model_is_loaded(app_factory) -> None:
    app = app_factory(autoload=False)
    async with app.run_test(size=SIZE) as pilot:
        await pilot.pause()
        app.action_example("hamlet")
        await pilot.pause()
        await pilot.press("f5")
        await pilot.pause()
        assert not app.busy
        messages = app.notices
        assert any("Load a model first" in m for m in messages)
        assert app.query_one("#f-subject", Input).value == "Hamlet"
        titles = {c.title for c in app.get_system_commands(app.screen)}
        assert {
            "Compute edit",
            "Compare key modes and methods",
            "Apply edit",
            "Undo last edit",
            "Start replay",
            "Go to History",
            "Example: Hamlet → Charles Dickens",
        } <= titles


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


async def test_reapply_history_onto_a_fresh_model(app_factory) -> None:
    first = app_factory()
    async with first.run_test(size=SIZE) as pilot:
        await wait_idle(first, pilot)
        first.action_example("eiffel")
        await pilot.pause()
        await pilot.press("f7")
        await wait_idle(first, pilot)
        assert first.session.n_applied == 1
        edited = weight(first)
    second = app_factory()
    async with second.run_test(size=SIZE) as pilot:
        await wait_idle(second, pilot)
        base = weight(second)
        assert not torch.equal(base, edited)
        second.show_tab("history")
        await settle(second)
        await pilot.pause()
        table = second.query_one("#history-table", DataTable)
        assert table.row_count == 1
        await pilot.click("#hist-reapply")
        await wait_idle(second, pilot)
        assert second.session.n_applied == 1
        assert torch.equal(weight(second), edited)
        # revert everything (asks first)
        second.action_revert_all()
        await pilot.pause()
        assert isinstance(second.screen, ConfirmDialog)
        await pilot.press("y")
        await wait_idle(second, pilot)
        assert second.session.n_applied == 0
        assert torch.equal(weight(second), base)


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


async def test_small_terminal_layout(app_factory) -> None:
    app = app_factory()
    async with app.run_test(size=(80, 24)) as pilot:
        await wait_idle(app, pilot)
        assert app.screen.has_class("-narrow")
        for tab in ("model", "edit", "compare", "generate", "weights", "history", "replay", "runs"):
            app.show_tab(tab)
            await pilot.pause()
        app.action_example("eiffel")
        await pilot.pause()
        await pilot.press("f5")
        await wait_idle(app, pilot)
        assert "Computed, not applied" in text_of(app.query_one("#edit-result-body"))


async def test_model_pane_device_map_reaches_the_load(app_factory) -> None:
    from textual.widgets import Select

    app = app_factory(autoload=False, device_map="balanced")
    async with app.run_test(size=SIZE) as pilot:
        await pilot.pause()
        choice = app.query_one("#model-device-map", Select)
        assert choice.value == "balanced"  # the top-level --device-map is the default
        await pilot.press("f2")
        await wait_idle(app, pilot)
        # the tiny in-process model takes no device map: the refusal names it, nothing loaded
        shown = app.notices + ([app.screen.message] if isinstance(app.screen, ErrorDialog) else [])
        assert any("device maps do not apply" in m for m in shown), shown
        assert app.session.lm is None
        if isinstance(app.screen, ErrorDialog):
            await pilot.press("enter")
            await pilot.pause()
        choice.value = "none"
        await pilot.press("f2")
        await wait_idle(app, pilot)
        assert app.session.lm is not None and app.session.lm.device_map is None
