"""zsRE (issue 29): the MEND-format reader, format detection, both scoring protocols,
every method replaying zsRE requests, and ``--order-seed``."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from fault_helpers import GLUE, SAMPLE, error_line, invoke, kill_after

from evals.counterfact import CounterFactRecord
from evals.datasets import detect_format, load_records, order_of
from evals.errors import EvalDataError
from evals.metrics import record_metrics
from evals.replay import ReplayConfig, replay
from evals.zsre import END_OF_TEXT, ZSRE_PATH, ZsreRecord, record_of
from evals.zsre_scoring import (
    PROTOCOL_LABELS,
    TEACHER_FORCED,
    TOP1,
    ZsreMetrics,
    answer_ids,
    neighborhood_queries,
    top1_queries,
)
from rome import Editor, EditRequest, load_model
from rome.hparams import method_preset
from workbench.core.methods import load_batch
from workbench.store import Store

RAW = json.loads(ZSRE_PATH.read_text())


@pytest.fixture(scope="module")
def lm():
    return load_model("tiny-gpt2")


# --- the reader ---------------------------------------------------------------------


def test_the_bundled_records_read_as_the_published_reader_makes_requests() -> None:
    loaded = load_records("zsre")
    assert len(loaded) == len(RAW) == 800 and loaded.skipped == []
    for i, (rec, raw) in enumerate(zip(loaded.records, RAW, strict=True)):
        assert isinstance(rec, ZsreRecord) and rec.case_id == i
        assert rec.prompt == raw["src"].replace(raw["subject"], "{}")
        assert rec.text == raw["src"] and rec.subject == raw["subject"]
        assert rec.target_new == raw["answers"][0] and rec.target_true == END_OF_TEXT
        assert rec.paraphrase_prompts == [raw["rephrase"]]
        assert (rec.loc, rec.loc_ans) == (raw["loc"], raw["loc_ans"])
        assert rec.to_request().validate().target_true == END_OF_TEXT


def test_a_stored_zsre_record_comes_back_as_one() -> None:
    rec = load_records("zsre", limit=1).records[0]
    back = record_of(json.loads(json.dumps(rec.to_dict())))
    assert isinstance(back, ZsreRecord) and back == rec
    cf = load_records("sample", limit=1).records[0]
    again = record_of(cf.to_dict())
    assert type(again) is CounterFactRecord and again == cf
    assert "dataset" not in cf.to_dict()  # CounterFact runs' fingerprints are unchanged


def test_unusable_zsre_records_are_skipped_with_the_reason(tmp_path: Path) -> None:
    twice = dict(RAW[0], src=f"{RAW[0]['subject']} or {RAW[0]['subject']}?")
    no_nq = dict(RAW[1], loc="who wrote hamlet")
    no_answer = dict(RAW[2], answers=[])
    path = tmp_path / "z.json"
    path.write_text(json.dumps([twice, no_nq, no_answer, RAW[3]]))
    loaded = load_records(path)
    assert [r.case_id for r in loaded.records] == [3]
    reasons = dict(loaded.skipped)
    assert "occurs 2 times" in reasons[0]
    assert "nq question" in reasons[1]
    assert "answers" in reasons[2]


def test_the_format_is_detected_and_a_file_of_neither_is_refused(tmp_path: Path) -> None:
    mend_cf = json.loads(SAMPLE.read_text())[:2]
    assert detect_format(mend_cf, "x") == "counterfact"
    rome_cf = [{"case_id": 1, "requested_rewrite": {}}]
    assert detect_format(rome_cf, "x") == "counterfact"
    assert detect_format(RAW[:2], "x") == "zsre"
    with pytest.raises(EvalDataError, match="neither CounterFact .* nor zsRE"):
        detect_format([{"question": "q", "answer": "a"}], "odd.json")
    with pytest.raises(EvalDataError, match="holds no records"):
        detect_format([], "empty.json")


def test_a_replay_of_a_file_of_neither_format_is_one_line_exit_2(tmp_path: Path) -> None:
    odd = tmp_path / "odd.json"
    odd.write_text(json.dumps([{"question": "Who?", "answer": "me"}]))
    db = tmp_path / "new" / "w.db"
    args = ["replay", "--model", "tiny-gpt2", "--dataset", odd, "--n-edits", 1, "--db", db]
    line = error_line(invoke(args), 2)
    assert "neither CounterFact" in line and "nor zsRE" in line and str(odd) in line
    assert not db.exists() and not db.parent.exists()


# --- scoring ------------------------------------------------------------------------


def _argmax_alone(model, tok, text: str) -> tuple[int, torch.Tensor]:
    """The top-1 next token after ``text`` run alone (no batch, no padding), and the
    logits it was taken from."""
    ids = torch.tensor([tok(text)["input_ids"]])
    with torch.no_grad():
        logits = model(input_ids=ids).logits[0, -1]
    return int(logits.argmax()), logits


def _agrees(batched: int, alone: int, logits: torch.Tensor, want: int) -> bool:
    """Whether a batched 0/1 verdict matches the one computed alone. A difference is
    allowed only where the alone run's top two logits are within 1e-5 of each other:
    batched and single runs sum in different orders, so a near tie may fall either way
    (float32 sums of a few hundred terms of this model differ by ~1e-6)."""
    if batched == int(alone == want):
        return True
    top2 = logits.topk(2).values
    return float(top2[0] - top2[1]) < 1e-5


def test_top1_queries_match_each_prompt_run_alone(lm) -> None:
    tok = lm.tokenizer
    for rec in load_records("zsre", limit=3).records:
        assert isinstance(rec, ZsreRecord)
        m = record_metrics(lm.model, tok, rec)
        assert isinstance(m, ZsreMetrics) and m.protocol == TOP1
        queries = {
            "rewrite": top1_queries(tok, rec.text, rec.target_new),
            "paraphrase": top1_queries(tok, rec.paraphrase_prompts[0], rec.target_new),
            "neighborhood": neighborhood_queries(tok, rec),
        }
        for group, qs in queries.items():
            assert len(m.tokens[group]) == len(qs) > 0
            for got, (prompt, want) in zip(m.tokens[group], qs, strict=True):
                alone, logits = _argmax_alone(lm.model, tok, prompt)
                assert _agrees(got, alone, logits, want), (group, prompt)
        n = len(answer_ids(tok, rec.target_new))
        assert len(m.tokens["rewrite"]) == n
        assert m.es == sum(m.tokens["rewrite"]) / n
        assert m.ns == sum(m.tokens["neighborhood"]) / len(m.tokens["neighborhood"])


def test_teacher_forced_accuracy_matches_a_prefix_by_prefix_loop(lm) -> None:
    tok = lm.tokenizer
    rec = load_records("zsre", limit=1).records[0]
    assert isinstance(rec, ZsreRecord)
    m = record_metrics(lm.model, tok, rec)
    assert isinstance(m, ZsreMetrics) and m.tf_protocol == TEACHER_FORCED
    for group, (prompt, answer) in {
        "rewrite_tf": (rec.text, rec.target_new),
        "neighborhood_tf": (rec.loc, rec.loc_ans),
    }.items():
        full = tok(f"{prompt} {answer}")["input_ids"]
        start = len(tok(prompt)["input_ids"])
        assert len(m.tokens[group]) == len(full) - start
        for j, got in enumerate(m.tokens[group]):
            ids = torch.tensor([full[: start + j]])
            with torch.no_grad():
                logits = lm.model(input_ids=ids).logits[0, -1]
            assert _agrees(got, int(logits.argmax()), logits, full[start + j])
    assert m.es_tf == sum(m.tokens["rewrite_tf"]) / len(m.tokens["rewrite_tf"])


def test_a_record_the_model_answers_holds_under_both_protocols(lm) -> None:
    """A zsRE record whose answer is the model's own greedy continuation scores ES = 1
    (it holds) under the published protocol, and 1 teacher-forced."""
    tok, model = lm.tokenizer, lm.model
    rec = load_records("zsre", limit=1).records[0]
    assert isinstance(rec, ZsreRecord)
    text = rec.text
    for _ in range(3):  # the model's own three next tokens, as text
        nxt, _ = _argmax_alone(model, tok, text)
        text += tok.decode([nxt])
    answer = text[len(rec.text) :]
    if not answer.startswith(" ") or answer_ids(tok, answer[1:]) != tok(answer)["input_ids"]:
        pytest.skip("this model's continuation does not re-tokenize as it was generated")
    own = ZsreRecord(**{**rec.to_dict(), "target_new": answer[1:]})
    m = record_metrics(model, tok, own)
    assert m.es == 1.0 and isinstance(m, ZsreMetrics) and m.es_tf == 1.0


# --- every method replays zsRE requests ---------------------------------------------------


def _glue_dir(tmp_path: Path) -> Path:
    glue = tmp_path / "glue"
    glue.mkdir(exist_ok=True)
    (glue / "sst2.jsonl").write_text((GLUE / "sst2.jsonl").read_text())
    return glue


def _replay_args(tmp_path: Path, db: Path, n: int, *extra: object) -> list:
    return [
        "replay", "--model", "tiny-gpt2", "--dataset", "zsre", "--n-edits", n,
        "--glue-every", n, "--glue-limit", 2, "--glue-tasks", "sst2",
        "--glue-dir", _glue_dir(tmp_path), "--no-perplexity", "--retention-size", 1,
        "--db", db, *extra,
    ]  # fmt: skip


@pytest.mark.parametrize("method", ["rome", "memit", "emmet", "alphaedit"])
def test_every_method_replays_zsre_and_stores_both_protocols(tmp_path: Path, method) -> None:
    db = tmp_path / "w.db"
    batch = ["--batch-size", 2] if method != "rome" else []
    res = invoke(_replay_args(tmp_path, db, 2, "--method", method, *batch))
    assert res.exit_code == 0, res.output
    assert "top-1" in res.stdout and "teacher-forced" in res.stdout  # labelled in the summary
    with Store.open(db) as store:
        (run,) = store.list_runs()
        edits = store.edits(run.id)
        assert [e.case_id for e in edits] == [0, 1] and all(e.applied for e in edits)
        for e in edits:
            assert e.record["counterfact"]["dataset"] == "zsre"
            assert e.request["target_true"] == END_OF_TEXT
            for m in (e.metrics, e.metrics["pre"]):
                assert m["protocol"] == TOP1 and m["tf_protocol"] == TEACHER_FORCED
                assert m["es"] == sum(m["tokens"]["rewrite"]) / len(m["tokens"]["rewrite"])
                assert 0.0 <= m["es_tf"] <= 1.0 and m["em"] is None
        rescored = store.rescores(run.id)
        assert len(rescored) == 2 and all(r.metrics["protocol"] == TOP1 for r in rescored)
        (ret,) = [c for c in store.checkpoints(run.id) if c.task == "retention" and c.step == 2]
        assert ret.n == 1


# --- the order of the stream --------------------------------------------------------------


def test_an_order_seed_gives_one_reproducible_order_and_longer_runs_extend_it() -> None:
    n = len(RAW)
    assert order_of(n, None) == list(range(n))
    assert order_of(n, 7) == order_of(n, 7) != order_of(n, 8)
    assert sorted(order_of(n, 7)) == list(range(n))
    ten = [r.case_id for r in load_records("zsre", limit=10, order_seed=7).records]
    four = [r.case_id for r in load_records("zsre", limit=4, order_seed=7).records]
    assert ten == order_of(n, 7)[:10] and four == ten[:4]
    # CounterFact too: the file's positions are shuffled, the records keep their case ids
    rows = json.loads(SAMPLE.read_text())
    cf = load_records("sample", limit=5, order_seed=7).records
    assert [r.case_id for r in cf] == [rows[i]["case_id"] for i in order_of(len(rows), 7)[:5]]


def test_a_run_stores_its_order_and_resume_and_extend_keep_it(tmp_path: Path) -> None:
    db = tmp_path / "w.db"
    res = invoke(_replay_args(tmp_path, db, 2, "--order-seed", 11))
    assert res.exit_code == 0, res.output
    with Store.open(db) as store:
        (run,) = store.list_runs()
    assert json.loads(json.dumps(run.hparams))["replay"]["order_seed"] == 11
    extend = ["replay", "--resume", run.id, "--db", db, "--extend-to", 3, "--order-seed", 5]
    res = invoke(extend)
    assert res.exit_code == 0, res.output
    assert "--order-seed" in res.stderr  # a resumed run keeps its own order: noted, ignored
    with Store.open(db) as store:
        got = [e.case_id for e in store.edits(run.id)]
    assert got == order_of(len(RAW), 11)[:3]


CHILD = """
import sys
from evals.replay import ReplayConfig, replay
from rome import load_model
from workbench.store import Store
cfg = ReplayConfig(dataset="zsre", order_seed=3, n_edits=6, glue_every=100,
                   glue_tasks=("sst2",), glue_limit=2, fluency_tokens=4, perplexity=False,
                   retention_size=2)
