"""Batched replays (MEMIT, EMMET, AlphaEdit in steps of B requests): stored whole, killed
and resumed onto weights equal to an uninterrupted run's, the method's state rebuilt."""

from __future__ import annotations

import threading

import pytest
import torch

from evals.replay import EditDone, ReplayConfig, ReplayFinished, replay
from rome import Editor, load_model, load_preset
from workbench.store import Store

CFG = dict(
    n_edits=6, glue_every=4, glue_tasks=("sst2",), glue_limit=4, fluency_tokens=8,
    batch_size=2, retention_size=2, perplexity=False,
)  # fmt: skip


def weights(lm, layers):
    ed = Editor(lm.model, lm.tokenizer, lm.hparams, keep_undo=False)
    return {x: ed.module(x).weight.detach().clone() for x in layers}


def straight(tmp_path, method):
    lm = load_model("tiny-gpt2")
    hp = load_preset("tiny-gpt2-family")
    with Store.open(tmp_path / "straight.db") as store:
        events = list(replay(lm, store, ReplayConfig(method=method, **CFG), hparams=hp))
        assert isinstance(events[-1], ReplayFinished) and events[-1].status == "finished"
        return weights(lm, hp.layers), store.edits(events[-1].run_id)


@pytest.mark.parametrize("method", ["memit", "alphaedit"])
def test_batched_replay_resumes_onto_the_same_weights(tmp_path, method):
    want, want_edits = straight(tmp_path, method)
    assert [e.step for e in want_edits] == [0, 0, 2, 2, 4, 4]
    assert {e.method for e in want_edits} == {method}
    lm = load_model("tiny-gpt2")
    hp = load_preset("tiny-gpt2-family")
    cancel = threading.Event()
    with Store.open(tmp_path / "cut.db") as store:
        run_id = None
        for ev in replay(lm, store, ReplayConfig(method=method, **CFG), hparams=hp, cancel=cancel):
            if isinstance(ev, EditDone) and ev.seq == 1:
                cancel.set()  # stops before the second step
            if isinstance(ev, ReplayFinished):
                run_id = ev.run_id
                assert ev.status == "cancelled"
        assert run_id is not None and len(store.edits(run_id)) == 2
        steps = list(store.iter_steps(run_id))
        assert len(steps) == 1 and [x.layer for x in steps[0].layers] == hp.layers
        if method == "alphaedit":  # the keys its carried K Kᵀ is rebuilt from
            assert all(x.keys is not None and x.keys.shape[1] == 2 for x in steps[0].layers)
        fresh = load_model("tiny-gpt2")  # a new process: base weights, nothing carried
        events = list(replay(fresh, store, resume=run_id))
        assert isinstance(events[-1], ReplayFinished) and events[-1].status == "finished"
        got = weights(fresh, hp.layers)
        for layer in hp.layers:
            assert torch.equal(got[layer], want[layer]), f"layer {layer} differs after resume"
        edits = store.edits(run_id)
        assert [e.fingerprint for e in edits] == [e.fingerprint for e in want_edits]


def test_batch_size_one_request_steps_for_rome_only(tmp_path):
    lm = load_model("tiny-gpt2")
    with Store.open(tmp_path / "r.db") as store:
        with pytest.raises(Exception, match="one request at a time"):
            list(replay(lm, store, ReplayConfig(method="rome", batch_size=2, n_edits=2)))


