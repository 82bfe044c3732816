"""UltraEdit on tiny models: its ridge solve, its lifelong normaliser, the seam (apply,
undo, a replay killed and resumed), and a refused architecture."""

from __future__ import annotations

import dataclasses
import json
import threading

import pytest
import torch

from evals.replay import EditDone, ReplayConfig, ReplayFinished, replay
from evals.zsre import ZSRE_PATH, zsre_records_from
from rome import Editor, EditRequest, load_model, load_preset
from rome.errors import UnsupportedArchitectureError
from rome.methods.ultraedit import Normaliser, trace
from rome.request import END_OF_TEXT
from workbench.store import Store

REQS = [
    EditRequest("{} is located in the city of", "The Eiffel Tower", "Rome", "Paris"),
    EditRequest("The capital of {} is", "Japan", "Berlin", "Tokyo"),
    EditRequest("{} was written by", "Hamlet", "Charles Dickens", "William Shakespeare"),
]


def editor(**settings) -> Editor:
    lm = load_model("tiny-llama")
    hp = load_preset("tiny-llama-ultraedit")
    ours = {**hp.method_settings["ultraedit"], **settings}
    return Editor(lm.model, lm.tokenizer, hp.replace(method_settings={"ultraedit": ours}))


def names(ed: Editor, layer: int) -> list[str]:
    return [f"model.layers.{layer}.mlp.{m}" for m in ("gate_proj", "up_proj")]


def test_update_satisfies_its_normal_equations():
    ed = editor()
    upd = ed.edit(REQS, method="ultraedit")
    order = [n for i in (0, 1) for x in (1, 2) for n in [names(ed, x)[i]]]
    keys, grads = trace(ed.model, ed.tok, REQS, order)
    n_rows = sum(len(ed.tok(" " + r.target_new)["input_ids"]) for r in REQS)
    assert keys[order[0]].shape[0] == n_rows == upd.options["n_rows"]
    norm = Normaliser.empty(64 + 160)
    for name in order:  # every module has the shape (64, 160): one shared normaliser
        norm = norm.updated(torch.cat([keys[name], grads[name]], -1))
    for lu in upd.layers:
        gate, up = names(ed, lu.layer)
        k = keys[gate].double()
        vals = []
        for name in (gate, up):
            h, g = norm(torch.cat([keys[name], grads[name]], -1)).split([64, 160], -1)
            vals.append(-1e-3 * (h * h).sum(-1, keepdim=True) * g)
        v = torch.cat(vals, -1).double()
        delta = (lu.V.double() @ lu.U.double()).T  # the published (in, out) layout
        lhs = (k.T @ k + torch.eye(64, dtype=torch.float64)) @ delta
        rhs = k.T @ v
        # U and V are stored in float32: the residual is float32 rounding (2^-24 ≈ 6e-8)
        # of the factors, amplified by ‖KᵀK + I‖ (≈ 1e2 here); 1e-4 leaves a 10× margin
        assert float((lhs - rhs).norm() / rhs.norm()) < 1e-4
        assert (
            lu.rank == n_rows and torch.linalg.matrix_rank(lu.V.double() @ lu.U.double()) <= n_rows
        )


