"""Sequential replay on a tiny model: events, store, cancel, resume after SIGKILL."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import threading

import pytest
import torch
from fault_helpers import kill_after

from evals.replay import (
    CheckpointDone,
    EditDone,
    ReplayConfig,
    ReplayError,
    ReplayFinished,
    ReplayStarted,
    ReplayWarning,
    replay,
)
from rome import Editor, load_model
from workbench.store import Store, UnknownRunError

CFG = ReplayConfig(n_edits=5, glue_every=2, glue_tasks=("sst2",), glue_limit=4, fluency_tokens=8)


def final_fingerprint(lm) -> str:
    return Editor(lm.model, lm.tokenizer, lm.hparams, keep_undo=False).fingerprint()


def test_replay_writes_its_run(tmp_path):
    lm = load_model("tiny-gpt2")
    store = Store.open(tmp_path / "r.db")
    events = list(replay(lm, store, CFG))
    assert isinstance(events[0], ReplayStarted)
    edits = [e for e in events if isinstance(e, EditDone)]
    cps = [e for e in events if isinstance(e, CheckpointDone)]
    fin = events[-1]
    assert isinstance(fin, ReplayFinished) and fin.status == "finished"
    assert [e.seq for e in edits] == [0, 1, 2, 3, 4]
    assert [c.step for c in cps] == [0, 2, 4, 5]
    assert all(e.update_norm > 0 and "es" in e.metrics for e in edits)
    run = store.get_run(fin.run_id)
    assert run.status == "finished" and run.mode == "rrome"
    stored = store.edits(run.id)
    assert [e.seq for e in stored] == [0, 1, 2, 3, 4]
    assert stored[-1].fingerprint == final_fingerprint(lm)
    assert {c.task for c in store.checkpoints(run.id)} == {
        "sst2",
        "fluency",
        "perplexity",
        "retention",
    }
    assert len(store.rescores(run.id)) == 5
    assert "survived" in fin.summary


def test_cancel_keeps_finished_edits(tmp_path):
    lm = load_model("tiny-gpt2")
    store = Store.open(tmp_path / "r.db")
    cancel = threading.Event()
    seen = []
    for ev in replay(lm, store, CFG, cancel=cancel):
        if isinstance(ev, EditDone):
            seen.append(ev.seq)
            if len(seen) == 2:
                cancel.set()
        last = ev
    assert isinstance(last, ReplayFinished) and last.status == "cancelled"
    assert [e.seq for e in store.edits(last.run_id)] == [0, 1]
    assert store.get_run(last.run_id).status == "cancelled"


def test_unknown_run_fails_loudly(tmp_path):
    lm = load_model("tiny-gpt2")
    store = Store.open(tmp_path / "r.db")
    with pytest.raises(UnknownRunError):
        list(replay(lm, store, resume="nosuchrun"))


def test_resume_refuses_an_already_edited_model(tmp_path):
    lm = load_model("tiny-gpt2")
    store = Store.open(tmp_path / "r.db")
    cancel = threading.Event()
    cancel.set()
    fin = list(replay(lm, store, CFG, cancel=cancel))[-1]
    with torch.no_grad():
        Editor(lm.model, lm.tokenizer, lm.hparams).module(lm.hparams.layer).weight.add_(1.0)
    with pytest.raises(ReplayError, match="base model"):
        list(replay(lm, store, resume=fin.run_id))


CHILD = """
import sys
from evals.replay import ReplayConfig, replay
from rome import load_model
from workbench.store import Store
cfg = ReplayConfig(n_edits=8, glue_every=100, glue_tasks=("sst2",), glue_limit=4, fluency_tokens=8)
for ev in replay(load_model("tiny-gpt2"), Store.open(sys.argv[1]), cfg):
    pass
