"""GLUE: data, prompts, label scoring (both protocols) and the task metrics."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from evals.errors import EvalDataError
from evals.glue import (
    GLUE_TASKS,
    TASKS,
    GlueExample,
    balanced_head,
    encode,
    evaluate_glue,
    f1_score,
    glue_result,
    label_logprobs,
    load_glue,
    match_label,
    mcc_score,
    task_of,
)
from rome.batching import prompt_ids
from rome.testing import tiny_model


@pytest.fixture(scope="module")
def tiny():
    return tiny_model("gpt2")


def test_bundled_subsets() -> None:
    for name in TASKS:
        rows = load_glue(name)
        assert len(rows) == 200
        assert sum(e.label for e in rows) == 100
        assert set(rows[0].text) == set(GLUE_TASKS[name].fields)
    assert load_glue("SST-2", limit=3)[0].idx == 605


def test_limit_takes_a_balanced_head() -> None:
    rows = load_glue("mrpc", limit=8)  # the file starts with 10 paraphrases in a row
    assert [e.label for e in rows] == [1, 1, 1, 1, 0, 0, 0, 0]
    full = load_glue("mrpc")
    positions = [full.index(e) for e in rows]
    assert positions == sorted(positions) and positions[:4] == [0, 1, 2, 3]
    assert sum(e.label for e in load_glue("rte", limit=9)) in (4, 5)


def test_balanced_head_fills_when_a_label_runs_short() -> None:
    ex = [GlueExample(i, int(i == 2), {"sentence": "x"}) for i in range(6)]
    assert [e.idx for e in balanced_head(ex, 4)] == [0, 1, 2, 3]
    assert balanced_head(ex, None) == ex


def test_jsonl_source_and_errors(tmp_path: Path) -> None:
    rows = [{"sentence": f"s{i}", "label": i % 2, "idx": i} for i in range(6)]
    (tmp_path / "cola.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    got = load_glue("cola", source=tmp_path, limit=4)
    assert [(e.idx, e.label, e.text["sentence"]) for e in got] == [
        (0, 0, "s0"),
        (1, 1, "s1"),
        (2, 0, "s2"),
        (3, 1, "s3"),
    ]
    (tmp_path / "rte.jsonl").write_text(json.dumps({"sentence1": "a", "label": 0}))
    with pytest.raises(EvalDataError, match="sentence2"):
        load_glue("rte", source=tmp_path)
    with pytest.raises(EvalDataError, match="unknown GLUE task"):
        task_of("qqp")


def test_prompts() -> None:
    sst = GLUE_TASKS["sst2"]
    ex = GlueExample(0, 1, {"sentence": "a fine film . "})
    assert sst.query(ex.text) == "Review: a fine film .\nSentiment:"
    prefix = sst.prefix()
    assert prefix.endswith("Sentiment: negative\n\n")
    assert prefix.count("Review:") == 4
    rte = GLUE_TASKS["rte"]
    assert rte.label_words[0] == " yes"  # label 0 is entailment
    assert sorted(y for _, y in rte.demos) == [0, 0, 1, 1]
    for task in GLUE_TASKS.values():  # demos are hand-written, not eval rows
        texts = {json.dumps(e.text, sort_keys=True) for e in load_glue(task.name)}
        assert not texts & {json.dumps(t, sort_keys=True) for t, _ in task.demos}


def test_match_label() -> None:
    words = {1: " positive", 0: " negative"}
    assert match_label(" Positive\n", words) == 1
    assert match_label(" negative.", words) == 0
    assert match_label(" neutral", words) == -1
    assert match_label("positive or negative", words) == -1
    assert match_label(" no\n\n", GLUE_TASKS["rte"].label_words) == 1


def test_f1_and_mcc_known_values() -> None:
    gold = [1, 1, 1, 0, 0, 0]
    pred = [1, 1, 0, 1, 0, 0]
    assert f1_score(gold, pred) == pytest.approx(2 * 2 / (2 * 2 + 1 + 1))
    assert mcc_score(gold, pred) == pytest.approx((2 * 2 - 1 * 1) / 9)
    assert mcc_score(gold, gold) == 1.0
    assert mcc_score(gold, [1] * 6) == 0.0
    r = glue_result("mrpc", gold, [1, 1, -1, 1, 0, -1], "generate")
    assert r.invalid == 2 and r.n == 6
    assert r.accuracy == pytest.approx(3 / 6)
    # invalid answers count as wrong: scored as [1, 1, 0, 1, 0, 1]
    assert r.f1 == pytest.approx(2 * 2 / (2 * 2 + 2 + 1))
    assert r.as_dict()["predictions"] == [1, 1, -1, 1, 0, -1]


def _reference_logprobs(model, tok, task, examples):
    """Plain full forwards of prefix + example + label word (no cache, no batching)."""
    prefix = prompt_ids(tok, task.prefix())
    out = []
    for e in examples:
        row = prefix + encode(tok, task, e)
        scores = []
        for y in task.labels:
            lab = tok(task.label_words[y], add_special_tokens=False)["input_ids"]
            with torch.no_grad():
                logp = model(torch.tensor([row + lab])).logits[0].log_softmax(-1)
            scores.append(sum(float(logp[len(row) - 1 + k, t]) for k, t in enumerate(lab)))
        out.append(scores)
    return out


@pytest.mark.parametrize("name", ["sst2", "rte"])
def test_label_logprobs_match_plain_forwards(tiny, name: str) -> None:
    model, tok = tiny
    task = GLUE_TASKS[name]
    examples = load_glue(name, limit=8)
    got = label_logprobs(model, tok, task, examples, batch_size=3)
    ref = _reference_logprobs(model, tok, task, examples)
    assert torch.allclose(torch.tensor(got), torch.tensor(ref), atol=1e-4)


def test_evaluate_glue_both_protocols(tiny) -> None:
    model, tok = tiny
    seen: list[tuple[str, int, int]] = []
    res = evaluate_glue(
        model, tok, ["cola", "mrpc"], limit=8, batch_size=4, progress=lambda *a: seen.append(a)
    )
    assert set(res) == {"cola", "mrpc"}
    for name, r in res.items():
        examples = load_glue(name, limit=8)
        scores = _reference_logprobs(model, tok, GLUE_TASKS[name], examples)
        labels = GLUE_TASKS[name].labels
        expected = [labels[max(range(2), key=s.__getitem__)] for s in scores]
        assert r.predictions == expected
        gold = [e.label for e in examples]
        assert r.accuracy == sum(p == g for p, g in zip(expected, gold, strict=True)) / 8
        assert r.n == 8 and r.invalid == 0
    assert seen[-1] == ("mrpc", 8, 8) and ("cola", 4, 8) in seen
    gen = evaluate_glue(model, tok, ["cola"], limit=8, scoring="generate", batch_size=3)["cola"]
    one = evaluate_glue(model, tok, ["cola"], limit=8, scoring="generate", batch_size=1)["cola"]
    assert gen.predictions == one.predictions
    assert gen.scoring == "generate" and gen.n == 8
    # an untrained model answers with neither label word: every answer is invalid
    assert gen.invalid == sum(p == -1 for p in gen.predictions) == 8
    assert gen.accuracy == 0.0
    with pytest.raises(ValueError, match="scoring"):
        evaluate_glue(model, tok, ["cola"], limit=2, scoring="vibes")


def test_contextual_calibration_divides_by_the_content_free_prior(tiny) -> None:
    import math

    from evals.glue import CONTENT_FREE, content_free_logprior, predict

    model, tok = tiny
    task = task_of("sst2")
    examples = load_glue("sst2", limit=8)
    prior = content_free_logprior(model, tok, task)
    assert math.isclose(sum(math.exp(p) for p in prior), 1.0, rel_tol=1e-9)
    # the prior is the mean label distribution over the content-free inputs
    frees = [GlueExample(-1, 0, {"sentence": w}) for w in CONTENT_FREE]
    rows = torch.tensor(label_logprobs(model, tok, task, frees), dtype=torch.float64)
    assert prior == pytest.approx(rows.softmax(-1).mean(0).log().tolist())
    scores = label_logprobs(model, tok, task, examples)
    want = [task.labels[max(range(2), key=lambda j, s=s: s[j] - prior[j])] for s in scores]
    assert predict(model, tok, task, examples, calibration="contextual") == want
    with pytest.raises(ValueError, match="log-prob"):
        predict(model, tok, task, examples, scoring="generate", calibration="contextual")
    with pytest.raises(ValueError, match="calibration"):
        predict(model, tok, task, examples, calibration="platt")
