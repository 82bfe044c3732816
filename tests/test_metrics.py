"""CounterFact metrics, n-gram entropy and generation on hand-made cases."""

from __future__ import annotations

import math

import pytest
import torch

from evals.counterfact import CounterFactRecord
from evals.metrics import (
    aggregate,
    generate,
    generate_to_length,
    generation_entropy,
    harmonic_mean,
    metrics_from_nll,
    ngram_entropy,
    record_metrics,
    run_score,
    text_entropy,
    word_tokens,
)
from rome.scoring import score_targets
from rome.testing import tiny_model


@pytest.fixture(scope="module")
def tiny():
    return tiny_model("gpt2")


def p(nll: float) -> float:
    return math.exp(-nll)


def test_metrics_from_nll_known_values() -> None:
    # edit prompt: new wins; paraphrases: 1 of 2 new wins; neighbours: 2 of 4 keep true
    m = metrics_from_nll(
        7,
        edit=[(0.5, 2.0)],
        paraphrase=[(1.0, 3.0), (2.0, 1.0)],
        neighborhood=[(3.0, 1.0), (2.0, 0.5), (0.1, 4.0), (1.0, 1.0)],
    )
    assert m.case_id == 7
    assert m.es == 1.0
    assert m.em == pytest.approx(p(0.5) - p(2.0))
    assert m.ps == 0.5
    assert m.pm == pytest.approx(((p(1) - p(3)) + (p(2) - p(1))) / 2)
    assert m.ns == 0.5  # a tie is not a success
    assert m.nm == pytest.approx(
        ((p(1) - p(3)) + (p(0.5) - p(2)) + (p(4) - p(0.1)) + (p(1) - p(1))) / 4
    )
    assert m.s_record == pytest.approx(3 / (1 / 1.0 + 1 / 0.5 + 1 / 0.5))  # 0.6
    assert (m.p_new, m.p_true) == (pytest.approx(p(0.5)), pytest.approx(p(2.0)))
    d = m.as_dict()
    assert d["s_record"] == pytest.approx(0.6) and d["ge"] is None


def test_failed_edit_scores_zero() -> None:
    m = metrics_from_nll(1, [(2.0, 0.5)], [(2.0, 0.5)], [(2.0, 0.5)])
    assert (m.es, m.ps, m.ns) == (0.0, 0.0, 1.0)
    assert m.s_record == 0.0  # harmonic mean with a zero
    assert m.em == pytest.approx(p(2.0) - p(0.5)) and m.em < 0


def test_missing_groups_are_none_and_left_out() -> None:
    m = metrics_from_nll(1, [(0.1, 1.0)], [], [(2.0, 0.5)])
    assert m.ps is None and m.pm is None
    assert m.s_record == 1.0  # hmean of ES=1, NS=1
    with pytest.raises(ValueError):
        metrics_from_nll(1, [], [], [])


def test_harmonic_mean() -> None:
    assert harmonic_mean([1.0, 0.5]) == pytest.approx(2 / 3)
    assert harmonic_mean([0.25, 0.25, 0.25]) == pytest.approx(0.25)
    assert harmonic_mean([0.9, 0.0]) == 0.0
    assert harmonic_mean([]) == 0.0


def test_aggregate_means() -> None:
    a = metrics_from_nll(1, [(0.5, 2.0)], [(0.5, 2.0)], [(2.0, 0.5)], ge=4.0)
    b = metrics_from_nll(2, [(2.0, 0.5)], [], [(0.5, 2.0)])
    agg = aggregate([a, b])
    assert agg["n"] == 2
    assert agg["es"] == 0.5
    assert agg["ps"] == 1.0  # b has no paraphrase
    assert agg["ns"] == 0.5
    # S is the harmonic mean of the run-level means (ROME's summarize.py), not the
    # mean of the per-record harmonic means (which would be (1 + 0) / 2)
    assert agg["s"] == pytest.approx(3 / (1 / 0.5 + 1 / 1.0 + 1 / 0.5))  # 0.6
    assert agg["s_record"] == pytest.approx(0.5)
    assert agg["ge"] == 4.0
    assert agg["em"] == pytest.approx(((p(0.5) - p(2)) + (p(2) - p(0.5))) / 2)


def test_run_score_where_the_definitions_differ() -> None:
    # 8 records, ES / PS / NS means 0.25 / 0.375 / 0.625, each record with a zero in it
    es = [1, 1, 0, 0, 0, 0, 0, 0]
    ps = [0, 0, 1, 1, 0.5, 0.5, 0, 0]
    ns = [0, 0, 0, 1, 1, 1, 1, 1]
    items = [
        {"es": e, "ps": q, "ns": n, "s_record": harmonic_mean([e, q, n])}
        for e, q, n in zip(es, ps, ns, strict=True)
    ]
    agg = aggregate(items)
    assert (agg["es"], agg["ps"], agg["ns"]) == (0.25, 0.375, 0.625)
    assert agg["s"] == pytest.approx(3 / (4 + 8 / 3 + 1.6))  # 0.3629, ROME's S
    assert agg["s_record"] == 0.0  # every record's own harmonic mean is 0
    assert run_score(None, None, None) is None
    # stored metrics from before the rename: their per-edit "s" is the record's own
    assert aggregate([{"es": 1.0, "ns": 1.0, "s": 1.0}])["s_record"] == 1.0


def test_word_tokens_split_as_nltk() -> None:
    text = "I can't stop... it's well-known that 3.14 isn't 3.15"
    expected = "I ca n't stop ... it 's well-known that 3.14 is n't 3.15".split()
    assert word_tokens(text) == expected
    assert word_tokens("Hello, world.") == ["Hello", ",", "world", "."]