for ev in replay(load_model("tiny-gpt2"), Store.open(sys.argv[1]), cfg):
    pass
"""


def _kill_after(db: Path, n: int) -> str:
    """Run the child replay and SIGKILL it once ``n`` edits are stored; the run's id."""
    child = subprocess.Popen([sys.executable, "-c", CHILD, str(db)], env=dict(os.environ))
    run_id, done = kill_after(db, n, child)
    assert run_id is not None and n <= done < 6, "the child should be killed mid-run"
    return run_id


def _edits(store: Store, run_id: str) -> list[tuple]:
    return [
        (e.seq, e.case_id, e.fingerprint, json.dumps(e.metrics["tokens"], sort_keys=True))
        for e in store.edits(run_id)
    ]


def test_a_killed_and_resumed_shuffled_run_equals_an_uninterrupted_one(tmp_path: Path) -> None:
    killed = tmp_path / "killed.db"
    run_id = _kill_after(killed, 2)
    lm = load_model("tiny-gpt2")
    with Store.open(killed) as store:
        events = list(replay(lm, store, resume=run_id))
        assert events[-1].status == "finished"
        resumed = _edits(store, run_id)
        resumed_final = [(r.seq, r.metrics["tokens"]) for r in store.rescores(run_id)]
    cfg = ReplayConfig(
        dataset="zsre", order_seed=3, n_edits=6, glue_every=100, glue_tasks=("sst2",),
        glue_limit=2, fluency_tokens=4, perplexity=False, retention_size=2,
    )  # fmt: skip
    with Store.open(tmp_path / "whole.db") as store:
        fin = list(replay(load_model("tiny-gpt2"), store, cfg))[-1]
        whole = _edits(store, fin.run_id)
        whole_final = [(r.seq, r.metrics["tokens"]) for r in store.rescores(fin.run_id)]
    assert [c for _, c, _, _ in whole] == order_of(len(RAW), 3)[:6]
    assert resumed == whole  # same records, same order, same weights after each, same scores
    assert resumed_final == whole_final