"""


def test_resume_after_sigkill_rebuilds_the_same_weights(tmp_path):
    db = tmp_path / "kill.db"
    env = dict(os.environ)
    child = subprocess.Popen([sys.executable, "-c", CHILD, str(db)], env=env)
    run_id, n = kill_after(db, 2, child)
    assert run_id is not None and 2 <= n < 8, "the child should be killed mid-run"

    store = Store.open(db)
    assert store.integrity_ok()
    done_before = len(store.edits(run_id))
    lm = load_model("tiny-gpt2")
    events = list(replay(lm, store, resume=run_id))
    started = events[0]
    assert isinstance(started, ReplayStarted) and started.start_seq == done_before
    assert events[-1].status == "finished"
    seqs = [e.seq for e in store.edits(run_id)]
    assert seqs == list(range(8))  # each edit stored exactly once
    assert store.integrity_ok()

    fresh = load_model("tiny-gpt2")
    ref_store = Store.open(tmp_path / "ref.db")
    cfg = ReplayConfig(
        n_edits=8, glue_every=100, glue_tasks=("sst2",), glue_limit=4, fluency_tokens=8
    )
    list(replay(fresh, ref_store, cfg))
    assert final_fingerprint(lm) == final_fingerprint(fresh)
    layer = lm.hparams.layer
    a = Editor(lm.model, lm.tokenizer, lm.hparams).module(layer).weight
    b = Editor(fresh.model, fresh.tokenizer, fresh.hparams).module(layer).weight
    assert torch.equal(a, b)


def _records_file(path, rows):
    path.write_text(json.dumps(rows))
    return str(path)


def test_each_edit_stores_pre_post_drift_and_its_record(tmp_path):
    lm = load_model("tiny-gpt2")
    store = Store.open(tmp_path / "r.db")
    events = list(replay(lm, store, CFG))
    edits = [e for e in events if isinstance(e, EditDone)]
    drifts = [e.w_delta_norm for e in edits]
    assert drifts[0] == pytest.approx(edits[0].update_norm, rel=1e-4)
    assert all(d > 0 for d in drifts)
    stored = store.edits(events[-1].run_id)
    for e in stored:
        assert {"es", "ps", "ns", "s_record"} <= set(e.metrics["pre"])
        assert e.metrics["w_delta_norm"] > 0 and e.metrics["w_norm_ratio"] > 0
        assert e.record["counterfact"]["case_id"] == e.case_id
    ppl = [c for c in store.checkpoints(events[-1].run_id) if c.task == "perplexity"]
    assert [c.step for c in ppl] == [0, 2, 4, 5]
    assert all(c.extra["perplexity"] == pytest.approx(math.exp(c.value)) for c in ppl)
    summary = events[-1].summary
    assert summary["pre"]["n"] == summary["post"]["n"] == 5
    # the published S: harmonic mean of the run-level means
    post = summary["post"]
    parts = [post["es"], post["ps"], post["ns"]]
    want = 0.0 if min(parts) == 0 else 3 / sum(1 / x for x in parts)
    assert post["s"] == pytest.approx(want)


def test_resume_refuses_changed_records_and_rescores_from_stored_ones(tmp_path):
    from evals.counterfact import SAMPLE_PATH

    rows = json.loads(SAMPLE_PATH.read_text())[:6]
    data = _records_file(tmp_path / "cf.json", rows[:4])
    lm = load_model("tiny-gpt2")
    store = Store.open(tmp_path / "r.db")
    cfg = ReplayConfig(
        dataset=data, n_edits=4, glue_every=2, glue_tasks=("sst2",), glue_limit=4, fluency_tokens=8
    )
    cancel = threading.Event()
    for ev in replay(lm, store, cfg, cancel=cancel):
        if isinstance(ev, EditDone) and ev.seq == 1:
            cancel.set()
    run_id = store.list_runs()[0].id
    _records_file(tmp_path / "cf.json", [rows[0], rows[4], rows[2], rows[3]])
    with pytest.raises(ReplayError, match="CounterFact records .* changed"):
        list(replay(load_model("tiny-gpt2"), store, resume=run_id))
    assert [e.seq for e in store.edits(run_id)] == [0, 1]  # nothing lost
    _records_file(tmp_path / "cf.json", rows[:4])
    events = list(replay(load_model("tiny-gpt2"), store, resume=run_id))
    assert events[-1].status == "finished"
    rescored = {r.seq: r.metrics["case_id"] for r in store.rescores(run_id)}
    assert rescored == {i: rows[i]["case_id"] for i in range(4)}
    # a finished run resumes to nothing unless asked
    again = list(replay(load_model("tiny-gpt2"), store, resume=run_id))
    assert isinstance(again[0], ReplayWarning) and "already finished" in again[0].message
    assert not any(isinstance(e, EditDone) for e in again)


def test_a_finished_run_extends_onto_the_next_records_and_the_same_weights(tmp_path):
    from rome.errors import BadRequestError

    store = Store.open(tmp_path / "r.db")
    short = ReplayConfig(
        n_edits=3, glue_every=2, glue_tasks=("sst2",), glue_limit=4, fluency_tokens=8
    )
    first = list(replay(load_model("tiny-gpt2"), store, short))
    run_id = first[-1].run_id
    with pytest.raises(BadRequestError, match="already plans 3 edits"):
        list(replay(load_model("tiny-gpt2"), store, resume=run_id, extend_to=3))
    lm = load_model("tiny-gpt2")
    events = list(replay(lm, store, resume=run_id, extend_to=5))
    assert any(isinstance(e, ReplayWarning) and "from 3 to 5" in e.message for e in events)
    assert [e.seq for e in events if isinstance(e, EditDone)] == [3, 4]
    assert events[-1].status == "finished"
    run = store.get_run(run_id)
    assert run.n_edits_planned == 5 and run.hparams["replay"]["n_edits"] == 5
    assert [e.seq for e in store.edits(run_id)] == [0, 1, 2, 3, 4]
    assert sorted({c.step for c in store.checkpoints(run_id)}) == [0, 2, 3, 4, 5]
    assert len(store.rescores(run_id)) == 5

    # the same five edits in one go end on the same weights
    whole = ReplayConfig(
        n_edits=5, glue_every=2, glue_tasks=("sst2",), glue_limit=4, fluency_tokens=8
    )
    lm_whole = load_model("tiny-gpt2")
    list(replay(lm_whole, Store.open(tmp_path / "w.db"), whole))
    assert final_fingerprint(lm) == final_fingerprint(lm_whole)
    assert store.last_edit(run_id).fingerprint == final_fingerprint(lm_whole)


def test_an_extension_refuses_changed_earlier_records(tmp_path):
    from evals.counterfact import SAMPLE_PATH
    from rome.errors import BadRequestError

    rows = json.loads(SAMPLE_PATH.read_text())[:4]
    data = _records_file(tmp_path / "cf.json", rows[:2])
    store = Store.open(tmp_path / "r.db")
    cfg = ReplayConfig(
        dataset=data, n_edits=2, glue_every=2, glue_tasks=("sst2",), glue_limit=4, perplexity=False
    )
    run_id = list(replay(load_model("tiny-gpt2"), store, cfg))[-1].run_id
    _records_file(tmp_path / "cf.json", [rows[1], rows[0], rows[2], rows[3]])
    with pytest.raises(ReplayError, match="CounterFact records .* changed"):
        list(replay(load_model("tiny-gpt2"), store, resume=run_id, extend_to=4))
    assert store.get_run(run_id).n_edits_planned == 2  # nothing changed
    _records_file(tmp_path / "cf.json", rows[:2])
    with pytest.raises(BadRequestError, match="no usable records beyond"):
        list(replay(load_model("tiny-gpt2"), store, resume=run_id, extend_to=4))


def test_stabilisers_are_stored_with_the_run_and_each_edit(tmp_path):
    lm = load_model("tiny-gpt2")
    store = Store.open(tmp_path / "r.db")
    hp = lm.hparams.replace(v_stop="most_probable", v_norm_anchor=True, v_num_grad_steps=5)
    cfg = ReplayConfig(
        n_edits=2, glue_every=2, glue_tasks=("sst2",), glue_limit=4, perplexity=False
    )
    events = list(replay(lm, store, cfg, hparams=hp))
    run = store.get_run(events[-1].run_id)
    stored = json.loads(run.hparams) if isinstance(run.hparams, str) else run.hparams
    assert stored["hparams"]["v_stop"] == "most_probable"
    assert stored["hparams"]["v_norm_anchor"] is True
    for e in store.edits(run.id):
        assert e.record["v_stop"] == "most_probable"
        assert e.record["norm_anchor"] > 0


def test_resume_elsewhere_edits_with_the_runs_templates_and_rho(tmp_path, monkeypatch):
    """Sampled templates (and so ρ) depend on the machine: a run keeps its own, and a
    resume on a machine whose cache holds other templates still ends on the same weights."""
    monkeypatch.setenv("ROME_WORKBENCH_CACHE", str(tmp_path / "cache-a"))
    lm = load_model("tiny-gpt2")
    hp = lm.hparams.replace(v_norm_anchor=True, v_norm_anchor_samples=3, v_num_grad_steps=5)
    cfg = ReplayConfig(n_edits=3, glue_every=3, glue_tasks=("sst2",), glue_limit=4, rescore=False)
    whole = Store.open(tmp_path / "whole.db")
    list(replay(lm, whole, cfg, hparams=hp))
    ref = whole.list_runs()[0]
    assert ref.hparams["hparams"]["context_templates"][0] == "{}"  # stored with the run

    store = Store.open(tmp_path / "r.db")
    cancel = threading.Event()
    for ev in replay(load_model("tiny-gpt2"), store, cfg, hparams=hp, cancel=cancel):
        if isinstance(ev, EditDone):
            cancel.set()
    run_id = store.list_runs()[0].id
    # "another machine": its cache samples other templates, and has no ρ
    other = tmp_path / "cache-b" / "templates"
    other.mkdir(parents=True)
    for f in (tmp_path / "cache-a" / "templates").glob("*.json"):
        (other / f.name).write_text(json.dumps(["{}", "Elsewhere. {}"]))
    monkeypatch.setenv("ROME_WORKBENCH_CACHE", str(tmp_path / "cache-b"))
    list(replay(load_model("tiny-gpt2"), store, resume=run_id))
    assert store.last_edit(run_id).fingerprint == whole.last_edit(ref.id).fingerprint
    rhos = {e.record["norm_anchor"] for e in store.edits(run_id)}
    assert rhos == {e.record["norm_anchor"] for e in whole.edits(ref.id)} and len(rhos) == 1


def test_resume_of_a_run_without_stored_templates_stores_them(tmp_path):
    lm = load_model("tiny-gpt2")
    store = Store.open(tmp_path / "r.db")
    cancel = threading.Event()
    cancel.set()
    run_id = list(replay(lm, store, CFG, cancel=cancel))[-1].run_id
    run = store.get_run(run_id)
    old = {**run.hparams, "hparams": {**run.hparams["hparams"], "context_templates": None}}
    store.update_run(run_id, hparams=old)  # as runs made before templates were kept
    events = list(replay(load_model("tiny-gpt2"), store, resume=run_id))
    notes = [e.message for e in events if isinstance(e, ReplayWarning)]
    assert any("stored no context templates" in n for n in notes)
    kept = store.get_run(run_id).hparams["hparams"]["context_templates"]
    assert kept == Editor(lm.model, lm.tokenizer, lm.hparams).templates()


def test_resume_with_other_statistics_warns_and_a_run_without_a_record_gets_one(tmp_path):
    lm = load_model("tiny-gpt2")
    store = Store.open(tmp_path / "r.db")
    cancel = threading.Event()
    cancel.set()
    run_id = list(replay(lm, store, CFG, cancel=cancel))[-1].run_id
    first = store.get_run(run_id).hparams["replay"]["covariance_fingerprint"]
    assert first == Editor(lm.model, lm.tokenizer, lm.hparams).factor(1).fingerprint
    run = store.get_run(run_id)
    changed = {
        **run.hparams,
        "replay": {**run.hparams["replay"], "covariance_fingerprint": "0" * 16},
    }
    store.update_run(run_id, hparams=changed)
    cancel2 = threading.Event()
    cancel2.set()
    events = list(replay(load_model("tiny-gpt2"), store, resume=run_id, cancel=cancel2))
    notes = [e.message for e in events if isinstance(e, ReplayWarning)]
    assert any("covariance statistics differ" in n and first in n for n in notes), notes
    none = {**changed, "replay": {**changed["replay"], "covariance_fingerprint": None}}
    store.update_run(run_id, hparams=none)
    events = list(replay(load_model("tiny-gpt2"), store, resume=run_id, cancel=cancel2))
    assert store.get_run(run_id).hparams["replay"]["covariance_fingerprint"] == first
