"""workbench.core: headless, one error table, one replay validation, the event
driver, the run summary, and saving a run's edited model."""

from __future__ import annotations

import dataclasses
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from evals.errors import EvalDataError
from evals.replay import (
    CheckpointDone,
    EditDone,
    ReplayConfig,
    ReplayFinished,
    ReplayStarted,
    ReplayWarning,
)
from rome import BadRequestError, UnknownPresetError, UnsafeUpdateError, WeightsUnavailableError
from workbench.core import errors as core_errors
from workbench.core.replay import (
    ReplayConfigError,
    ReplayHandler,
    config_errors,
    dispatch,
    drive,
    make_config,
)
from workbench.core.stores import is_resumable, open_and_recover, resumable
from workbench.core.summary import run_summary, seconds_per_edit
from workbench.store import AmbiguousRunError, RunLockedError, Store, StoreError, UnknownRunError


@pytest.mark.parametrize("package", ["rome", "evals", "workbench.core", "workbench.store"])
def test_headless_packages_import_no_ui(package):
    code = (
        f"import {package}, importlib, pkgutil, sys\n"
        f"for m in pkgutil.walk_packages({package}.__path__, '{package}.'):\n"
        "    importlib.import_module(m.name)\n"
        "bad = [m for m in sys.modules if m.split('.')[0] in ('textual', 'rich')]\n"
        "assert not bad, bad\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


# --------------------------------------------------------------------------- errors


@pytest.mark.parametrize(
    ("exc", "code"),
    [
        (BadRequestError("x"), 2),
        (UnknownPresetError("x"), 2),
        (UnknownRunError("abcd"), 2),
        (EvalDataError("x"), 2),
        (UnsafeUpdateError("x"), 1),
        (WeightsUnavailableError("x"), 1),
        (AmbiguousRunError("abcd", ["abcd1", "abcd2"]), 2),
        (StoreError("x"), 1),
        (MemoryError(), 1),
        (IsADirectoryError("x"), 1),
    ],
)
def test_error_table_exit_codes(exc, code):
    info = core_errors.describe(exc, "Doing it")
    assert info.expected and info.exit_code == code == core_errors.exit_code(exc)
    assert "\n" not in info.message and info.title.startswith("Doing it failed")


def test_error_table_titles_and_unexpected():
    oom = core_errors.describe(RuntimeError("CUDA out of memory. Tried\nmore"), "Loading")
    assert (
        oom.title == "Loading failed: out of memory" and oom.dialog and oom.message.count("\n") == 0
    )
    assert core_errors.describe(RunLockedError("r1", None)).severity == "warning"
    plain = RuntimeError("something else")
    info = core_errors.describe(plain)
    assert not info.expected and info.dialog and "RuntimeError" in info.message
    import typer

    assert core_errors.classify(typer.Exit(2)) is None  # the CLI re-raises it untouched


# --------------------------------------------------------------------------- replay settings


def test_replay_config_rules():
    cfg = make_config(
        {"n_edits": "5", "glue_limit": "0", "glue_tasks": "sst2, rte", "mode": "prompt"}
    )
    assert cfg.n_edits == 5 and cfg.glue_limit is None and cfg.glue_tasks == ("sst2", "rte")
    assert make_config({"glue_limit": 7}).glue_limit == 7
    assert make_config({"glue_limit": ""}).glue_limit is None
    assert make_config({}) == ReplayConfig()
    bad = config_errors(
        {
            "n_edits": 0,
            "glue_every": "x",
            "glue_limit": -1,
            "glue_tasks": "sst2,nope",
            "mode": "fancy",
            "dataset": "/no/such/file.json",
            "colour": "red",
        }
    )
    assert set(bad) == {
        "n_edits",
        "glue_every",
        "glue_limit",
        "glue_tasks",
        "mode",
        "dataset",
        "colour",
    }
    assert "at least 0" in bad["glue_limit"] and "nope" in bad["glue_tasks"]
    assert "glue_tasks" in config_errors({"glue_tasks": ","})
    assert "glue_calibration" in config_errors(
        {"glue_calibration": "contextual", "glue_scoring": "generate"}
    )
    with pytest.raises(ReplayConfigError) as e:
        make_config({"n_edits": -3})
    assert isinstance(e.value, BadRequestError) and "edits must be at least 1" in str(e.value)
    assert e.value.fields == {"n_edits": "must be at least 1"}


def test_replay_config_glue_dir(tmp_path):
    assert "glue_dir" in config_errors({"glue_tasks": ["sst2"], "glue_dir": str(tmp_path)})
    (tmp_path / "sst2.jsonl").write_text("")
    assert config_errors({"glue_tasks": ["sst2"], "glue_dir": str(tmp_path)}) == {}


class _Recorder(ReplayHandler):
    def __init__(self) -> None:
        self.seen: list[str] = []

    def started(self, ev):
        self.seen.append("started")

    def edit_done(self, ev):
        self.seen.append("edit")

    def checkpoint(self, ev):
        self.seen.append("checkpoint")

    def warning(self, ev):
        self.seen.append("warning")

    def finished(self, ev):
        self.seen.append("finished")

    def other(self, ev):
        self.seen.append("other")


def test_dispatch_by_type():
    done = EditDone(0, 1, 7, "s", "t", 1.0, 0.1, {}, False, None, False, 0.5)
    events = [
        ReplayStarted("r", 1, 0),
        CheckpointDone(0, {}, 1.0),
        done,
        ReplayWarning("w"),
        object(),
        ReplayFinished("r", "finished", {}),
    ]
    rec = _Recorder()
    fin = drive(events, rec)
    assert rec.seen == ["started", "checkpoint", "edit", "warning", "other", "finished"]
    assert fin is events[-1]
    seen: list[object] = []
    assert drive(events[:2], seen.append) is None and seen == events[:2]
    dispatch(done, ReplayHandler())  # the base handler ignores everything


# --------------------------------------------------------------------------- store, summary


def _fake_run(store: Store) -> str:
    run = store.create_run(model="tiny-gpt2", mode="rrome", n_edits_planned=3)
    with store.acquire_writer(run.id):
        for seq, norm in enumerate((1.0, 3.0)):
            store.add_edit(
                run.id,
                seq,
                request={"prompt": "{} is", "subject": "x", "target_new": "y"},
                mode="rrome",
                layer=1,
                weight_name="w",
                u=torch.ones(2),
                v=torch.ones(3),
                update_norm=norm,
                metrics={"es": 1.0, "ps": 0.5, "ns": 1.0},
                timings={"v_star": 2.0, "pre_metrics": 0.5, "post_metrics": 0.25},
                flagged=seq == 1,
            )
        for step, acc in ((0, 0.5), (2, 0.75)):
            store.add_checkpoint(run.id, step, "sst2", accuracy=acc)
            store.add_fluency(run.id, step, 5.0 - step)
        store.set_status(run.id, "interrupted")
    return run.id


def test_summary_rows_and_resumable(tmp_path):
    with open_and_recover(tmp_path / "w.db") as store:
        run_id = _fake_run(store)
        s = run_summary(store, run_id, "interrupted", {})
        rows = dict(s.rows)
        assert s.title == f"run {run_id} (rrome, interrupted)"
        assert rows["edits stored"] == "2" and rows["flagged"] == "1"
        # the median of 1.0 and 3.0 is 2.0 (the upper median, 3.0, was shown before)
        assert rows["max |dW|"] == "3.00" and rows["median |dW|"] == "2.00"
        assert rows["wall s per edit: edit + scoring"] == "2.0 + 0.8"
        assert rows["sst2 start -> end"] == "0.500 -> 0.750"
        assert rows["fluency start -> end"] == "5.000 -> 3.000"
        run = store.get_run(run_id)
        assert is_resumable(run) and resumable([run]) == [run]
        store.set_status(run_id, "finished")
        assert resumable(store.list_runs()) == []


def test_seconds_per_edit_counts_a_batch_step_once(tmp_path):
    """Edits of one batch share the step's timings: they are divided, not repeated."""
    with open_and_recover(tmp_path / "w.db") as store:
        edits = store.edits(_fake_run(store))
    assert seconds_per_edit(edits) == (2.0, 0.75)
    batch = [dataclasses.replace(e, step=0) for e in edits]
    assert seconds_per_edit(batch) == (1.0, 0.375)
    assert seconds_per_edit([dataclasses.replace(e, timings={}) for e in edits]) is None


# --------------------------------------------------------------------------- save


@pytest.fixture(scope="module")
def session_run(tmp_path_factory):
    """A session run on tiny-gpt2 with one applied edit, and the session's model."""
    from workbench.core.forms import EditForm
    from workbench.core.session import Session

    db = tmp_path_factory.mktemp("save") / "w.db"
    store = Store.open(db)
    session = Session(store)
    session.load("tiny-gpt2", device="cpu")
    form = EditForm("The city of {}", "the Eiffel Tower", "Rome", "Paris")
    outcome = session.compute(form)
    session.apply(outcome, generate=False)
    run_id = session.run_id
    session.finish()
    yield db, run_id, session, outcome.result
    store.close()


def test_save_reloads_with_the_edit(session_run, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from rome.scoring import score_targets
    from workbench.core.save import save_run

    db, run_id, session, result = session_run
    with Store.open(db) as store:
        out = save_run(store, run_id, tmp_path / "edited", device="cpu")
    assert {"config.json", "model.safetensors", "README.md", "tokenizer.json"} <= {
        p.name for p in out.iterdir()
    }
    card = (out / "README.md").read_text()
    assert "tiny-gpt2" in card and "the Eiffel Tower" in card and "rrome" in card
    assert f"{result.update_norm:.4g}" in card
    model = AutoModelForCausalLM.from_pretrained(out).eval()
    tok = AutoTokenizer.from_pretrained(out)
    name = result.weight_name + ".weight"
    saved = dict(model.named_parameters())[name]
    edited = dict(session.lm.model.named_parameters())[name]
    assert torch.equal(saved, edited)
    p = score_targets(model, tok, [result.request.text], [result.request.target_new])[0].prob
    assert p == pytest.approx(result.p_new_after, rel=1e-4)
    with Store.open(db) as store, pytest.raises(BadRequestError, match="not empty"):
        save_run(store, run_id, out, device="cpu")


def test_save_refuses_another_base(session_run, tmp_path):
    from workbench.core.save import RebuildError, save_run

    db, run_id, _, _ = session_run
    with Store.open(db) as store:
        good = store.get_run(run_id).base_fingerprint
        store.update_run(run_id, base_fingerprint="0" * 64)
        try:
            with pytest.raises(RebuildError, match="not the base model"):
                save_run(store, run_id, tmp_path / "x", device="cpu")
            # older session runs stored the fingerprint after their first edit
            first = store.edits(run_id)[0].fingerprint
            store.update_run(run_id, base_fingerprint=first)
            assert save_run(store, run_id, tmp_path / "legacy", device="cpu").is_dir()
        finally:
            store.update_run(run_id, base_fingerprint=good)
    assert not (tmp_path / "x").exists()


def test_cli_save(session_run, tmp_path):
    from typer.testing import CliRunner

    from workbench.cli import app

    db, run_id, _, _ = session_run
    out = tmp_path / "cli-save"
    res = CliRunner().invoke(app, ["save", run_id[:6], "-o", str(out), "--db", str(db)])
    assert res.exit_code == 0, res.output
    assert (out / "model.safetensors").is_file() and "wrote" in res.stderr
    res = CliRunner().invoke(app, ["save", run_id, "-o", str(out), "--db", str(db)])
    assert res.exit_code == 2 and "not empty" in res.stderr


def test_replay_settings_refused_before_a_run(tmp_path):
    from typer.testing import CliRunner

    from workbench.cli import app

    db = tmp_path / "w.db"
    for args in (["--glue-limit", "-1"], ["--glue-tasks", "sst2,nope"], ["--glue-tasks", ","]):
        res = CliRunner().invoke(app, ["replay", "--model", "tiny-gpt2", "--db", str(db), *args])
        assert res.exit_code == 2 and "replay settings" in res.stderr, res.output
    assert not db.exists() or Store.open(db).list_runs() == []


def test_open_store_path(tmp_path: Path):
    with open_and_recover(tmp_path / "sub" / "w.db") as s:
        assert s.path == tmp_path / "sub" / "w.db"


# --------------------------------------------------------------------------- one write per apply


def test_an_apply_writes_the_weight_once(tmp_path):
    """The app's Apply computes the update once (no trial) and writes it once; its probes
    after, scored on the applied weights, and its stored record are a trial's, bit for bit."""
    from rome.update import weight_of
    from workbench.core.forms import EditForm
    from workbench.core.session import Session

    with Store.open(tmp_path / "w.db") as store:
        session = Session(store)
        session.load("tiny-gpt2", device="cpu")
        _, ed = session.require()
        w = weight_of(ed.module(ed.hp.layer))
        form = EditForm(
            "The city of {}", "the Eiffel Tower", "Rome", "Paris",
            "The Eiffel Tower stands in", "The Louvre is in the city of",
        )  # fmt: skip
        engine = ed.compute(form.request(), mode=form.mode)  # with the engine's own trial
        v0 = w._version
        tried = session.compute(form)  # Compute: one trial, the engine's probes and the session's
        assert tried.after is not None and w._version == v0 + 2  # added, then put back
        for k in ("p_new_after", "p_true_after", "p_new_after_templated"):  # the same figures
            assert getattr(tried.result, k) == getattr(engine, k)
        start = w._version
        outcome = session.compute(form, trial=False)
        assert w._version == start and outcome.after is None
        assert outcome.verdict == tried.verdict  # the norms decide; the probes only warn
        info = session.apply(outcome, generate=False)
        assert w._version == start + 1  # one in-place write: the update
        res, want = info.outcome.result, tried.result
        assert torch.equal(res.u, want.u) and torch.equal(res.v, want.v)
        assert info.outcome.after == tried.after and info.outcome.verdict == tried.verdict
        for k in ("p_new_after", "p_true_after", "p_new_after_templated"):
            assert getattr(res, k) == getattr(want, k)
        assert store.edit(info.run_id, info.seq).record["p_new_after"] == want.p_new_after
        session.undo()
        assert w._version == start + 2  # the undo writes the weight back, once
        session.finish()


def test_base_weights_of_given_layers_come_back_bit_for_bit():
    """Editor.base_weights(layers): inside, the edited layers hold their base weight; after,
    every given layer holds what it held before, whatever was written inside."""
    from rome import Editor, EditRequest, load_model
    from rome.update import weight_of

    lm = load_model("tiny-gpt2")
    ed = Editor(lm.model, lm.tokenizer, lm.hparams, cache_dir=None)
    layer, other = ed.hp.layer, 0
    base = weight_of(ed.module(layer)).detach().clone()
    ed.apply(ed.compute(EditRequest("The city of {}", "the Eiffel Tower", "Rome", "Paris")))
    edited = weight_of(ed.module(layer)).detach().clone()
    untouched = weight_of(ed.module(other)).detach().clone()
    with ed.base_weights([layer, other]):
        assert torch.equal(weight_of(ed.module(layer)), base)
        with torch.no_grad():
            weight_of(ed.module(layer)).add_(1.0)
            weight_of(ed.module(other)).mul_(2.0)
    assert torch.equal(weight_of(ed.module(layer)), edited)
    assert torch.equal(weight_of(ed.module(other)), untouched)


def _outcome(label: str, norm: float, holds: bool):
    from workbench.core.methods import MethodOutcome

    o = MethodOutcome(label.split("/")[0], label=label, norm=norm, ratio=norm / 100.0)
    o.p_new_before, o.p_true_before = [0.01], [0.5]
    o.p_new_after, o.p_true_after = ([0.6], [0.1]) if holds else ([0.02], [0.5])
    return o


def test_methods_are_judged_against_an_update_that_took():
    """A small update that did not take is no yardstick for the others' norms."""
    from workbench.core.methods import judge_outcomes

    rows = [_outcome("rome/rrome", 5.0, True), _outcome("memit", 0.5, False)]
    judge_outcomes(rows, max_update_ratio=10.0)
    assert [r.verdict for r in rows] == ["ok", "check"]
    rows.append(_outcome("alphaedit", 1.0, True))
    judge_outcomes(rows, max_update_ratio=10.0)
    assert rows[0].verdict == "DISABLING"
    assert "5.0× alphaedit's, the smallest update whose edit holds" in rows[0].reasons[0]
    assert [r.verdict for r in rows[1:]] == ["check", "ok"]


def test_an_update_that_moved_nothing_is_no_yardstick():
    """target_new already beat target_true before: a tiny update "holds" without taking
    (as on a random model); it is checked, and the rows are not judged against it."""
    from workbench.core.methods import judge_outcomes

    idle = _outcome("memit", 0.1, True)
    idle.p_new_before, idle.p_true_before = [0.0010], [0.0002]
    idle.p_new_after, idle.p_true_after = [0.0011], [0.0002]
    assert idle.efficacy == 1.0 and idle.took == 0.0
    rows = [_outcome("rome/rrome", 5.0, True), idle, _outcome("alphaedit", 2.0, True)]
    judge_outcomes(rows, max_update_ratio=10.0)
    assert rows[1].verdict == "check" and "barely rose" in rows[1].reasons[0]
    assert rows[0].verdict == "ok"  # 2.5× alphaedit's: under the factor, no memit yardstick
    assert [r.verdict for r in rows[2:]] == ["ok"]
