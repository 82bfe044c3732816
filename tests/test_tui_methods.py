"""The app's methods: MEMIT, EMMET and AlphaEdit chosen in the Edit tab and compared
beside ROME's key modes, driven with Pilot on the tiny random GPT-2 (real models)."""

# ruff: noqa: F811  (the fixtures imported from tui_helpers are used as arguments)
from __future__ import annotations

import math
import re
from pathlib import Path

import pytest
import torch

pytest.importorskip("textual")
pytest.importorskip("textual_plotext")

from textual.widgets import DataTable, Input, Select  # noqa: E402
from tui_helpers import SIZE, app_factory, cache_dir, settle, text_of, wait_idle  # noqa: E402, F401

from workbench.core.forms import FORM_METHODS, EditForm, field_errors  # noqa: E402
from workbench.core.session import NotReapplicableError  # noqa: E402
from workbench.store import Store  # noqa: E402
from workbench.tui.screens.dialogs import ConfirmDialog  # noqa: E402


def _rows() -> tuple[str, ...]:
    """ROME's key modes, then each batch method that can edit tiny GPT-2 (UltraEdit's
    gate / up projections are not in GPT-2: Compare leaves it out)."""
    from rome import Editor, load_model
    from workbench.core.method_compare import cannot_edit, family_methods

    lm = load_model("tiny-gpt2")
    ed = Editor(lm.model, lm.tokenizer, lm.hparams)
    family = [m for m in family_methods() if cannot_edit(m, ed) is None]
    return ("rome/original", "rome/rrome", "rome/prompt", *family)


ROWS = _rows()


def weights(app) -> dict[int, torch.Tensor]:
    _, ed = app.session.require()
    return {x: ed.module(x).weight.detach().clone() for x in range(ed.n_layers)}


def same(a: dict[int, torch.Tensor], b: dict[int, torch.Tensor]) -> bool:
    return all(torch.equal(a[x], b[x]) for x in a)


def test_the_form_carries_the_method() -> None:
    from rome.methods import METHODS

    # the registry's order: ROME and the family first, then the methods as they landed
    assert FORM_METHODS[:4] == ("rome", "memit", "emmet", "alphaedit")
    assert set(FORM_METHODS) == set(METHODS)
    ok = {"prompt": "{} is in", "subject": "X", "target_new": "Rome", "mode": "rrome"}
    assert "method" in field_errors({**ok, "method": "nope"})
    # ROME's layer and key mode are not checked for another method (it edits its preset's)
    assert field_errors({**ok, "method": "memit", "layer": "99", "mode": "?"}, n_layers=4) == {}
    a = EditForm("{} is in", "X", "Rome", method="memit")
    assert a.same_edit(EditForm("{} is in", "X", "Rome", mode="prompt", method="memit"))
    assert not a.same_edit(EditForm("{} is in", "X", "Rome"))
    assert a.with_mode("prompt").method == "memit"