def test_report_names_a_batched_runs_method_and_layers(tmp_path):
    from typer.testing import CliRunner

    from workbench.cli import app

    lm = load_model("tiny-gpt2")
    hp = load_preset("tiny-gpt2-family")
    cfg = ReplayConfig(method="memit", **{**CFG, "n_edits": 2, "glue_every": 2})
    with Store.open(tmp_path / "r.db") as store:
        events = list(replay(lm, store, cfg, hparams=hp))
    run_id = events[-1].run_id
    out = tmp_path / "page"
    res = CliRunner().invoke(
        app, ["report", run_id, "-o", str(out), "--db", str(tmp_path / "r.db")]
    )
    assert res.exit_code == 0, res.output
    page = (out / "README.md").read_text()
    assert "method memit; preset tiny-gpt2-family; layers 0, 1; batch size 2" in page
    assert "key mode" not in page.split("## Runs")[1].split("## Scores")[0]
    # each edited layer: its one step's norm, as stored, and its drift after the 2 edits
    from workbench.store import Store as _Store

    with _Store.open(tmp_path / "r.db") as store:
        last = store.edits(run_id)[-1]
    table = page.split("### Per edited layer")[1].split("## Flagged")[0]
    for layer in (0, 1):
        norm = last.record["layer_norms"][str(layer)]
        ratio = last.metrics["layers"][str(layer)]["w_norm_ratio"]
        row = f"| {run_id} memit | {layer} | 1 | {norm:.1f} | {norm:.1f} |"
        assert row in table, table
        assert f"{ratio:.3f} | {ratio:.2f} @2 |" in table, table
    # a flagged batch edit's record (the report's and the app's): its step, not ROME's keys
    from workbench.core.report import edit_facts

    facts = dict(edit_facts(last))
    assert facts["update"] == "memit · layers 0, 1 · the step from edit 0"
    assert "cos(k*, k(s))" not in facts and facts["‖ΔW‖"].endswith(", the whole step")
    assert facts["‖ΔW_l‖ per layer"].startswith("0: ")


def _cut_alphaedit_run(path) -> str:
    """An AlphaEdit run stopped after its first step of two requests."""
    lm = load_model("tiny-gpt2")
    hp = load_preset("tiny-gpt2-family")
    cancel = threading.Event()
    with Store.open(path) as store:
        for ev in replay(
            lm, store, ReplayConfig(method="alphaedit", **CFG), hparams=hp, cancel=cancel
        ):
            if isinstance(ev, EditDone) and ev.seq == 1:
                cancel.set()
            if isinstance(ev, ReplayFinished):
                return ev.run_id
    raise AssertionError("the replay did not finish")


def test_a_resume_whose_stored_state_does_not_match_the_method_is_refused(tmp_path):
    """A step stored without the keys AlphaEdit's Σ KKᵀ is rebuilt from, or made by
    another method, is refused with one line (exit 2) and the run is left as it was."""
    import sqlite3

    from cli_helpers import runner

    from workbench.cli import app
    from workbench.store.steps import pack_layer, unpack_layer

    db = tmp_path / "r.db"
    run_id = _cut_alphaedit_run(db)
    con = sqlite3.connect(db)
    rows = con.execute(
        "SELECT id, factors FROM step_factors WHERE run_id = ?", (run_id,)
    ).fetchall()
    for row_id, blob in rows:  # the keys dropped, U and V kept
        U, V, keys = unpack_layer(blob)
        assert keys is not None
        con.execute(
            "UPDATE step_factors SET factors = ? WHERE id = ?", (pack_layer(U, V, None, {}), row_id)
        )
    con.commit()
    before = con.execute("SELECT status FROM runs WHERE id = ?", (run_id,)).fetchone()[0]
    con.close()
    res = runner.invoke(
        app, ["replay", "--model", "tiny-gpt2", "--db", str(db), "--resume", run_id]
    )
    assert res.exit_code == 2, res.output
    assert "has no stored keys for layer(s) 0, 1" in res.stderr
    assert "alphaedit's carried state cannot be rebuilt" in res.stderr
    assert _as_it_was(db, run_id) == (before, 2)

    con = sqlite3.connect(db)
    con.execute("UPDATE edits SET method = 'memit' WHERE run_id = ?", (run_id,))
    con.commit()
    con.close()
    res = runner.invoke(
        app, ["replay", "--model", "tiny-gpt2", "--db", str(db), "--resume", run_id]
    )
    assert res.exit_code == 2, res.output
    assert "was made by memit, not alphaedit" in res.stderr
    assert before in ("cancelled", "interrupted")
    assert _as_it_was(db, run_id) == (before, 2)


def _as_it_was(db, run_id) -> tuple[str, int]:
    """The run's status and its number of stored edits."""
    with Store.open(db, create=False) as store:
        return store.get_run(run_id).status, len(store.edits(run_id))
