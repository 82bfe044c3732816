"""A method is one file: a toy method, defined and registered here alone, runs everywhere.

``HalfMemit`` is MEMIT with each layer's update scaled (½ by default, a setting of
its own). Nothing else in the project names it. It goes through ``edit --method``
(with ``--opt``), a batched replay killed part-way and resumed onto ``torch.equal``
weights, ``export`` (CSV with its method and step columns) and ``report``.
"""

from __future__ import annotations

import csv
import io
import json
import threading
from dataclasses import dataclass
from typing import Any

import pytest
import torch
from typer.testing import CliRunner

from evals.replay import EditDone, ReplayConfig, ReplayFinished, ReplayStarted, replay
from rome import Editor, EditRequest, load_model, load_preset
from rome.context import EditContext
from rome.methods import register, setting, unregister
from rome.methods.family import LayerContext, Solved
from rome.methods.memit import Memit, MemitSettings
from workbench.cli import app
from workbench.store import Store


# ------------------------------------------------------------------ the whole method
@dataclass(frozen=True)
class HalfSettings(MemitSettings):
    scale: float = setting(0.5, "the factor on MEMIT's update", low=0.0, inclusive=False)


class HalfMemit(Memit):
    name = "half-memit"
    summary = "memit's update times a factor"
    Settings = HalfSettings

    def solve(self, ctx: EditContext, lc: LayerContext, settings: Any) -> Solved:
        s = super().solve(ctx, lc, settings)
        return Solved(s.U * settings.scale, s.V, s.info)


# ------------------------------------------------------------------ the proof
NAME = HalfMemit.name
REQ = EditRequest("{} is located in the city of", "The Eiffel Tower", "Rome", "Paris")
CFG = dict(
    n_edits=6, glue_every=4, glue_tasks=("sst2",), glue_limit=4, fluency_tokens=8,
    batch_size=2, retention_size=2, perplexity=False,
)  # fmt: skip


@pytest.fixture(autouse=True)
def registered():
    register(HalfMemit())
    yield
    unregister(NAME)


def test_its_update_is_memits_scaled_by_its_setting():
    lm = load_model("tiny-gpt2")
    hp = load_preset("tiny-gpt2-family").replace(layers=[1])
    ed = Editor(lm.model, lm.tokenizer, hp, cache_dir=None)
    full, half = ed.edit([REQ], "memit"), ed.edit([REQ], NAME, scale=0.25)
    # one layer: the same keys, z and residual; the factor is exact in float32
    assert torch.equal(half.layers[0].delta(), full.layers[0].delta() * 0.25)
    assert half.options["scale"] == 0.25


def test_edit_method_with_its_setting_on_the_cli(tmp_path):
    path = tmp_path / "tiny.json"
    path.write_text(json.dumps(load_preset("tiny-gpt2-family").to_dict()))
    args = ["edit", "--model", "tiny-gpt2", "--hparams", str(path), "--method", NAME,
            "--prompt", "{} is in", "--subject", "The Eiffel Tower", "--target-new", "Rome",
            "--json"]  # fmt: skip
    res = CliRunner().invoke(app, [*args, "--opt", "scale=0.5"])
    assert res.exit_code == 0, res.output
    (row,) = json.loads(res.stdout)
    assert row["method"] == NAME and row["layer_norms"]
    res = CliRunner().invoke(app, [*args, "--opt", "scale=-1"])
    assert res.exit_code == 2 and "setting scale must be in (0, inf]" in res.output
    res = CliRunner().invoke(app, [*args, "--templates", str(path)])
    assert res.exit_code == 2 and "--templates applies to one ROME edit" in res.output


def _weights(lm: Any, layers: list[int]) -> dict[int, torch.Tensor]:
    ed = Editor(lm.model, lm.tokenizer, lm.hparams, keep_undo=False)
    return {x: ed.module(x).weight.detach().clone() for x in layers}


def _replay(path: Any, kill_after: int | None = None) -> tuple[Any, str | None]:
    """A new run of the toy method; ``kill_after``: the consumer dies (KeyboardInterrupt)
    after that edit's event, as a killed process would, leaving the run interrupted."""
    lm = load_model("tiny-gpt2")
    hp = load_preset("tiny-gpt2-family")
    cfg = ReplayConfig(method=NAME, method_options={"scale": 0.5}, **CFG)
    run_id = None
    with Store.open(path) as store:
        try:
            for ev in replay(lm, store, cfg, hparams=hp, cancel=threading.Event()):
                if isinstance(ev, ReplayStarted):
                    run_id = ev.run_id
                if isinstance(ev, EditDone) and ev.seq == kill_after:
                    raise KeyboardInterrupt
        except KeyboardInterrupt:
            pass
    return lm, run_id


