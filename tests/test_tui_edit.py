"""The Textual workbench driven with Pilot on the tiny random GPT-2: the form (and its pure
parts), Compute / Apply, Compare, undo, History's re-apply, the model pane, a small terminal."""

# ruff: noqa: F811  (the fixtures imported from tui_helpers are used as arguments)
from __future__ import annotations

import pytest
import torch

pytest.importorskip("textual")
pytest.importorskip("textual_plotext")

from textual.widgets import Button, DataTable, Input  # noqa: E402
from tui_helpers import (  # noqa: E402, F401
    SIZE,
    app_factory,
    cache_dir,
    fill_eiffel,
    settle,
    text_of,
    type_into,
    wait_idle,
    weight,
)

from workbench.core.forms import field_errors  # noqa: E402
from workbench.core.generation import word_diff  # noqa: E402
from workbench.core.verdict import judge  # noqa: E402
from workbench.store import Store  # noqa: E402
from workbench.tui.screens.dialogs import ConfirmDialog, ErrorDialog  # noqa: E402
from workbench.tui.widgets.form_field import FormField  # noqa: E402
from workbench.tui.widgets.norm_chart import NormChart  # noqa: E402

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
