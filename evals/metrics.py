"""CounterFact metrics of one record (after ROME's ``eval_utils_counterfact``).

Each prompt is scored by the mean per-token NLL of ``target_new`` and of
``target_true`` (with a leading space). Efficacy ES = mean[NLL_true > NLL_new]
on the edit prompt, EM = mean[p_new - p_true] with p = exp(-NLL); PS / PM the
same on the paraphrases; NS = mean[NLL_true < NLL_new] and NM = mean[p_true -
p_new] on the neighbourhood prompts. The score S of a run is, as ROME's ``summarize.py``
computes it, the harmonic mean of the run-level means of ES, PS and NS
(:func:`aggregate`); ``s_record`` is the harmonic mean of one record's own
ES, PS, NS, kept per edit but never averaged into a run's S.
Generation entropy GE: the weighted mean (2/3, 4/3) of the bigram and trigram
entropies of generated texts, words split as NLTK's ``word_tokenize`` does.
"""

from __future__ import annotations

import math
import unicodedata
from collections import Counter
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn
from transformers import PreTrainedTokenizerBase

from rome.batching import pad_id_of, prompt_ids
from rome.devices import model_device
from rome.scoring import score_targets, trunk_and_head

from ._hf import cache_kwargs, output_cache
from .counterfact import CounterFactRecord
from .record_metrics import RecordMetrics, harmonic_mean
from .zsre import ZsreRecord
from .zsre_scoring import zsre_metrics

Pair = tuple[float, float]  # (NLL of target_new, NLL of target_true)
GE_MAX_LEN = 100  # ROME's test_generation: generate_fast(..., max_out_len=100), in tokens
GE_TOP_K = 5


def _mean(xs: Sequence[float]) -> float | None:
    return sum(xs) / len(xs) if xs else None


def _success(pairs: Sequence[Pair], want_new: bool) -> float | None:
    return _mean([float((t > n) if want_new else (t < n)) for n, t in pairs])


def _margin(pairs: Sequence[Pair], want_new: bool) -> float | None:
    sign = 1.0 if want_new else -1.0
    return _mean([sign * (math.exp(-n) - math.exp(-t)) for n, t in pairs])


def metrics_from_nll(
    case_id: int,
    edit: Sequence[Pair],
    paraphrase: Sequence[Pair],
    neighborhood: Sequence[Pair],
    ge: float | None = None,
) -> RecordMetrics:
    """Metrics from ``(nll_new, nll_true)`` pairs of each prompt group."""
    if not edit:
        raise ValueError("a record needs at least its edit prompt")
    es, em = _success(edit, True), _margin(edit, True)
    assert es is not None and em is not None  # the edit group is not empty
    ps, ns = _success(paraphrase, True), _success(neighborhood, False)
    parts = [x for x in (es, ps, ns) if x is not None]
    return RecordMetrics(
        case_id=case_id,
        es=es,
        em=em,
        ps=ps,
        pm=_margin(paraphrase, True),
        ns=ns,
        nm=_margin(neighborhood, False),
        s_record=harmonic_mean(parts),
        p_new=math.exp(-edit[0][0]),
        p_true=math.exp(-edit[0][1]),
        ge=ge,
    )


def record_metrics(
    model: nn.Module,
    tok: PreTrainedTokenizerBase,
    record: CounterFactRecord,
    *,
    generation: bool = False,
    seed: int = 0,
) -> RecordMetrics:
    """Score all prompts of ``record`` in one batched call; GE when ``generation``.

    GE follows ROME's evaluation: each generation prompt is continued by top-5
    sampling to 100 tokens in all (prompt included), see :func:`generate_to_length`.
    A zsRE record is scored as zsRE is (:func:`evals.zsre_scoring.zsre_metrics`).
    """
    if isinstance(record, ZsreRecord):
        return zsre_metrics(model, tok, record)
    groups = [[record.text], record.paraphrase_prompts, record.neighborhood_prompts]
    prompts = [p for g in groups for p in g]
    n = len(prompts)
    scores = score_targets(
        model,
        tok,
        prompts + prompts,
        [record.target_new] * n + [record.target_true] * n,
        batch_size=2 * n,
    )
    pairs = [(scores[i].mean_nll, scores[n + i].mean_nll) for i in range(n)]
    a, b = len(groups[0]), len(groups[0]) + len(groups[1])
    out = metrics_from_nll(record.case_id, pairs[:a], pairs[a:b], pairs[b:])
    if generation and record.generation_prompts:
        out.generations = generate_to_length(model, tok, record.generation_prompts, seed=seed)
        out.ge = generation_entropy(out.generations)
    return out