async def test_a_memit_edit_from_the_edit_tab(app_factory) -> None:
    app = app_factory()
    async with app.run_test(size=SIZE) as pilot:
        await wait_idle(app, pilot)
        app.action_example("eiffel")
        await pilot.pause()
        mode, layer = app.query_one("#f-mode", Select), app.query_one("#f-layer", Input)
        assert not mode.disabled and not layer.disabled
        app.edit_pane.choose_method("memit")
        await pilot.pause()
        # ROME's key mode and layer are off; the layer field names memit's layers
        assert mode.disabled and layer.disabled
        assert "memit: layers 1" in layer.placeholder
        assert mode.tooltip and "memit has none" in str(mode.tooltip)
        base = weights(app)
        await pilot.press("f5")
        await wait_idle(app, pilot)
        body = text_of(app.query_one("#edit-result-body"))
        assert "Computed, not applied" in body and "memit" in body and "layer 1" in body
        assert same(base, weights(app)), "computing must not change the model"
        await pilot.press("f7")
        await wait_idle(app, pilot)
        if app.session.n_applied == 0:  # looked disabling: confirm in the dialog
            await pilot.press("y")
            await wait_idle(app, pilot)
        assert app.session.n_applied == 1
        assert "Applied as session edit #1" in text_of(app.query_one("#edit-result-body"))
        after = weights(app)
        assert not same(base, after), "the memit edit did not change the model"
        assert app.session.timeline[-1].mode == "memit"
        assert app.session.editor.applied[-1].update.method == "memit"
        await pilot.pause(0.2)
        await settle(app)
        await pilot.pause()
        table = app.query_one("#history-table", DataTable)
        assert table.row_count == 1
        assert "memit" in [str(c) for c in table.get_row_at(0)]
        # F8 undoes it bit for bit, whatever the method
        await pilot.press("f8")
        await wait_idle(app, pilot)
        assert app.session.n_applied == 0
        assert same(base, weights(app))
        run_id = app.session.run_id
        # History cannot put one request of a batch method back: a clear refusal, no change
        (stored,) = app.session.store.edits(run_id)
        with pytest.raises(NotReapplicableError, match="memit batch"):
            app.session.reapply([(run_id, stored.seq)])
        assert same(base, weights(app)) and app.session.n_applied == 0
    with Store.open(app_factory.db) as store:
        (edit,) = store.edits(run_id)
        assert edit.method_name == "memit" and not edit.applied
        assert edit.record["layer_norms"] and edit.metrics["verdict"]
        (step,) = list(store.iter_steps(run_id, applied_only=False))
        assert step.method == "memit" and [lu.layer for lu in step.layers] == [1]


async def test_compare_shows_the_methods_beside_the_key_modes(app_factory) -> None:
    app = app_factory()
    async with app.run_test(size=(180, 50)) as pilot:
        await wait_idle(app, pilot)
        app.action_example("eiffel")
        await pilot.pause()
        base = weights(app)
        await pilot.press("f6")
        await wait_idle(app, pilot, timeout=300)
        assert app.query_one("#tabs").active == "tab-compare"
        assert same(base, weights(app)), "compare must not change the model"
        rows = app.compare_pane.method_rows
        assert [r.label for r in rows] == list(ROWS)
        for r in rows:
            assert r.layer_norms and all(math.isfinite(n) and n > 0 for n in r.layer_norms.values())
            assert math.isfinite(r.ratio) and r.p_new_before and r.p_new_after
            assert r.verdict in ("ok", "check", "DISABLING", "REFUSED")
            assert r.preset == "tiny-gpt2"  # no <preset>-<method> variant for the tiny model
        # the key modes' rows are the key-mode comparison's own updates (not recomputed)
        for mode in ("original", "rrome", "prompt"):
            row = rows[ROWS.index(f"rome/{mode}")]
            assert row.norm == pytest.approx(app.compare_pane.outcomes[mode].result.update_norm)
        table = app.query_one("#compare-methods-table", DataTable)
        assert table.display and table.row_count == len(ROWS)
        for i, label in enumerate(ROWS):
            line = " ".join(str(c) for c in table.get_row_at(i))
            assert line.startswith(label + " "), line
            assert re.search(r"L1 \d", line), line  # the norm per layer, computed
            assert "→" in line and "%" in line  # p(new) and the efficacy before → after
        assert "Methods on the bare prompt" in text_of(app.query_one("#compare-methods"))
        # the key-mode apply buttons still work after it
        assert app.compare_pane.outcomes


async def compare_eiffel(app, pilot) -> DataTable:
    """F6 on the Eiffel example; the method table, focused (its ``a`` applies a row)."""
    app.action_example("eiffel")
    await pilot.pause()
    await pilot.press("f6")
    await wait_idle(app, pilot, timeout=300)
    assert [r.label for r in app.compare_pane.method_rows] == list(ROWS)
    table = app.query_one("#compare-methods-table", DataTable)
    table.focus()
    await pilot.pause()
    return table


