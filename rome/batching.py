"""Token ids of prompts and targets, and right-padded batches of them.

Shared by everything that runs the model on a batch: keys, v*, covariance
statistics, scoring and the evals.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from transformers import PreTrainedTokenizerBase


def with_leading_space(text: str) -> str:
    """ROME scores and trains targets with a leading space (" Rome")."""
    return text if text.startswith(" ") else " " + text


def prompt_ids(tok: PreTrainedTokenizerBase, prompt: str) -> list[int]:
    return list(tok(prompt)["input_ids"])


def target_ids(tok: PreTrainedTokenizerBase, target: str) -> list[int]:
    return list(tok(with_leading_space(target), add_special_tokens=False)["input_ids"])


def pad_right(
    seqs: Sequence[Sequence[int]], pad_id: int, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded ids and attention mask."""
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long, device=device)
    mask = torch.zeros((len(seqs), width), dtype=torch.long, device=device)
    for i, s in enumerate(seqs):
        ids[i, : len(s)] = torch.tensor(list(s), dtype=torch.long, device=device)
        mask[i, : len(s)] = 1
    return ids, mask


def pad_id_of(tok: PreTrainedTokenizerBase) -> int:
    """The tokenizer's pad id, else its end-of-text id, else 0."""
    for cand in (tok.pad_token_id, tok.eos_token_id, 0):
        if cand is not None:
            return int(cand)
    return 0
