"""zsRE metrics of one record, under two protocols, both stored with every edit.

``memit-top1`` (what ``es`` / ``ps`` / ``ns`` are; kmeng01/memit
``experiments/py/eval_utils_zsre.py``, the same in AlphaEdit): the target is
tokenized as ``" " + answer``; for each of its tokens, the prompt followed by
the decoded tokens before it is run, and the query is right when the model's
top-1 next token is the first token of the decoded target token re-encoded (the
published code's own comparison). Efficacy ``es`` and generalisation ``ps`` are
the mean over the target tokens on the edit prompt and on the paraphrase;
specificity ``ns`` is the same top-1 accuracy on the neighbourhood answer's
tokens after ``loc + "?"``, absolute (the dataset's answer, not the unedited
model's predictions). As published, the edit and paraphrase queries run in one
right-padded batch and the neighbourhood queries in another.

``teacher-forced`` (``es_tf`` / ``ps_tf`` / ``ns_tf``; EasyEdit's
``test_prediction_acc``, which UltraEdit's zsRE accuracy follows): the text
``prompt + " " + answer`` is run once and each answer token is compared with the
model's top-1 prediction at the position before it (teacher forcing: the true
prefix, not the model's). The neighbourhood is ``loc + " " + loc_ans``, also
against the dataset's answer. Scored on the request the replay edits
(``answers[0]``, as MEMIT; EasyEdit's own zsRE loader edits towards ``alt``).

Per token, both protocols' 0/1 lists are kept (``tokens``), so a record's figures
can be recomputed and compared query by query (``benchmarks/zsre_parity.py``).
A record *holds* when ``es`` is 1: every target token is the top-1 after the edit
prompt and its decoded prefix.

Tokens are taken without the tokenizer's special tokens (``add_special_tokens=
False``) for targets; prompts are encoded as the model's prompts are (a BOS where
the tokenizer adds one). For tokenizers that add no special tokens (GPT-2,
SmolLM2) this is the published computation exactly; the published code, which
keeps them, would take a Llama tokenizer's BOS for a target token.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from transformers import PreTrainedTokenizerBase

from rome.batching import pad_id_of, pad_right, prompt_ids
from rome.devices import model_device

from .record_metrics import RecordMetrics, harmonic_mean
from .zsre import ZsreRecord

#: the protocol of ``es`` / ``ps`` / ``ns`` of a zsRE record, and its label
TOP1 = "memit-top1"
#: the protocol of ``es_tf`` / ``ps_tf`` / ``ns_tf``
TEACHER_FORCED = "teacher-forced"
PROTOCOL_LABELS = {
    TOP1: "top-1 of each target token after the decoded prefix (MEMIT's eval_utils_zsre; "
    "specificity absolute)",
    TEACHER_FORCED: "teacher-forced token accuracy (EasyEdit / UltraEdit)",
}
#: the groups of a record's per-token lists
GROUPS = ("rewrite", "paraphrase", "neighborhood")

Query = tuple[str, int]  # (prompt text, the token id expected next)


@dataclass
class ZsreMetrics(RecordMetrics):
    """A zsRE record's metrics: ``es`` / ``ps`` / ``ns`` under :data:`TOP1`, the
    teacher-forced ones beside them, and every per-token verdict (``tokens``)."""

    protocol: str = TOP1
    es_tf: float | None = None
    ps_tf: float | None = None
    ns_tf: float | None = None
    tf_protocol: str = TEACHER_FORCED
    tokens: dict[str, list[int]] = field(default_factory=dict)


def first_id(tok: PreTrainedTokenizerBase, text: str) -> int:
    """The first token of ``text`` re-encoded (the published comparison's target id);
    the pad id where it encodes to nothing, as the published padded batch gives."""
    ids = tok(text, add_special_tokens=False)["input_ids"]
    return int(ids[0]) if ids else pad_id_of(tok)


def answer_ids(tok: PreTrainedTokenizerBase, answer: str) -> list[int]:
    """``" " + answer`` as tokens (no special tokens)."""
    return list(tok(" " + answer, add_special_tokens=False)["input_ids"])


def top1_queries(tok: PreTrainedTokenizerBase, prompt: str, answer: str) -> list[Query]:
    """One query per token of ``answer``: the prompt and the decoded tokens before it."""
    ids = answer_ids(tok, answer)
    return [(prompt + _decode(tok, ids[:i]), first_id(tok, _decode(tok, ids[i : i + 1])))
            for i in range(len(ids))]  # fmt: skip


def _decode(tok: PreTrainedTokenizerBase, ids: Sequence[int]) -> str:
    """``tok.decode`` with its defaults, as the published code calls it."""
    return str(tok.decode(list(ids)))


def neighborhood_queries(tok: PreTrainedTokenizerBase, rec: ZsreRecord) -> list[Query]:
    """The published neighbourhood: ``loc + "?"`` and each prefix of ``" " + loc_ans``."""
    return top1_queries(tok, rec.loc + "?", rec.loc_ans)


@torch.no_grad()
def top1_correct(
    model: nn.Module, tok: PreTrainedTokenizerBase, queries: Sequence[Query]
) -> list[int]:
    """1 where the model's top-1 next token after a query's prompt is its token, else 0
    (one right-padded batch, the logits at each prompt's last token)."""
    if not queries:
        return []
    seqs = [prompt_ids(tok, p) for p, _ in queries]
    ids, mask = pad_right(seqs, pad_id_of(tok), model_device(model))
    logits = model(input_ids=ids, attention_mask=mask).logits
    last = mask.sum(1) - 1
    picked = logits[torch.arange(len(seqs), device=logits.device), last].argmax(-1)
    want = torch.tensor([t for _, t in queries], device=picked.device)
    return [int(x) for x in (picked == want).tolist()]


@dataclass
class _Forced:
    correct: list[int]  # per answer token
    logprobs: list[float]  # of each answer token
    p_eos: float  # p(end of text) as the first token after the prompt


@torch.no_grad()
def teacher_forced(
    model: nn.Module,
    tok: PreTrainedTokenizerBase,
    pairs: Sequence[tuple[str, str]],
) -> list[_Forced]:
    """EasyEdit's token accuracy of each ``(prompt, answer)``: ``prompt + " " + answer``
    run once, the answer's tokens (those after the prompt's own) against the top-1."""
    fulls = [prompt_ids(tok, f"{p} {a}") for p, a in pairs]
    starts = [len(prompt_ids(tok, p)) for p, _ in pairs]
    ids, mask = pad_right(fulls, pad_id_of(tok), model_device(model))
    logp = model(input_ids=ids, attention_mask=mask).logits.float().log_softmax(-1)
    eos = tok.eos_token_id
    out = []
    for i, (full, start) in enumerate(zip(fulls, starts, strict=True)):
        labels = torch.tensor(full[start:], device=logp.device, dtype=torch.long)
        rows = logp[i, start - 1 : len(full) - 1]
        correct = (rows.argmax(-1) == labels).long().tolist()
        lp = rows.gather(1, labels.unsqueeze(1)).squeeze(1).tolist() if len(labels) else []
        p_eos = math.exp(float(logp[i, start - 1, eos])) if eos is not None else 0.0
        out.append(_Forced([int(c) for c in correct], [float(x) for x in lp], p_eos))
    return out


def _mean(xs: Sequence[int]) -> float:
    return sum(xs) / len(xs) if xs else 0.0


def zsre_metrics(model: nn.Module, tok: PreTrainedTokenizerBase, rec: ZsreRecord) -> ZsreMetrics:
    """Both protocols' figures of ``rec`` on the model as it is (see the module's text)."""
    rewrite = top1_queries(tok, rec.text, rec.target_new)
    para = [q for p in rec.paraphrase_prompts for q in top1_queries(tok, p, rec.target_new)]
    stuff = top1_correct(model, tok, rewrite + para)
    near = top1_correct(model, tok, neighborhood_queries(tok, rec))
    tokens = {"rewrite": stuff[: len(rewrite)], "paraphrase": stuff[len(rewrite) :]}
    tokens["neighborhood"] = near
    pairs = [(rec.text, rec.target_new)]
    pairs += [(p, rec.target_new) for p in rec.paraphrase_prompts]
    pairs.append((rec.loc, rec.loc_ans))
    forced = teacher_forced(model, tok, pairs)
    tokens["rewrite_tf"] = forced[0].correct
    tokens["paraphrase_tf"] = [c for f in forced[1:-1] for c in f.correct]
    tokens["neighborhood_tf"] = forced[-1].correct
    es, ps, ns = _mean(tokens["rewrite"]), _mean(tokens["paraphrase"]), _mean(near)
    lp = forced[0].logprobs
    return ZsreMetrics(
        case_id=rec.case_id,
        es=es,
        em=None,  # no margin: there is no true object
        ps=ps if para else None,
        pm=None,
        ns=ns,
        nm=None,
        s_record=harmonic_mean([es, ps, ns] if para else [es, ns]),
        p_new=math.exp(sum(lp) / len(lp)) if lp else 0.0,
        p_true=forced[0].p_eos,
        es_tf=_mean(tokens["rewrite_tf"]),
        ps_tf=_mean(tokens["paraphrase_tf"]) if para else None,
        ns_tf=_mean(tokens["neighborhood_tf"]),
        tokens=tokens,
    )


def protocol_of(metrics: dict[str, Any]) -> str | None:
    """The protocol of a stored metrics dict's ``es`` (None: CounterFact's)."""
    p = metrics.get("protocol")
    return str(p) if p else None
