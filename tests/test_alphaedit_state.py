"""AlphaEdit's state in its package's format (jianghoucheng/AlphaEdit alphaedit/editor.py
save_state): exported from a run, started from by a replay (and its resume), refused in
one line when its layers or shapes do not fit."""

from __future__ import annotations

import threading

import pytest
import torch
from typer.testing import CliRunner

from evals.counterfact import load_counterfact
from evals.replay import EditDone, ReplayConfig, ReplayFinished, replay
from evals.spec import RunSpec
from rome import Editor, load_model, load_preset
from rome.methods.alphaedit_state import read_state, use_state
from workbench.cli import app
from workbench.store import Store

CFG = dict(
    n_edits=4, glue_every=4, glue_tasks=("sst2",), glue_limit=2, fluency_tokens=4,
    batch_size=2, retention_size=0, perplexity=False, pre_metrics=False, method="alphaedit",
)  # fmt: skip


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """An alphaedit run of 4 edits (2 steps) on tiny GPT-2 and its exported state."""
    tmp = tmp_path_factory.mktemp("state")
    hp = load_preset("tiny-gpt2-family")
    with Store.open(tmp / "a.db") as store:
        events = list(replay(load_model("tiny-gpt2"), store, ReplayConfig(**CFG), hparams=hp))
        run_id = events[-1].run_id
        keys = {x: [] for x in hp.layers}
        for step in store.iter_steps(run_id):
            for lu in step.layers:
                keys[lu.layer].append(lu.keys)
    path = tmp / "state.pt"
    res = CliRunner().invoke(
        app, ["export-state", run_id, "-o", str(path), "--db", str(tmp / "a.db")]
    )
    assert res.exit_code == 0, res.output
    return tmp, path, keys


def test_export_writes_the_packages_format(exported):
    _, path, keys = exported
    raw = torch.load(path, map_location="cpu", weights_only=True)  # as its _load_state reads
    assert set(raw) == {"layers", "projection", "key_covariance"}
    hp = load_preset("tiny-gpt2-family")
    assert raw["layers"] == hp.layers
    lm = load_model("tiny-gpt2")
    ed = Editor(lm.model, lm.tokenizer, hp)
    from rome.methods import get_method

    alpha = get_method("alphaedit")
    for i, layer in enumerate(hp.layers):
        threshold = alpha.settings(hp).nullspace_threshold
        p, _ = alpha.projector(ed.context(alpha), layer, threshold)
        assert raw["projection"].dtype == torch.float32
        # P from the same C₀ on the same machine: the same float32 arithmetic, bit for bit
        assert torch.equal(raw["projection"][i], p)
        k1, k2 = (k.float() for k in keys[layer])
        assert torch.equal(raw["key_covariance"][i], k1 @ k1.T + k2 @ k2.T)


def weights(lm, layers):
    ed = Editor(lm.model, lm.tokenizer, lm.hparams, keep_undo=False)
    return {x: ed.module(x).weight.detach().clone() for x in layers}