def test_a_killed_batched_replay_resumes_onto_equal_weights_then_exports_and_reports(tmp_path):
    layers = load_preset("tiny-gpt2-family").edited_layers()
    lm, _ = _replay(tmp_path / "straight.db")
    want = _weights(lm, layers)
    _, run_id = _replay(tmp_path / "cut.db", kill_after=1)
    db = tmp_path / "cut.db"
    with Store.open(db) as store:
        assert run_id is not None and store.get_run(run_id).status == "interrupted"
        assert len(list(store.iter_steps(run_id))) == 1
        fresh = load_model("tiny-gpt2")  # a new process: base weights, nothing carried
        events = list(replay(fresh, store, resume=run_id))
        assert isinstance(events[-1], ReplayFinished) and events[-1].status == "finished"
    got = _weights(fresh, layers)
    assert all(torch.equal(got[x], want[x]) for x in layers)
    runner = CliRunner()
    out = tmp_path / "edits.csv"
    res = runner.invoke(app, ["export", run_id, "--db", str(db), "-o", str(out)])
    assert res.exit_code == 0, res.output
    rows = list(csv.DictReader(io.StringIO(out.read_text())))
    assert [r["method"] for r in rows] == [NAME] * 6
    assert [int(r["step"]) for r in rows] == [0, 0, 2, 2, 4, 4]
    res = runner.invoke(app, ["report", run_id, "--db", str(db), "-o", str(tmp_path / "rep")])
    assert res.exit_code == 0, res.output
    assert NAME in (tmp_path / "rep" / "README.md").read_text()


def test_the_apps_compute_apply_undo_and_history(tmp_path, monkeypatch):
    """The app's one path (``Session``, what the Edit tab's F5 / F7 / F8 and History call):
    computed on its own preset's layers with the model unchanged, applied as one stored
    step, listed in History under its name, undone bit for bit."""
    from workbench.core.forms import EditForm
    from workbench.core.session import Session

    monkeypatch.setenv("ROME_WORKBENCH_CACHE", str(tmp_path / "cache"))
    with Store.open(tmp_path / "s.db") as store:
        session = Session(store)
        session.load("tiny-gpt2", device="cpu")
        lm, ed = session.require()
        lm.hparams = ed.hp = load_preset("tiny-gpt2-family")  # layers 0-1
        base = {x: ed.module(x).weight.detach().clone() for x in (0, 1)}
        form = EditForm(REQ.prompt, REQ.subject, REQ.target_new, REQ.target_true, method=NAME)
        outcome = session.compute(form)
        assert outcome.method == NAME and sorted(outcome.layer_norms) == [0, 1]
        assert outcome.after is not None and outcome.update.options["scale"] == 0.5
        assert all(torch.equal(base[x], ed.module(x).weight) for x in (0, 1))
        info = session.apply(outcome, generate=False)
        for lu in outcome.update.layers:  # the computed update, written as it is
            w = ed.module(lu.layer).weight
            assert not torch.equal(w, base[lu.layer])
        (row,) = session.history()
        assert (row.method, row.how, row.applied, row.in_session) == (NAME, NAME, True, True)
        assert session.timeline[-1].mode == NAME and info.run_id == row.run_id
        session.undo()
        assert all(torch.equal(base[x], ed.module(x).weight) for x in (0, 1))
        (row,) = session.history()
        assert not row.applied
        (step,) = list(store.iter_steps(info.run_id, applied_only=False))
        assert step.method == NAME and [lu.layer for lu in step.layers] == [0, 1]
        session.finish()


async def test_the_apps_edit_tab_lists_computes_applies_and_undoes_it(tmp_path, monkeypatch):
    """In the app itself (Pilot): the method list offers it (read from the registry when
    the form is made), F5 computes it, F7 applies it, History lists it, F8 undoes it."""
    pytest.importorskip("textual")
    from textual.widgets import DataTable, Select
    from tui_helpers import SIZE, settle, text_of, wait_idle

    from workbench.tui.app import WorkbenchApp

    monkeypatch.setenv("ROME_WORKBENCH_CACHE", str(tmp_path / "cache"))
    app = WorkbenchApp(db_path=tmp_path / "wb.db", model="tiny-gpt2", device="cpu")
    async with app.run_test(size=SIZE) as pilot:
        await wait_idle(app, pilot)
        app.action_example("eiffel")
        await pilot.pause()
        app.edit_pane.choose_method(NAME)  # a value not in the list would raise
        await pilot.pause()
        assert app.query_one("#f-method", Select).value == NAME
        _, ed = app.session.require()
        base = {x: ed.module(x).weight.detach().clone() for x in range(ed.n_layers)}
        await pilot.press("f5")
        await wait_idle(app, pilot)
        body = text_of(app.query_one("#edit-result-body"))
        assert "Computed, not applied" in body and NAME in body
        await pilot.press("f7")
        await wait_idle(app, pilot)
        if app.session.n_applied == 0:  # looked disabling: confirm in the dialog
            await pilot.press("y")
            await wait_idle(app, pilot)
        assert app.session.n_applied == 1
        assert app.session.editor.applied[-1].update.method == NAME
        assert any(not torch.equal(base[x], ed.module(x).weight) for x in base)
        await pilot.pause(0.2)
        await settle(app)
        await pilot.pause()
        table = app.query_one("#history-table", DataTable)
        assert table.row_count == 1 and NAME in [str(c) for c in table.get_row_at(0)]
        await pilot.press("f8")
        await wait_idle(app, pilot)
        assert app.session.n_applied == 0
        assert all(torch.equal(base[x], ed.module(x).weight) for x in base)