# --- an end-of-text target_true is no true object -----------------------------------------


def test_an_end_of_text_target_true_is_no_true_object() -> None:
    assert EditRequest("{} is", "A", "B", END_OF_TEXT).true_object is None
    assert EditRequest("{} is", "A", "B", f" {END_OF_TEXT}").true_object is None
    assert EditRequest("{} is", "A", "B").true_object is None
    assert EditRequest("{} is", "A", "B", "C").true_object == "C"


@pytest.mark.parametrize("method", ["rome", "memit", "emmet", "alphaedit"])
def test_the_update_does_not_read_target_true(lm, method) -> None:
    """v* (either stopping rule) and the solves see target_new only: a zsRE request
    and the same request without target_true give the same update, bit for bit (both
    computed here, on this machine)."""
    rec = load_records("zsre", limit=1).records[0]
    zsre_req = rec.to_request()
    bare = EditRequest(zsre_req.prompt, zsre_req.subject, zsre_req.target_new)
    for stop in ("loss", "most_probable"):
        hp = method_preset(lm.hparams, method).replace(v_stop=stop)
        ups = []
        for req in (zsre_req, bare):
            ed = Editor(lm.model, lm.tokenizer, hp, keep_undo=False)
            ups.append(ed.edit([req], method))
        a, b = ups
        assert [x.layer for x in a.layers] == [x.layer for x in b.layers]
        for la, lb in zip(a.layers, b.layers, strict=True):
            assert torch.equal(la.U, lb.U) and torch.equal(la.V, lb.V), (method, stop)
        fields = [r.get("p_true_before") for r in a.records if "p_true_before" in r]
        assert all(p is None for p in fields)