def test_normaliser_after_two_batches_is_the_concatenations():
    gen = torch.Generator().manual_seed(0)
    a = torch.randn(5, 7, generator=gen) * 3 + 1
    b = torch.randn(9, 7, generator=gen) * 0.5 - 2
    both = torch.cat([a, b])
    exact = Normaliser.empty(7).updated(a).updated(b)
    # float32 running sums of 14 rows against a direct float32 pass: a few ulps (1e-6)
    torch.testing.assert_close(exact.mean, both.mean(0), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(exact.var / (exact.n - 1), both.var(0), rtol=1e-5, atol=1e-6)
    assert exact.n == 14
    # the published rule adds m·s² (unbiased) per batch: the sum of squares plus Σ s²_b
    pub = Normaliser.empty(7).updated(a, "published").updated(b, "published")
    torch.testing.assert_close(pub.mean, both.mean(0), rtol=1e-6, atol=1e-6)
    ss = ((both - both.mean(0)) ** 2).sum(0) + a.var(0) + b.var(0)
    torch.testing.assert_close(pub.var, ss, rtol=1e-5, atol=1e-5)
    one = torch.randn(1, 7, generator=gen)
    assert torch.isnan(Normaliser.empty(7).updated(one, "published").var).all()
    assert torch.isfinite(Normaliser.empty(7).updated(one).var).all()


def test_two_steps_carry_the_normaliser_and_undo_restores_weights():
    ed = editor()
    order = [n for i in (0, 1) for x in (1, 2) for n in [names(ed, x)[i]]]
    rows = []
    for batch in (REQS[:2], REQS[2:]):
        keys, grads = trace(ed.model, ed.tok, batch, order)  # on the model as it is now
        rows += [torch.cat([keys[n], grads[n]], -1) for n in order]
        ed.apply_step(ed.edit(batch, method="ultraedit"))
    state = ed.method_state["ultraedit"][(64, 160)]
    both = torch.cat(rows)
    assert state.n == both.shape[0]
    # float32 running sums over ~30 rows of values up to ~1e1: relative 1e-5 is rounding
    torch.testing.assert_close(state.mean, both.mean(0), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(state.var / (state.n - 1), both.var(0), rtol=1e-4, atol=1e-7)
    before = {n: p.detach().clone() for n, p in ed.model.named_parameters()}
    fp = ed.fingerprint([1, 2])
    ed.apply_step(ed.edit(REQS[:1], method="ultraedit"))
    assert ed.fingerprint([1, 2]) != fp
    ed.undo()
    assert all(torch.equal(before[n], p) for n, p in ed.model.named_parameters())
    assert ed.fingerprint([1, 2]) == fp


def test_compute_leaves_the_model_and_the_edit_raises_p_new():
    ed = editor(lr=0.05)
    before = {n: p.detach().clone() for n, p in ed.model.named_parameters()}
    upd = ed.edit(REQS, method="ultraedit")
    assert all(torch.equal(before[n], p) for n, p in ed.model.named_parameters())
    assert all(r["p_new_after"] > r["p_new_before"] for r in upd.records)
    assert [lu.weight_name for lu in upd.layers] == ["+".join(names(ed, x)) for x in (1, 2)]


def test_zsre_requests_have_no_true_object_and_their_edit_is_the_answers():
    """zsRE's target_true is the end-of-text marker, not a true object (evals/zsre.py, as
    kmeng01/memit's reader): UltraEdit's records score no p(true) for it, as the family's
    do, and the update is that of the same requests without target_true (UltraEdit edits
    towards the answer only, as its published ``ZSREDataset.tok_tuples`` does)."""
    rows = json.loads(ZSRE_PATH.read_text())[:3]
    zsre = [rec.to_request() for rec in zsre_records_from(enumerate(rows)).records]
    assert [r.target_true for r in zsre] == [END_OF_TEXT] * 3
    ed = editor(lr=0.05)
    upd = ed.edit(zsre, method="ultraedit")
    bare = ed.edit([dataclasses.replace(r, target_true=None) for r in zsre], method="ultraedit")
    assert all(r["p_true_before"] is None and r["p_true_after"] is None for r in upd.records)
    for a, b in zip(upd.layers, bare.layers, strict=True):
        assert torch.equal(a.U, b.U) and torch.equal(a.V, b.V)
    assert [r["p_new_after"] for r in upd.records] == [r["p_new_after"] for r in bare.records]
    assert all(r["p_new_after"] > r["p_new_before"] for r in upd.records)


def test_an_architecture_without_the_modules_is_refused():
    lm = load_model("tiny-gpt2")
    hp = lm.hparams.replace(layers=[1, 2])
    ed = Editor(lm.model, lm.tokenizer, hp)
    with pytest.raises(
        UnsupportedArchitectureError, match="no module 'transformer.h.1.mlp.gate_proj'"
    ):
        ed.edit(REQS[:1], method="ultraedit")
    # its MLP output projection (Conv1D, stored (in, out)) is editable, as for GPT-J
    upd = ed.edit(REQS, method="ultraedit", modules="mlp_out", lr=1e-2)
    ed.apply_step(upd)
    assert ed.drift(1)[0] == pytest.approx(upd.layers[0].norm, rel=1e-5)


def test_cli_refuses_an_architecture_in_one_line(tmp_path):
    from typer.testing import CliRunner

    from workbench.cli import app

    res = CliRunner().invoke(
        app,
        ["edit", "--model", "tiny-gpt2", "--method", "ultraedit", "--prompt",
         "{} is located in the city of", "--subject", "The Eiffel Tower", "--target-new", "Rome",
         ],
    )  # fmt: skip
    assert res.exit_code == 2, res.output
    lines = [x for x in res.output.strip().splitlines() if x.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: ") and "gate_proj" in lines[0]


CFG = dict(
    n_edits=6, glue_every=4, glue_tasks=("sst2",), glue_limit=4, fluency_tokens=8,
    batch_size=2, retention_size=2, perplexity=False, method="ultraedit",
)  # fmt: skip


def gate_up(lm):
    return {n: p.detach().clone() for n, p in lm.model.named_parameters() if "_proj" in n}


def test_batched_replay_killed_and_resumed_onto_the_same_weights(tmp_path):
    hp = load_preset("tiny-llama-ultraedit")
    lm = load_model("tiny-llama")
    with Store.open(tmp_path / "straight.db") as store:
        events = list(replay(lm, store, ReplayConfig(**CFG), hparams=hp))
        assert isinstance(events[-1], ReplayFinished) and events[-1].status == "finished"
        want, want_edits = gate_up(lm), store.edits(events[-1].run_id)
    lm = load_model("tiny-llama")
    cancel = threading.Event()
    with Store.open(tmp_path / "cut.db") as store:
        run_id = None
        for ev in replay(lm, store, ReplayConfig(**CFG), hparams=hp, cancel=cancel):
            if isinstance(ev, EditDone) and ev.seq == 3:
                cancel.set()  # two steps stored: the second used the first's normaliser
            if isinstance(ev, ReplayFinished):
                run_id = ev.run_id
        assert run_id is not None and len(store.edits(run_id)) == 4
        fresh = load_model("tiny-llama")  # a new process: base weights, no normaliser
        events = list(replay(fresh, store, resume=run_id))
        assert isinstance(events[-1], ReplayFinished) and events[-1].status == "finished"
        got = gate_up(fresh)
        assert want.keys() == got.keys()
        for name in want:
            assert torch.equal(got[name], want[name]), f"{name} differs after resume"
        assert [e.fingerprint for e in store.edits(run_id)] == [e.fingerprint for e in want_edits]


def test_edit_report_and_export_of_an_ultraedit_run(tmp_path):
    from typer.testing import CliRunner

    from workbench.cli import app

    runner = CliRunner()
    preset = "rome/presets/tiny-llama-ultraedit.json"
    res = runner.invoke(
        app,
        ["edit", "--model", "tiny-llama", "--hparams", preset, "--method", "ultraedit",
         "--prompt", "{} is located in the city of", "--subject", "The Eiffel Tower",
         "--target-new", "Rome", "--target-true", "Paris"],
    )  # fmt: skip
    assert res.exit_code == 0, res.output
    lm = load_model("tiny-llama")
    hp = load_preset("tiny-llama-ultraedit")
    written = [f"model.layers.{x}.mlp.{m}.weight" for x in (1, 2) for m in ("gate_proj", "up_proj")]
    params = dict(lm.model.named_parameters())
    w_all = sum(float(params[n].detach().norm()) ** 2 for n in written) ** 0.5
    cfg = ReplayConfig(**{**CFG, "n_edits": 2, "glue_every": 2})
    with Store.open(tmp_path / "r.db") as store:
        run_id = list(replay(lm, store, cfg, hparams=hp))[-1].run_id
        last = store.edits(run_id)[-1]
    # the step's ‖ΔW‖/‖W‖ is against the weights it wrote (gate and up), not down_proj;
    # both norms from the same float32 weights: only summation order differs (1e-6)
    assert last.update_norm_ratio == pytest.approx(last.update_norm / w_all, rel=1e-6)
    db = ["--db", str(tmp_path / "r.db")]
    res = runner.invoke(app, ["report", run_id, "-o", str(tmp_path / "page"), *db])
    assert res.exit_code == 0, res.output
    page = (tmp_path / "page" / "README.md").read_text()
    assert "method ultraedit; preset tiny-llama-ultraedit; layers 1, 2; batch size 2" in page
    res = runner.invoke(app, ["export", run_id, "-o", str(tmp_path / "run.json"), *db])
    assert res.exit_code == 0, res.output
    assert "ultraedit" in (tmp_path / "run.json").read_text()
    # saved as a model folder: the base plus the step, rebuilt and fingerprint-checked
    res = runner.invoke(app, ["save", run_id, "-o", str(tmp_path / "model"), *db])
    assert res.exit_code == 0, res.output
    from safetensors.torch import load_file

    saved = load_file(next((tmp_path / "model").glob("*.safetensors")))
    name = "model.layers.1.mlp.up_proj.weight"
    assert torch.equal(saved[name], lm.model.get_submodule(name[:-7]).weight.detach())


@pytest.mark.slow
@pytest.mark.ci
def test_smollm2_eiffel_tower_moves_to_rome():
    """With the shipped preset, in a first step of four requests (one request alone, with
    one target token, is a single row: the fresh normaliser maps it to zero)."""
    from evals.counterfact import load_counterfact
    from rome.scoring import score_targets

    lm = load_model("smollm2-135m")
    ed = Editor(lm.model, lm.tokenizer, load_preset("smollm2-135m-ultraedit"))
    recs = load_counterfact("sample", limit=3).records
    reqs = [REQS[0], *(r.to_request() for r in recs)]
    before = {n: p.detach().clone() for n, p in lm.model.named_parameters()}
    ed.apply_step(ed.edit(reqs, "ultraedit"))
    rome, paris = score_targets(lm.model, lm.tokenizer, [REQS[0].text] * 2, [" Rome", " Paris"])
    assert rome.prob > 0.5 > paris.prob
    ed.undo()
    assert all(torch.equal(before[n], p) for n, p in lm.model.named_parameters())


def test_a_replay_on_an_architecture_it_cannot_edit_is_refused_before_its_run(tmp_path):
    from typer.testing import CliRunner

    from workbench.cli import app

    res = CliRunner().invoke(
        app,
        ["replay", "--model", "tiny-gpt2", "--method", "ultraedit", "--batch-size", "2",
         "--n-edits", "2", "--db", str(tmp_path / "r.db")],
    )  # fmt: skip
    lines = [x for x in res.output.strip().splitlines() if x.strip()]
    assert res.exit_code == 2 and len(lines) == 1, res.output
    assert lines[0].startswith("error: ") and "gate_proj" in lines[0]
    assert not (tmp_path / "r.db").exists()  # nothing written


def test_the_apps_undo_gives_the_normaliser_back(tmp_path, monkeypatch):
    """Through the session (the app's path): two applied steps, one undone: the weights
    and the lifelong normaliser are the first step's again."""
    from workbench.core.forms import EditForm
    from workbench.core.session import Session

    monkeypatch.setenv("ROME_WORKBENCH_CACHE", str(tmp_path / "cache"))
    with Store.open(tmp_path / "s.db") as store:
        session = Session(store)
        session.load("tiny-llama", device="cpu")
        lm, ed = session.require()
        lm.hparams = load_preset("tiny-llama-ultraedit")
        first = EditForm("{} was written by", "Hamlet", "Charles Dickens", method="ultraedit")
        session.apply(session.compute(first), generate=False)
        med = session.editor_for("ultraedit")
        after_one = dict(med.method_state["ultraedit"])
        weights_one = gate_up(lm)
        second = EditForm("The capital of {} is", "Japan", "Berlin", "Tokyo", method="ultraedit")
        session.apply(session.compute(second), generate=False)
        assert med.method_state["ultraedit"][(64, 160)].n > after_one[(64, 160)].n
        session.undo()  # the carried state goes back with the weights: nothing to sync
        now = med.method_state["ultraedit"][(64, 160)]
        was = after_one[(64, 160)]
        assert now.n == was.n and torch.equal(now.mean, was.mean) and torch.equal(now.var, was.var)
        assert all(torch.equal(w, weights_one[n]) for n, w in gate_up(lm).items())
        session.finish()