def test_generation_entropy_by_hand_on_contractions_hyphens_decimals() -> None:
    # 13 tokens (see above), bigrams all 12 distinct, trigrams all 11 distinct
    text = "I can't stop... it's well-known that 3.14 isn't 3.15"
    assert ngram_entropy(text, 2) == pytest.approx(math.log2(12))
    assert ngram_entropy(text, 3) == pytest.approx(math.log2(11))
    assert text_entropy(text) == pytest.approx((2 / 3 * math.log2(12) + 4 / 3 * math.log2(11)) / 2)
    # "... ..." repeated: tokens ..., x, ..., x, ... -> bigrams (...,x)x2 (x,...)x2 -> 1 bit
    assert ngram_entropy("... x ... x ...", 2) == pytest.approx(1.0)
    # a hyphenated word is one token: "a-b a-b a-b" has one distinct bigram
    assert ngram_entropy("a-b a-b a-b", 2) == 0.0


def test_ngram_entropy_known_values() -> None:
    assert ngram_entropy("the the the the", 2) == 0.0  # one bigram repeated
    assert ngram_entropy(["a", "b", "c", "d", "e"], 2) == pytest.approx(2.0)  # 4 distinct
    # bigrams of a b a b a: ab, ba, ab, ba -> two of 1/2 each -> 1 bit
    assert ngram_entropy("a b a b a", 2) == pytest.approx(1.0)
    # trigrams: aba, bab, aba -> {2/3, 1/3}
    h = -(2 / 3 * math.log2(2 / 3) + 1 / 3 * math.log2(1 / 3))
    assert ngram_entropy("a b a b a", 3) == pytest.approx(h)
    assert ngram_entropy("one", 2) == 0.0
    assert ngram_entropy("Hello, world.", 1) == pytest.approx(2.0)  # 4 tokens, punctuation split


def test_generation_entropy_weights() -> None:
    text = "a b c d e"  # 4 distinct bigrams (2 bits), 3 distinct trigrams (log2 3)
    expected = (2 / 3 * 2.0 + 4 / 3 * math.log2(3)) / 2
    assert text_entropy(text) == pytest.approx(expected)
    assert generation_entropy([text, "x x x x"]) == pytest.approx(expected / 2)
    assert generation_entropy([]) == 0.0


def test_record_metrics_match_separate_scores(tiny) -> None:
    model, tok = tiny
    rec = CounterFactRecord(
        case_id=3,
        prompt="{} is located in",
        subject="The Eiffel Tower",
        target_new="Rome",
        target_true="Paris",
        paraphrase_prompts=["The Eiffel Tower stands in", "Where is the Eiffel Tower? It is in"],
        neighborhood_prompts=["The Louvre is located in"],
        generation_prompts=["The Eiffel Tower is", "The Eiffel Tower was"],
    )
    m = record_metrics(model, tok, rec, generation=True, seed=1)
    nll = {
        (q, t): score_targets(model, tok, [q], [t])[0].mean_nll
        for q in [rec.text, *rec.paraphrase_prompts, *rec.neighborhood_prompts]
        for t in ("Rome", "Paris")
    }
    e = metrics_from_nll(
        3,
        [(nll[rec.text, "Rome"], nll[rec.text, "Paris"])],
        [(nll[q, "Rome"], nll[q, "Paris"]) for q in rec.paraphrase_prompts],
        [(nll[q, "Rome"], nll[q, "Paris"]) for q in rec.neighborhood_prompts],
    )
    for key in ("es", "em", "ps", "pm", "ns", "nm", "s_record", "p_new", "p_true"):
        assert getattr(m, key) == pytest.approx(getattr(e, key), abs=1e-5), key
    assert len(m.generations) == 2
    assert m.generations[0].startswith("The Eiffel Tower is")
    assert m.ge == pytest.approx(generation_entropy(m.generations))


def test_generate_to_length_is_seeded(tiny) -> None:
    model, tok = tiny
    prompts = ["The Eiffel Tower is", "Paris is a"]
    a = generate_to_length(model, tok, prompts, 20, seed=3)
    assert a == generate_to_length(model, tok, prompts, 20, seed=3)
    assert a != generate_to_length(model, tok, prompts, 20, seed=4)
    assert all(t.startswith(q) for t, q in zip(a, prompts, strict=True))
    # the length counts the prompt's tokens: a budget equal to the prompt adds nothing
    n = len(tok(prompts[0])["input_ids"])
    assert generate_to_length(model, tok, prompts[:1], n) == [prompts[0]]
    longer = generate_to_length(model, tok, prompts[:1], n + 5, seed=3)[0]
    assert longer.startswith(prompts[0]) and len(longer) > len(prompts[0])


def test_generate_is_deterministic_and_batch_independent(tiny) -> None:
    model, tok = tiny
    prompts = ["The Eiffel Tower is located in", "Paris", "The mother tongue of Danielle is"]
    batched = generate(model, tok, prompts, 6)
    single = [generate(model, tok, [q], 6)[0] for q in prompts]
    assert batched == single  # left padding does not change greedy outputs
    # greedy equals the argmax of a plain forward, token by token
    ids = tok(prompts[0])["input_ids"]
    for _ in range(6):
        with torch.no_grad():
            ids.append(int(model(torch.tensor([ids])).logits[0, -1].argmax()))
    assert tok.decode(ids[-6:]) == batched[0]
    s1 = generate(model, tok, prompts, 6, greedy=False, seed=5)
    s2 = generate(model, tok, prompts, 6, greedy=False, seed=5, batch_size=1)
    assert s1 == s2  # one generator per prompt index: batching does not matter
    assert generate(model, tok, prompts, 6, greedy=False, seed=6) != s1