def test_edit_takes_a_zsre_file_and_judges_it_without_a_true_object(tmp_path: Path) -> None:
    path = tmp_path / "z.json"
    path.write_text(json.dumps(RAW[:2]))
    reqs = load_batch(path)
    assert [r.target_new for r in reqs] == [RAW[0]["answers"][0], RAW[1]["answers"][0]]
    assert all(r.target_true == END_OF_TEXT for r in reqs)
    rows = []
    for method in ("rome", "memit", "emmet", "alphaedit"):
        args = ["edit", "--model", "tiny-gpt2", "--method", method, "--batch", path, "--json"]
        res = invoke(args)
        assert res.exit_code == 0, res.output
        rows += json.loads(res.stdout)
    assert {r["method"] for r in rows} == {"rome", "memit", "emmet", "alphaedit"}
    for r in rows:
        assert r["p_true_before"] == [None, None] and r["p_true_after"] == [None, None]
        assert r["efficacy_before"] == 0.0  # nothing to beat before the edit
        rose = [a > b for a, b in zip(r["p_new_after"], r["p_new_before"], strict=True)]
        assert r["efficacy"] == sum(rose) / 2  # held: p(new) rose
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps([dict(RAW[0], src="no subject here")]))
    line = error_line(invoke(["edit", "--model", "tiny-gpt2", "--batch", bad]), 2)
    assert "zsRE record 0" in line and "occurs 0 times" in line