RUN_KEYS = ("es", "em", "ps", "pm", "ns", "nm", "p_new", "p_true", "ge", "s_record")
#: zsRE's teacher-forced token accuracies (evals.zsre_scoring), averaged where stored
TEACHER_FORCED_KEYS = ("es_tf", "ps_tf", "ns_tf")


def run_score(es: float | None, ps: float | None, ns: float | None) -> float | None:
    """The published S: harmonic mean of the run-level means of ES, PS and NS."""
    parts = [x for x in (es, ps, ns) if x is not None]
    return harmonic_mean(parts) if parts else None


def aggregate(items: Sequence[RecordMetrics | dict[str, Any]]) -> dict[str, float | None]:
    """Run-level figures: the mean of each metric over records (``None`` left out), ``n``,
    and ``s`` = :func:`run_score` of the means (ROME's ``summarize.py``).

    Accepts stored metric dicts too; an old record's per-edit ``s`` is its ``s_record``.
    """
    rows = [m.as_dict() if isinstance(m, RecordMetrics) else _compat(m) for m in items]
    out: dict[str, float | None] = {"n": float(len(rows))}
    for key in RUN_KEYS:
        out[key] = _mean([v for r in rows if (v := r.get(key)) is not None])
    out["s"] = run_score(out["es"], out["ps"], out["ns"])
    for key in TEACHER_FORCED_KEYS:  # zsRE rows only (CounterFact's figures unchanged)
        values = [v for r in rows if (v := r.get(key)) is not None]
        if values:
            out[key] = _mean(values)
    return out


def _compat(d: dict[str, Any]) -> dict[str, Any]:
    """Stored metrics from before ``s_record`` had its name."""
    if "s_record" not in d and "s" in d:
        d = {**d, "s_record": d["s"]}
    return d


# --- generation entropy -------------------------------------------------------


def word_tokens(text: str) -> list[str]:
    """NLTK's ``word_tokenize`` without its downloadable data.

    ``word_tokenize`` splits sentences with the pretrained English Punkt model
    (``punkt_tab``, not installable offline), then words with NLTK's Treebank
    tokenizer. Here the sentences come from an untrained Punkt splitter, which
    has no list of abbreviations: "Mr. Smith" and "U.S. troops" are split as
    if a sentence ended after the period (giving "Mr" "." where NLTK keeps
    "Mr."). Contractions ("ca" "n't"), hyphenated words, decimals and "..."
    are split exactly as NLTK splits them.
    """
    from nltk.tokenize import NLTKWordTokenizer
    from nltk.tokenize.punkt import PunktSentenceTokenizer

    words = NLTKWordTokenizer()
    return [w for sent in PunktSentenceTokenizer().tokenize(text) for w in words.tokenize(sent)]


def ngram_entropy(text_or_tokens: str | Sequence[str], n: int) -> float:
    """Entropy in bits of the n-gram frequency distribution of a text's tokens.

    A string is split by :func:`word_tokens` (as ROME does with NLTK); a
    sequence is taken as the tokens.
    """
    tokens = (
        word_tokens(text_or_tokens) if isinstance(text_or_tokens, str) else list(text_or_tokens)
    )
    counts = Counter(tuple(tokens[i : i + n]) for i in range(len(tokens) - n + 1))
    total = sum(counts.values())
    return -sum(c / total * math.log2(c / total) for c in counts.values()) if total else 0.0


def text_entropy(text: str | Sequence[str]) -> float:
    """ROME's per-text score: weighted mean of bigram (2/3) and trigram (4/3) entropy."""
    return (2 / 3 * ngram_entropy(text, 2) + 4 / 3 * ngram_entropy(text, 3)) / 2


def generation_entropy(texts: Sequence[str | Sequence[str]]) -> float:
    """Mean of :func:`text_entropy` over generated texts (ROME's GE)."""
    return sum(text_entropy(t) for t in texts) / len(texts) if texts else 0.0


# --- generation ---------------------------------------------------------------


def _pick(logits: torch.Tensor, greedy: bool, top_k: int, gens: list[torch.Generator]):
    if greedy:
        return logits.argmax(-1)
    vals, idx = logits.float().topk(min(top_k, logits.shape[-1]), dim=-1)
    probs = vals.softmax(-1).cpu()
    picks = [torch.multinomial(probs[i], 1, generator=g) for i, g in enumerate(gens)]
    return idx.gather(1, torch.stack(picks).to(idx.device)).squeeze(1)