def test_a_replay_starts_from_the_state_and_resumes_onto_it(exported):
    tmp, path, _ = exported
    hp = load_preset("tiny-gpt2-family")
    cfg = dict(CFG, initial_state=str(path))
    lm = load_model("tiny-gpt2")
    with Store.open(tmp / "b.db") as store:
        events = list(replay(lm, store, ReplayConfig(**cfg), hparams=hp))
        assert events[-1].status == "finished"
        want = weights(lm, hp.layers)
        first = next(iter(store.iter_steps(events[-1].run_id)))
    # the first step equals AlphaEdit computed on an editor holding the state (the
    # run's own preset: its stored templates), bit for bit on this machine
    with Store.open(tmp / "b.db") as store:
        run_hp = RunSpec.of(store.get_run(events[-1].run_id)).edit_hparams(hp)
    lm2 = load_model("tiny-gpt2")
    ed = Editor(lm2.model, lm2.tokenizer, run_hp)
    use_state(ed, read_state(path))
    recs = load_counterfact("sample", limit=2, tokenizer=lm2.tokenizer).records
    upd = ed.edit([r.to_request() for r in recs], "alphaedit")
    for lu, stored in zip(upd.layers, first.layers, strict=True):
        assert torch.equal(lu.U, stored.U) and torch.equal(lu.V, stored.V)
    # killed after its first step, resumed in a fresh model: the state is read again
    lm3 = load_model("tiny-gpt2")
    cancel = threading.Event()
    with Store.open(tmp / "c.db") as store:
        for ev in replay(lm3, store, ReplayConfig(**cfg), hparams=hp, cancel=cancel):
            if isinstance(ev, EditDone) and ev.seq == 1:
                cancel.set()
            if isinstance(ev, ReplayFinished):
                run_id = ev.run_id
        fresh = load_model("tiny-gpt2")
        events = list(replay(fresh, store, resume=run_id))
        assert events[-1].status == "finished"
        got = weights(fresh, hp.layers)
    for layer in hp.layers:
        assert torch.equal(got[layer], want[layer])


def one_line_error(res) -> str:
    lines = [x for x in res.output.strip().splitlines() if x.strip()]
    assert res.exit_code == 2 and len(lines) == 1 and lines[0].startswith("error: "), res.output
    return lines[0]


def cli_replay(tmp, state, db="x.db", method="alphaedit"):
    return CliRunner().invoke(
        app,
        ["replay", "--model", "tiny-gpt2", "--hparams", "rome/presets/tiny-gpt2-family.json",
         "--method", method, "--batch-size", "2", "--n-edits", "2", "--glue-every", "2",
         "--glue-tasks", "sst2", "--glue-limit", "2", "--no-perplexity", "--retention-size", "0",
         "--initial-state", str(state), "--db", str(tmp / db)],
    )  # fmt: skip


@pytest.mark.parametrize(
    "change, why",
    [
        (lambda s: {**s, "layers": [1]}, "is for layers [1], this run edits [0, 1]"),
        (
            lambda s: {
                "layers": [0, 1],
                "projection": s["projection"][:, :8, :8].clone(),
                "key_covariance": s["key_covariance"][:, :8, :8].clone(),
            },
            "is 8 wide",
        ),
        (lambda s: {"layers": [0, 1], "projection": s["projection"]}, "is not an AlphaEdit state"),
    ],
)
def test_a_state_that_does_not_fit_is_refused_in_one_line(exported, tmp_path, change, why):
    _, path, _ = exported
    raw = torch.load(path, weights_only=True)
    if "layers" in raw and change(raw)["layers"] == [1]:
        raw = {
            **raw,
            "projection": raw["projection"][1:],
            "key_covariance": raw["key_covariance"][1:],
        }
    bad = tmp_path / "bad.pt"
    torch.save(change(raw), bad)  # as the package's torch.save would write it
    line = one_line_error(cli_replay(tmp_path, bad))
    assert why in line
    assert not (tmp_path / "x.db").exists()  # nothing written


def test_another_method_is_refused(exported, tmp_path):
    _, path, _ = exported
    line = one_line_error(cli_replay(tmp_path, path, method="memit"))
    assert "not for memit" in line
    with Store.open(tmp_path / "m.db") as store:
        cfg = ReplayConfig(**{**CFG, "method": "memit", "n_edits": 2})
        run_id = list(
            replay(load_model("tiny-gpt2"), store, cfg, hparams=load_preset("tiny-gpt2-family"))
        )[-1].run_id
    res = CliRunner().invoke(
        app, ["export-state", run_id, "-o", str(tmp_path / "s.pt"), "--db", str(tmp_path / "m.db")]
    )
    assert "only an alphaedit run" in one_line_error(res)
    assert not (tmp_path / "s.pt").exists()