async def apply_row(app, pilot, label: str) -> None:
    """Select the comparison's row ``label`` and press ``a`` (confirming a DISABLING one)."""
    app.compare_pane.select_row(label)
    await pilot.pause()
    assert app.compare_pane.selected_row().label == label
    n = app.session.n_applied
    await pilot.press("a")
    await wait_idle(app, pilot)
    if app.session.n_applied == n and isinstance(app.screen, ConfirmDialog):
        await pilot.press("y")  # looked disabling: confirmed in the dialog
        await wait_idle(app, pilot)


async def test_compare_applies_the_selected_method_row(app_factory) -> None:
    """Compare, select memit's row, ``a``: the compared update itself is applied (not
    recomputed), recorded as the Edit tab's apply records it, equal to the Edit tab's
    memit edit, undone bit for bit; a row of a comparison the model has moved on from
    applies nothing; a ROME key mode's row applies that mode."""
    app = app_factory()
    async with app.run_test(size=(180, 50)) as pilot:
        await wait_idle(app, pilot)
        base = weights(app)
        await compare_eiffel(app, pilot)
        binding = next(b for b in app.compare_pane.BINDINGS if b.id == "compare.apply_row")
        assert binding.key == "a" and binding.tooltip
        row = next(r for r in app.compare_pane.method_rows if r.label == "memit")
        assert row.verdict != "REFUSED", row.reasons
        await apply_row(app, pilot, "memit")
        assert app.session.n_applied == 1
        step = app.session.editor.applied[-1]
        assert step.update is row.updates[0], "the compared update, not a recomputed one"
        from_compare = weights(app)
        assert not same(base, from_compare), "the memit row did not change the model"
        assert [x for x in base if not torch.equal(base[x], from_compare[x])] == [1]
        assert app.session.timeline[-1].mode == "memit"
        body = text_of(app.query_one("#edit-result-body"))
        assert "Applied as session edit #1" in body and "memit" in body
        await pilot.pause(0.2)
        await settle(app)
        await pilot.pause()
        history = app.query_one("#history-table", DataTable)
        assert history.row_count == 1
        assert "memit" in [str(c) for c in history.get_row_at(0)]
        run_id = app.session.run_id
        # F8 undoes it bit for bit
        await pilot.press("f8")
        await wait_idle(app, pilot)
        assert app.session.n_applied == 0 and same(base, weights(app))
        # the comparison was computed before that edit and its undo: stale, nothing applied
        app.notices.clear()
        app.query_one("#compare-methods-table", DataTable).focus()
        for label in ("alphaedit", "rome/rrome"):
            await apply_row(app, pilot, label)
            assert app.session.n_applied == 0 and same(base, weights(app)), label
        assert any("model changed since" in n for n in app.notices), app.notices
        assert any("rome/rrome: this comparison is out of date" in n for n in app.notices)
        # the Edit tab's memit edit on the same weights is the same edit, bit for bit
        app.show_tab("edit")
        app.edit_pane.choose_method("memit")
        await pilot.pause()
        await pilot.press("f7")
        await wait_idle(app, pilot)
        if app.session.n_applied == 0:
            await pilot.press("y")
            await wait_idle(app, pilot)
        assert app.session.n_applied == 1
        assert same(from_compare, weights(app))
        await pilot.press("f8")
        await wait_idle(app, pilot)
        assert same(base, weights(app))
        # a ROME key mode's row applies that mode's update from the comparison
        app.show_tab("edit")
        app.edit_pane.choose_method("rome")
        await pilot.pause()
        await compare_eiffel(app, pilot)
        rrome = app.compare_pane.outcomes["rrome"]
        await apply_row(app, pilot, "rome/rrome")
        assert app.session.n_applied == 1 and app.session.timeline[-1].mode == "rrome"
        assert app.session.editor.applied[-1].update is rrome.update
    with Store.open(app_factory.db) as store:
        edits = store.edits(run_id)
        assert [e.method_name for e in edits] == ["memit", "memit", "rome"]
        assert [e.applied for e in edits] == [False, False, True]
        assert {"prompt_p_new_before", "prompt_p_new_after"} <= set(edits[0].metrics)


