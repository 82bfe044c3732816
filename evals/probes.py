"""Probes of the whole model that a replay runs at its checkpoints.

- :func:`perplexity`: mean token NLL on a fixed held-out English text
  (``data/heldout/python-docs.txt``), far more sensitive than GLUE on a small
  model.
- :func:`fluency`: this project's fluency probe, the n-gram entropy of
  greedy continuations of a few fixed prompts (not ROME's GE, which samples
  the records' generation prompts; see :mod:`evals.metrics`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn
from transformers import PreTrainedTokenizerBase

from rome.batching import pad_id_of, pad_right
from rome.devices import model_device
from rome.scoring import trunk_and_head

from .metrics import generate, generation_entropy

HELDOUT_TEXT = Path(__file__).parent / "data" / "heldout" / "python-docs.txt"
PPL_WINDOW = 128  # tokens per scored window

FLUENCY_PROMPTS = (
    "The history of the city began",
    "My favourite book is about",
    "Scientists have recently discovered that",
    "The best way to learn a language is",
    "Yesterday the weather was",
    "The company announced that",
)


@dataclass(frozen=True)
class Perplexity:
    nll: float  # mean token NLL (nats)
    n_tokens: int  # tokens scored

    @property
    def perplexity(self) -> float:
        return math.exp(self.nll)


def heldout_ids(tok: PreTrainedTokenizerBase, path: Path = HELDOUT_TEXT) -> list[int]:
    return list(tok(path.read_text(encoding="utf-8"), add_special_tokens=False)["input_ids"])


@torch.no_grad()
def perplexity(
    model: nn.Module,
    tok: PreTrainedTokenizerBase,
    ids: list[int] | None = None,
    window: int = PPL_WINDOW,
    batch_size: int = 8,
) -> Perplexity:
    """Mean NLL of each window's tokens given the window's earlier tokens.

    The text is cut into consecutive windows of ``window`` tokens, scored in
    right-padded batches; every token but each window's first is predicted.
    """
    ids = heldout_ids(tok) if ids is None else ids
    chunks = [ids[i : i + window] for i in range(0, len(ids), window)]
    chunks = [c for c in chunks if len(c) > 1]
    device = model_device(model)
    trunk, head = trunk_and_head(model)
    total, count = 0.0, 0
    for start in range(0, len(chunks), batch_size):
        batch = chunks[start : start + batch_size]
        x, mask = pad_right(batch, pad_id_of(tok), device)
        hidden = trunk(input_ids=x, attention_mask=mask, use_cache=False).last_hidden_state
        keep = mask[:, 1:].bool()
        logp = head(hidden[:, :-1][keep]).float().log_softmax(-1)
        gold = x[:, 1:][keep]
        total += float(-logp.gather(1, gold[:, None]).sum())
        count += int(keep.sum())
    return Perplexity(total / count, count)


def fluency(model: nn.Module, tok: PreTrainedTokenizerBase, tokens: int) -> float:
    """Generation entropy of greedy continuations of :data:`FLUENCY_PROMPTS`."""
    conts = generate(model, tok, list(FLUENCY_PROMPTS), tokens)
    return generation_entropy([p + c for p, c in zip(FLUENCY_PROMPTS, conts, strict=True)])
