"""Batched log-probabilities of target continuations.

Used by the engine (p before/after an edit) and by ``evals`` (CounterFact
metrics, GLUE label scoring). Logits are computed only at the positions the
score reads: the model's trunk runs once per batch, the output head only on
the gathered hidden states (the head is a large share of a small model's
forward).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn
from transformers import PreTrainedTokenizerBase

from .batching import pad_id_of, pad_right, prompt_ids, target_ids
from .devices import model_device
from .request import EditRequest


def trunk_and_head(model: nn.Module) -> tuple[nn.Module, nn.Module]:
    """The transformer without its LM head (returns final-normed states) and the head."""
    head = model.get_output_embeddings()  # type: ignore[operator]
    trunk = model.base_model
    assert isinstance(trunk, nn.Module)
    return trunk, head


@dataclass
class TargetScore:
    """Log-probability of one target continuation after one prompt."""

    token_logprobs: list[float]

    @property
    def n_tokens(self) -> int:
        return len(self.token_logprobs)

    @property
    def sum_logprob(self) -> float:
        return float(sum(self.token_logprobs))

    @property
    def mean_nll(self) -> float:
        """Mean per-token negative log-likelihood (the CounterFact score)."""
        return -self.sum_logprob / max(1, self.n_tokens)

    @property
    def prob(self) -> float:
        """Probability of the whole target (product over its tokens)."""
        return float(torch.tensor(self.sum_logprob).exp())


@torch.no_grad()
def score_targets(
    model: nn.Module,
    tok: PreTrainedTokenizerBase,
    prompts: Sequence[str],
    targets: Sequence[str],
    batch_size: int = 32,
) -> list[TargetScore]:
    """Score ``targets[i]`` as the continuation of ``prompts[i]`` (teacher forced).

    Targets get a leading space when missing. Returns one :class:`TargetScore`
    per pair, in order.
    """
    if len(prompts) != len(targets):
        raise ValueError("prompts and targets must have the same length")
    device = model_device(model)
    trunk, head = trunk_and_head(model)
    pad = pad_id_of(tok)
    out: list[TargetScore] = []
    for start in range(0, len(prompts), batch_size):
        p_ids = [prompt_ids(tok, p) for p in prompts[start : start + batch_size]]
        t_ids = [target_ids(tok, t) for t in targets[start : start + batch_size]]
        seqs = [p + t[:-1] for p, t in zip(p_ids, t_ids, strict=True)]
        ids, mask = pad_right(seqs, pad, device)
        hidden = trunk(input_ids=ids, attention_mask=mask).last_hidden_state
        rows, cols, labels = [], [], []
        for i, (p, t) in enumerate(zip(p_ids, t_ids, strict=True)):
            for j, tid in enumerate(t):
                rows.append(i)
                cols.append(len(p) - 1 + j)
                labels.append(tid)
        logits = head(hidden[rows, cols]).float()
        picks = torch.arange(len(labels), device=logits.device)
        logp = logits.log_softmax(-1)[picks, torch.tensor(labels, device=logits.device)]
        k = 0
        for t in t_ids:
            out.append(TargetScore(logp[k : k + len(t)].tolist()))
            k += len(t)
    return out


def probe_requests(
    model: nn.Module, tok: PreTrainedTokenizerBase, reqs: Sequence[EditRequest]
) -> list[tuple[float, float | None]]:
    """(p(target_new), p(true object)) on each request's bare prompt, scored in one
    call; the second is None where the request has no true object (no ``target_true``,
    or zsRE's end-of-text marker: :attr:`EditRequest.true_object`)."""
    trues = [(r.text, r.true_object) for r in reqs if r.true_object is not None]
    prompts = [r.text for r in reqs] + [p for p, _ in trues]
    targets = [r.target_new for r in reqs] + [t for _, t in trues]
    scores = score_targets(model, tok, prompts, targets)
    out: list[tuple[float, float | None]] = []
    k = len(reqs)
    for j, r in enumerate(reqs):
        p_true = None
        if r.true_object is not None:
            p_true = scores[k].prob
            k += 1
        out.append((scores[j].prob, p_true))
    return out
