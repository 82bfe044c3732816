"""CounterFact metrics of one record (after ROME's ``eval_utils_counterfact``).

Each prompt is scored by the mean per-token NLL of ``target_new`` and of
``target_true`` (with a leading space). Efficacy ES = mean[NLL_true > NLL_new]
on the edit prompt, EM = mean[p_new - p_true] with p = exp(-NLL); PS / PM the
same on the paraphrases; NS = mean[NLL_true < NLL_new] and NM = mean[p_true -
p_new] on the neighbourhood prompts; S = harmonic mean of ES, PS, NS.
Generation entropy GE: the weighted mean (2/3, 4/3) of the bigram and trigram
entropies of generated texts.
"""

from __future__ import annotations

import math
import re
from collections import Counter
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import nn
from transformers import PreTrainedTokenizerBase

from rome.scoring import model_device, pad_id_of, prompt_ids, score_targets, trunk_and_head

from ._hf import cache_kwargs, output_cache
from .counterfact import CounterFactRecord

Pair = tuple[float, float]  # (NLL of target_new, NLL of target_true)
_WORD = re.compile(r"\w+|[^\w\s]")


@dataclass
class RecordMetrics:
    """Metrics of one CounterFact record; ``None`` where the record has no such prompt."""

    case_id: int
    es: float
    em: float
    ps: float | None
    pm: float | None
    ns: float | None
    nm: float | None
    s: float
    p_new: float  # on the edit prompt
    p_true: float
    ge: float | None = None
    generations: list[str] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def _mean(xs: Sequence[float]) -> float | None:
    return sum(xs) / len(xs) if xs else None


def harmonic_mean(xs: Sequence[float]) -> float:
    """Harmonic mean; 0 as soon as one value is 0."""
    if not xs or any(x <= 0 for x in xs):
        return 0.0
    return len(xs) / sum(1.0 / x for x in xs)


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
        s=harmonic_mean(parts),
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
    max_new_tokens: int = 50,
    greedy: bool = False,
    seed: int = 0,
) -> RecordMetrics:
    """Score all prompts of ``record`` in one batched call; GE when ``generation``."""
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
        conts = generate(
            model, tok, record.generation_prompts, max_new_tokens, greedy=greedy, seed=seed
        )
        out.generations = [p + c for p, c in zip(record.generation_prompts, conts, strict=True)]
        out.ge = generation_entropy(out.generations)
    return out


def aggregate(items: Sequence[RecordMetrics]) -> dict[str, float | None]:
    """Mean of each metric over records (``None`` values left out), plus ``n``."""
    out: dict[str, float | None] = {"n": float(len(items))}
    for key in ("es", "em", "ps", "pm", "ns", "nm", "s", "p_new", "p_true", "ge"):
        out[key] = _mean([v for m in items if (v := getattr(m, key)) is not None])
    return out


# --- generation entropy -------------------------------------------------------


def ngram_entropy(text_or_tokens: str | Sequence[str], n: int) -> float:
    """Entropy in bits of the n-gram frequency distribution of a text's tokens.

    A string is split into words and punctuation marks (close to NLTK's
    ``word_tokenize``, which ROME uses); a sequence is taken as the tokens.
    """
    tokens = (
        _WORD.findall(text_or_tokens) if isinstance(text_or_tokens, str) else list(text_or_tokens)
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
