"""The methods of issue 30 through everything the seam gives, on tiny models: a batched
replay cancelled and resumed onto ``torch.equal`` weights (the carried state rebuilt
from the store), ``edit --method``, export, report, undo."""

from __future__ import annotations

import json
import threading

import pytest
import torch
from typer.testing import CliRunner

from evals.replay import EditDone, ReplayConfig, ReplayFinished, replay
from rome import Editor, load_model, load_preset
from workbench.cli import app
from workbench.store import Store

CFG = dict(
    n_edits=6, glue_every=4, glue_tasks=("sst2",), glue_limit=4, fluency_tokens=8,
    batch_size=2, retention_size=2, perplexity=False,
)  # fmt: skip
METHODS = ["memit-seq", "rect", "encore", "nas", "prune"]
SLOW = pytest.mark.slow  # the default selection keeps one run of each path


def some_slow(methods: list[str], fast: set[str]) -> list:
    return [m if m in fast else pytest.param(m, marks=SLOW) for m in methods]


def preset(method: str):
    hp = load_preset("tiny-gpt2-family")
    if method == "memit":  # the MEMIT_seq path of a running replay: memit, accumulating
        return hp.replace(method_settings={**hp.method_settings, "memit": {"accumulate": True}})
    return hp


def weights(lm, layers):
    ed = Editor(lm.model, lm.tokenizer, lm.hparams, keep_undo=False)
    return {x: ed.module(x).weight.detach().clone() for x in layers}


def run(path, method, cancel_after=None):
    lm = load_model("tiny-gpt2")
    hp = preset(method)
    cancel = threading.Event()
    with Store.open(path) as store:
        run_id = None
        for ev in replay(lm, store, ReplayConfig(method=method, **CFG), hparams=hp, cancel=cancel):
            if cancel_after is not None and isinstance(ev, EditDone) and ev.seq == cancel_after:
                cancel.set()
            if isinstance(ev, ReplayFinished):
                run_id, status = ev.run_id, ev.status
        return lm, hp, run_id, status


# memit with memit_accumulate: the path of a running replay; encore and prune: the
# stateful ones whose state is not MEMIT's K Kᵀ
@pytest.mark.parametrize("method", some_slow([*METHODS, "memit"], {"memit", "encore", "prune"}))
def test_batched_replay_cancelled_and_resumed_onto_equal_weights(tmp_path, method):
    lm, hp, _, status = run(tmp_path / "straight.db", method)
    assert status == "finished"
    want = weights(lm, hp.layers)
    _, _, run_id, status = run(tmp_path / "cut.db", method, cancel_after=1)
    assert status == "cancelled"
    with Store.open(tmp_path / "cut.db") as store:
        assert len(list(store.iter_steps(run_id))) == 1
        fresh = load_model("tiny-gpt2")  # a new process: base weights, nothing carried
        events = list(replay(fresh, store, resume=run_id))
        assert isinstance(events[-1], ReplayFinished) and events[-1].status == "finished"
        got = weights(fresh, hp.layers)
        assert {e.method for e in store.edits(run_id)} == {method}
    for layer in hp.layers:
        assert torch.equal(got[layer], want[layer]), f"layer {layer} differs after resume"


@pytest.mark.parametrize("method", some_slow(METHODS, {"nas"}))
def test_edit_method_on_the_cli_and_export_and_report(tmp_path, method):
    runner = CliRunner()
    res = runner.invoke(
        app,
        ["edit", "--model", "tiny-gpt2", "--hparams", str(_preset_file(tmp_path)),
         "--method", method, "--prompt", "{} is in", "--subject", "The Eiffel Tower",
         "--target-new", "Rome", "--json", "--generate-tokens", "0"],
    )  # fmt: skip
    assert res.exit_code == 0, res.output
    assert method in res.output
    lm, _, run_id, _ = run(tmp_path / "r.db", method)
    db = str(tmp_path / "r.db")
    out = tmp_path / "run.json"
    res = runner.invoke(app, ["export", run_id, "--db", db, "-o", str(out)])
    assert res.exit_code == 0, res.output
    assert {e["method"] for e in json.loads(out.read_text())["edits"]} == {method}
    res = runner.invoke(app, ["report", run_id, "--db", db, "-o", str(tmp_path / "rep")])
    assert res.exit_code == 0, res.output
    assert method in (tmp_path / "rep" / "README.md").read_text()


@pytest.mark.parametrize("method", METHODS)
def test_apply_and_undo_give_the_weights_back_bit_for_bit(method):
    lm = load_model("tiny-llama")
    ed = Editor(lm.model, lm.tokenizer, load_preset("tiny-llama-family"), cache_dir=None)
    from rome import EditRequest

    layers = ed.hp.edited_layers()
    base = ed.fingerprint(layers)
    upd = ed.edit([EditRequest("{} is in", "The Eiffel Tower", "Rome")], method)
    assert ed.fingerprint(layers) == base and upd.unsafe_reason is None
    ed.apply_step(upd)
    assert ed.fingerprint(layers) != base
    ed.undo()
    assert ed.fingerprint(layers) == base


def _preset_file(tmp_path):
    path = tmp_path / "tiny.json"
    path.write_text(json.dumps(load_preset("tiny-gpt2-family").to_dict()))
    return path
