"""What a newcomer hits in the app, each fixed and driven here with Pilot (tiny GPT-2).

Nothing on the terminal outside Textual; the cursor in the Prompt field once the
model is loaded; tab keys that work in a text field; Apply after Compare without
recomputing; "Save model…"; store reads off the UI thread; bindings described.
"""

# ruff: noqa: F811  (the fixtures imported from tui_helpers are used as arguments)
from __future__ import annotations

import logging
import os
import threading
from pathlib import Path

import pytest

pytest.importorskip("textual")
pytest.importorskip("textual_plotext")

from textual.widgets import Input, Select  # noqa: E402
from tui_helpers import SIZE, app_factory, cache_dir, settle, text_of, wait_idle  # noqa: E402, F401

from workbench.store import Store  # noqa: E402
from workbench.tui.app import WorkbenchApp  # noqa: E402
from workbench.tui.panes.history import metric_lines  # noqa: E402
from workbench.tui.panes.replay import summary_text  # noqa: E402
from workbench.tui.screens.dialogs import ConfirmDialog, ErrorDialog  # noqa: E402
from workbench.tui.screens.help import HelpScreen  # noqa: E402
from workbench.tui.screens.save import SaveDialog  # noqa: E402


async def apply_example(app: WorkbenchApp, pilot, key: str = "eiffel") -> None:
    """Once the model is loaded: fill the form with an example and apply it (F7)."""
    await wait_idle(app, pilot)
    app.action_example(key)
    await pilot.pause()
    await pilot.press("f7")
    await wait_idle(app, pilot)


# --------------------------------------------------------------------------- the terminal


async def test_no_log_line_reaches_the_terminal(app_factory, tmp_path: Path) -> None:
    """The CLI's stderr handler and a library's own one are swapped for the log file."""
    log_file = tmp_path / "tui.log"
    captured = tmp_path / "fd2.txt"
    root = logging.getLogger()
    lib = logging.getLogger("test.some_library")
    old_level, old_propagate = root.level, lib.propagate
    saved_fd = os.dup(2)
    with open(captured, "w") as f:
        os.dup2(f.fileno(), 2)  # whatever reaches file descriptor 2 lands in the file
    stream = open(2, "w", buffering=1, closefd=False)  # noqa: SIM115
    cli_handler = logging.StreamHandler(stream)  # as logging.basicConfig(stream=sys.stderr)
    lib_handler = logging.StreamHandler(stream)  # as transformers' own handler
    try:
        root.addHandler(cli_handler)
        root.setLevel(logging.WARNING)
        lib.addHandler(lib_handler)
        lib.propagate = False
        app = app_factory(log_file=log_file)
        async with app.run_test(size=SIZE) as pilot:
            await wait_idle(app, pilot)  # the load logs INFO (templates, covariance)
            assert logging.getLogger().level <= logging.INFO
            done = threading.Event()

            def from_a_worker() -> None:
                logging.getLogger("rome.covariance").info("an INFO line from a worker")
                lib.warning("a library's warning")
                done.set()

            app.run_worker(from_a_worker, thread=True)
            await settle(app)
            assert done.is_set()
            await pilot.pause()
        stream.flush()
        # afterwards everything is as it was
        assert cli_handler in root.handlers and root.level == logging.WARNING
        assert lib_handler in lib.handlers
        assert not any(isinstance(h, logging.FileHandler) for h in lib.handlers)
    finally:
        os.dup2(saved_fd, 2)
        os.close(saved_fd)
        root.removeHandler(cli_handler)
        lib.removeHandler(lib_handler)
        root.setLevel(old_level)
        lib.propagate = old_propagate
        stream.close()
    assert captured.read_text() == ""
    logged = log_file.read_text()
    assert "an INFO line from a worker" in logged
    assert "a library's warning" in logged
    assert "rome.templates" in logged or "rome.covariance" in logged


# --------------------------------------------------------------------------- focus and tabs