async def test_compare_applies_no_refused_row(app_factory) -> None:
    """Every row REFUSED (the preset's max_update_ratio made tiny): ``a`` on a method row
    or a key mode's row says why, and nothing is applied or stored."""
    app = app_factory()
    async with app.run_test(size=(180, 50)) as pilot:
        await wait_idle(app, pilot)
        lm, ed = app.session.require()
        # a preset that refuses every update: the real engine computes them, then refuses
        lm.hparams = ed.hp = lm.hparams.replace(max_update_ratio=1e-9)
        base = weights(app)
        await compare_eiffel(app, pilot)
        assert {r.verdict for r in app.compare_pane.method_rows} == {"REFUSED"}
        rows = {r.label: r for r in app.compare_pane.method_rows}
        for label in ("memit", "alphaedit", "rome/rrome"):
            app.notices.clear()
            await apply_row(app, pilot, label)
            assert app.session.n_applied == 0 and same(base, weights(app)), label
            # refused before any job: the outcome's own reason, not the engine's apply error
            mode = label.removeprefix("rome/")
            o = app.compare_pane.outcomes.get(mode) if mode != label else None
            reason = o.verdict.summary if o else "; ".join(rows[label].reasons)
            assert "limit 1e-09" in reason and app.notices == [reason], app.notices
        assert app.session.timeline == [] and app.session.run_id is None


async def test_the_replay_tab_key_mode_is_rome_only(app_factory) -> None:
    app = app_factory(autoload=False)
    async with app.run_test(size=SIZE) as pilot:
        await pilot.pause()
        app.show_tab("replay")
        method, mode = app.query_one("#r-method", Select), app.query_one("#r-mode", Select)
        assert method.value == "rome" and not mode.disabled
        method.value = "alphaedit"
        await pilot.pause()
        assert mode.disabled and "alphaedit has none" in str(mode.tooltip)
        method.value = "rome"
        await pilot.pause()
        assert not mode.disabled


def test_a_method_preset_of_its_own_edits_its_layers_and_undo_restores_its_state(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The headless part: a method whose preset is not the session's (here the tiny
    family preset, layers 0-1) computes on a variant of the session's editor; the
    session applies and undoes its step over both layers, and AlphaEdit's carried K Kᵀ
    goes back on undo."""
    from rome import load_preset
    from workbench.core.method_compare import family_methods
    from workbench.core.session import Session

    monkeypatch.setenv("ROME_WORKBENCH_CACHE", str(tmp_path / "cache"))
    with Store.open(tmp_path / "s.db") as store:
        session = Session(store)
        session.load("tiny-gpt2", device="cpu")
        lm, ed = session.require()
        lm.hparams = load_preset("tiny-gpt2-family")  # memit, emmet, alphaedit on layers 0-1
        layers = session.method_layers(family_methods())
        assert layers["alphaedit"] == ("tiny-gpt2-family", [0, 1])
        base = {x: ed.module(x).weight.detach().clone() for x in (0, 1)}
        form = EditForm(
            "{} is located in the city of", "The Eiffel Tower", "Rome", "Paris", method="alphaedit"
        )
        outcome = session.compute(form)
        med = session.editor_for("alphaedit")
        assert med is not ed and med.hp.name == "tiny-gpt2-family"
        assert sorted(outcome.layer_norms) == [0, 1] and outcome.preset == "tiny-gpt2-family"
        assert all(torch.equal(base[x], ed.module(x).weight) for x in (0, 1))
        assert not med.method_state.get("alphaedit")
        info = session.apply(outcome, generate=False)
        assert info.run_id is not None and session.n_applied == 1
        assert all(not torch.equal(base[x], ed.module(x).weight) for x in (0, 1))
        assert sorted(med.method_state["alphaedit"]) == [0, 1]  # K Kᵀ carried per layer
        session.undo()  # the carried state goes back with the weights: nothing to sync
        assert all(torch.equal(base[x], ed.module(x).weight) for x in (0, 1))
        assert not med.method_state.get("alphaedit")
        (step,) = list(store.iter_steps(info.run_id, applied_only=False))
        assert step.method == "alphaedit" and [lu.layer for lu in step.layers] == [0, 1]
        session.finish()