def test_the_report_and_the_app_name_both_protocols(tmp_path: Path) -> None:
    pytest.importorskip("textual")
    from rich.console import Console

    from workbench.core.report import report_markdown
    from workbench.tui.panes.runs import scores_table
    from workbench.tui.replay_data import series_from_store

    cfg = ReplayConfig(
        dataset="zsre", n_edits=1, glue_every=1, glue_tasks=("sst2",), glue_limit=2,
        fluency_tokens=4, perplexity=False, retention_size=1, order_seed=2,
    )  # fmt: skip
    with Store.open(tmp_path / "r.db") as store:
        fin = list(replay(load_model("tiny-gpt2"), store, cfg))[-1]
        page = report_markdown(store, [fin.run_id], None)
        out = io.StringIO()
        series = [series_from_store(store, store.get_run(fin.run_id))]
        Console(file=out, width=250).print(scores_table(series))
    for text in (page, out.getvalue()):
        assert PROTOCOL_LABELS[TOP1] in text and PROTOCOL_LABELS[TEACHER_FORCED] in text
    assert "order of seed 2" in page and "every token of its answer" in page
    assert "zsRE scores by protocol" in out.getvalue()


@pytest.mark.slow
@pytest.mark.ci
def test_a_rome_edit_on_smollm2_makes_a_zsre_record_hold() -> None:
    """The bundled record 0 (UniFirst -> uniform): not held by the unedited SmolLM2,
    held after one r-ROME edit, under both protocols."""
    lm = load_model("smollm2-135m")
    rec = load_records("zsre", limit=1, tokenizer=lm.tokenizer).records[0]
    before = record_metrics(lm.model, lm.tokenizer, rec)
    ed = Editor(lm.model, lm.tokenizer, lm.hparams, keep_undo=False)
    result = ed.compute(rec.to_request(), "rrome")
    assert result.p_true_before is None and result.p_true_after is None  # no true object
    ed.apply(result)
    after = record_metrics(lm.model, lm.tokenizer, rec)
    assert isinstance(before, ZsreMetrics) and isinstance(after, ZsreMetrics)
    assert before.es < 1.0 and after.es == 1.0 and after.es_tf == 1.0
    assert after.p_new > before.p_new


def test_the_parity_count_sees_a_flipped_verdict_and_a_missing_token(lm) -> None:
    """benchmarks/zsre_parity.py's count: our verdicts on two records against a copy in
    the published layout with one verdict flipped and one token dropped: 2."""
    import importlib.util

    path = Path(__file__).resolve().parent.parent / "benchmarks" / "zsre_parity.py"
    spec = importlib.util.spec_from_file_location("zsre_parity", path)
    assert spec is not None and spec.loader is not None
    parity = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(parity)
    records = load_records("zsre", limit=2).records
    mine = [record_metrics(lm.model, lm.tokenizer, r).tokens for r in records]  # type: ignore[attr-defined]
    theirs = [{key: list(m[g]) for g, key in parity.GROUPS.items()} for m in mine]
    ours = {"requests": [], "unedited": mine, "edited": mine}
    same = parity.compare(ours, {"requests": [], "unedited": theirs, "edited": theirs}, None)
    assert same["disagreements"] == 0 and same["tokens"] == 2 * sum(
        len(m[g]) for m in mine for g in parity.GROUPS
    )
    changed = [dict(t) for t in theirs]
    changed[0]["rewrite_prompts_correct"] = [
        1 - x for x in changed[0]["rewrite_prompts_correct"][:1]
    ] + changed[0]["rewrite_prompts_correct"][1:]
    changed[1]["neighborhood_prompts_correct"] = changed[1]["neighborhood_prompts_correct"][:-1]
    res = parity.compare(ours, {"requests": [], "unedited": theirs, "edited": changed}, None)
    assert res["disagreements"] == 2 and res["edited"]["rewrite"]["disagree"] == 1