async def test_prompt_field_has_the_cursor_after_load(app_factory) -> None:
    app = app_factory()
    async with app.run_test(size=SIZE) as pilot:
        await wait_idle(app, pilot)
        assert app.query_one("#tabs").active == "tab-edit"
        assert app.focused is app.query_one("#f-prompt", Input)
        await pilot.press(*"{} plays the sport of")
        assert app.query_one("#f-prompt", Input).value == "{} plays the sport of"
        assert app.query_one("#f-example", Select).is_blank()  # no dropdown opened by space


async def test_tab_keys_work_in_a_text_field(app_factory) -> None:
    app = app_factory(autoload=False)
    async with app.run_test(size=SIZE) as pilot:
        await pilot.pause()
        app.show_tab("edit")
        app.query_one("#f-layer", Input).focus()
        await pilot.press("3")  # a digit in a field is typed, not a tab switch
        await pilot.pause()
        assert app.query_one("#f-layer", Input).value == "3"
        assert app.query_one("#tabs").active == "tab-edit"
        app.query_one("#f-subject", Input).focus()
        await pilot.pause()  # the focus settles first (it would bring its tab back)
        await pilot.press("f4")
        await pilot.pause()
        assert app.query_one("#tabs").active == "tab-compare"
        await pilot.press("f3", "f3")
        await pilot.pause()
        assert app.query_one("#tabs").active == "tab-model"
        await pilot.press("f3")  # wraps around
        await pilot.pause()
        assert app.query_one("#tabs").active == "tab-runs"
        app.show_tab("edit")
        app.query_one("#f-subject", Input).focus()
        await pilot.pause()  # the focus settles first (it would bring its tab back)
        await pilot.press("alt+6")
        await pilot.pause()
        assert app.query_one("#tabs").active == "tab-history"
        assert app.query_one("#f-subject", Input).value == ""
        # the footer shows the tab keys
        shown = {k for k, b in app.active_bindings.items() if b.binding.show}
        assert {"f3", "f4"} <= shown
        # not while a dialog is open
        tabs = app.query_one("#tabs")
        await pilot.press("f1")
        await pilot.pause()
        assert isinstance(app.screen, HelpScreen)
        await pilot.press("f4")
        await pilot.pause()
        assert tabs.active == "tab-history"


def test_every_binding_has_an_id_and_a_tooltip() -> None:
    from workbench.tui.screens.dialogs import ConfirmDialog as Confirm

    for owner in (WorkbenchApp, Confirm, ErrorDialog, HelpScreen, SaveDialog):
        for binding in owner.BINDINGS:
            assert binding.id, f"{owner.__name__}: {binding.key} has no id"  # type: ignore[union-attr]
            assert binding.tooltip or binding.description, binding.key  # type: ignore[union-attr]
            assert binding.tooltip, f"{owner.__name__}: {binding.key} has no tooltip"  # type: ignore[union-attr]


# --------------------------------------------------------------------------- apply after compare