@torch.no_grad()
def generate_ids(
    model: nn.Module,
    id_lists: Sequence[Sequence[int]],
    max_new_tokens: int,
    *,
    eos_id: int | None,
    pad_id: int,
    greedy: bool = True,
    seed: int = 0,
    top_k: int = 5,
    first_index: int = 0,
) -> list[list[int]]:
    """New token ids after each prompt: one left-padded batch, KV cache, stop at EOS.

    Sampling draws top-k with one generator per prompt, seeded from ``seed`` and
    the prompt's index (``first_index`` + position), so the output does not
    depend on how prompts are batched.
    """
    device = model_device(model)
    width = max(len(s) for s in id_lists)
    ids = torch.full((len(id_lists), width), pad_id, dtype=torch.long, device=device)
    mask = torch.zeros_like(ids)
    for i, s in enumerate(id_lists):
        ids[i, width - len(s) :] = torch.tensor(list(s), dtype=torch.long)
        mask[i, width - len(s) :] = 1
    gens = [
        torch.Generator().manual_seed(seed * 1_000_003 + first_index + i) for i in range(len(ids))
    ]
    done = torch.zeros(len(ids), dtype=torch.bool, device=device)
    out: list[list[int]] = [[] for _ in id_lists]
    past, step_ids = None, ids
    trunk, head = trunk_and_head(model)
    for _ in range(max_new_tokens):
        pos = (mask.cumsum(-1) - 1).clamp(min=0)[:, -step_ids.shape[1] :]
        res = trunk(
            input_ids=step_ids,
            attention_mask=mask,
            position_ids=pos,
            use_cache=True,
            **cache_kwargs(trunk, past),
        )
        past = output_cache(res)
        logits = head(res.last_hidden_state[:, -1])
        nxt = _pick(logits, greedy, top_k, gens)
        for i in (~done).nonzero().flatten().tolist():
            out[i].append(int(nxt[i]))
        if eos_id is not None:
            done |= nxt == eos_id
        if bool(done.all()):
            break
        step_ids = nxt.masked_fill(done, pad_id).unsqueeze(1)
        mask = torch.cat([mask, (~done).long().unsqueeze(1)], dim=1)
    return [[t for t in o if t != eos_id] for o in out]


def generate_to_length(
    model: nn.Module,
    tok: PreTrainedTokenizerBase,
    prompts: Sequence[str],
    max_len: int = GE_MAX_LEN,
    *,
    seed: int = 0,
    top_k: int = GE_TOP_K,
) -> list[str]:
    """Texts of ``max_len`` tokens in all, prompt included, as ROME's ``generate_fast``.

    Top-k sampling (k = 5) from the renormalised top-k probabilities, no stop at
    an end-of-text token, the decoded text NFKD-normalised with blank lines
    turned into spaces and ``<|endoftext|>`` removed. Unlike ROME, sampling is
    seeded (one generator per prompt), so a run can be repeated.
    """
    ids = [prompt_ids(tok, p) for p in prompts]
    budget = [max(0, max_len - len(s)) for s in ids]
    if not any(budget):
        new: list[list[int]] = [[] for _ in ids]
    else:
        new = generate_ids(
            model,
            ids,
            max(budget),
            eos_id=None,
            pad_id=pad_id_of(tok),
            greedy=False,
            seed=seed,
            top_k=top_k,
        )
    texts = []
    for s, extra, b in zip(ids, new, budget, strict=True):
        text = str(tok.decode(list(s) + extra[:b]))
        text = unicodedata.normalize("NFKD", text).replace("\n\n", " ")
        texts.append(text.replace("<|endoftext|>", ""))
    return texts


def generate(
    model: nn.Module,
    tok: PreTrainedTokenizerBase,
    prompts: Sequence[str],
    max_new_tokens: int = 50,
    *,
    greedy: bool = True,
    seed: int = 0,
    top_k: int = 5,
    batch_size: int = 16,
) -> list[str]:
    """Continuations of ``prompts`` (without the prompt): greedy, or seeded top-k sampling."""
    eos = tok.eos_token_id
    texts: list[str] = []
    for start in range(0, len(prompts), batch_size):
        batch = [prompt_ids(tok, p) for p in prompts[start : start + batch_size]]
        new = generate_ids(
            model,
            batch,
            max_new_tokens,
            eos_id=eos,
            pad_id=pad_id_of(tok),
            greedy=greedy,
            seed=seed,
            top_k=top_k,
            first_index=start,
        )
        texts += [str(tok.decode(t, skip_special_tokens=True)) for t in new]
    return texts