async def test_apply_after_compare_uses_the_compared_result(app_factory) -> None:
    app = app_factory()
    async with app.run_test(size=SIZE) as pilot:
        await wait_idle(app, pilot)
        _, ed = app.session.require()
        calls = {"compute": 0, "compare": 0}
        compute, compare = ed.edit, ed.compare  # every computed step goes through Editor.edit

        def counting_compute(*a, **kw):
            calls["compute"] += 1
            return compute(*a, **kw)

        def counting_compare(*a, **kw):
            calls["compare"] += 1
            return compare(*a, **kw)

        ed.edit, ed.compare = counting_compute, counting_compare  # type: ignore[method-assign]
        app.action_example("eiffel")
        await pilot.pause()
        await pilot.press("f6")
        await wait_idle(app, pilot)
        assert calls["compare"] == 1  # ROME's key modes in one call
        compared = dict(calls)  # (Compare's family rows are steps through Editor.edit)
        # choose one of the compared modes in the form (still the compared edit)
        outcomes = app.compare_pane.outcomes
        mode = next((m for m, o in outcomes.items() if not o.verdict.disabling), "rrome")
        app.query_one("#f-mode", Select).value = mode
        await pilot.pause()
        await pilot.press("f7")
        await pilot.pause()
        if isinstance(app.screen, ConfirmDialog):  # every mode looks disabling on this model
            await pilot.press("y")
        await wait_idle(app, pilot)
        assert calls == compared, "F7 recomputed the compared edit"
        assert app.session.n_applied == 1
        assert app.session.timeline[-1].mode == mode
        assert app.session.editor.applied[-1].result is outcomes[mode].result
        # a changed form is computed again
        await pilot.press("f8")
        await wait_idle(app, pilot)
        app.query_one("#f-target_new", Input).value = "Berlin"
        await pilot.pause()
        await pilot.press("f7")
        await wait_idle(app, pilot)
        assert calls["compute"] == compared["compute"] + 1


# --------------------------------------------------------------------------- store reads


async def test_store_reads_run_off_the_ui_thread(app_factory, monkeypatch) -> None:
    on_main: list[str] = []
    main = threading.main_thread()
    for name in ("get_run", "list_runs", "edits", "checkpoints", "recover_stale_runs"):
        original = getattr(Store, name)

        def spy(self, *a, _original=original, _name=name, **kw):
            if threading.current_thread() is main:
                on_main.append(_name)
            return _original(self, *a, **kw)

        monkeypatch.setattr(Store, name, spy)
    app = app_factory()
    async with app.run_test(size=SIZE) as pilot:
        await apply_example(app, pilot)
        app.action_refresh_history()
        app.show_tab("replay")
        await settle(app)
        await pilot.pause()
        assert app.history_pane.ordered
    assert on_main == []


# --------------------------------------------------------------------------- save model


async def test_save_model_from_the_history(app_factory, tmp_path: Path) -> None:
    out = tmp_path / "edited"
    app = app_factory()
    async with app.run_test(size=SIZE) as pilot:
        await apply_example(app, pilot)
        app.show_tab("history")
        await settle(app)
        await pilot.pause()
        await pilot.click("#hist-save")
        await pilot.pause()
        assert isinstance(app.screen, SaveDialog)
        app.screen.query_one("#save-dir", Input).value = str(out)
        await pilot.press("enter")
        await wait_idle(app, pilot)
        assert not isinstance(app.screen, ErrorDialog), getattr(app.screen, "message", "")
        assert any("Model saved" in m or "written to" in m for m in app.notices)
    assert (out / "config.json").is_file()
    assert "The Eiffel Tower" in (out / "README.md").read_text()


# --------------------------------------------------------------------------- pre → post


def test_history_details_show_pre_and_post() -> None:
    metrics = {
        "es": 1.0,
        "ps": 0.5,
        "ns": 0.75,
        "pre": {"es": 0.0, "ps": 0.25, "ns": 1.0},
        "w_delta_norm": 12.5,
        "w_norm_ratio": 1.01,
    }
    lines = dict(metric_lines(metrics))
    assert lines["pre → post"] == "ES 0→1 · PS 0.25→0.5 · NS 1→0.75"
    assert "‖W−W₀‖ 12.5" in lines["weights"]
    # an edit stored before pre-edit metrics existed keeps today's line
    assert dict(metric_lines({"es": 1.0}))["CounterFact"] == "ES 1"


def test_replay_summary_names_the_protocols() -> None:
    text = summary_text(
        {
            "edits_done": 3,
            "survived": 2.0,
            "post": {"es": 1.0, "s": 0.8},
            "pre": {"es": 0.0, "s": 0.1},
            "final": {"es": 0.67, "s": 0.5},
        }
    )
    assert text == "3 edits · immediate: ES 0→1 S 0.1→0.8 · end of stream: ES 0.67 S 0.5 (2 hold)"
