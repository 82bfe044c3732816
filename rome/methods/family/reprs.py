"""Where the subject's last token is, and the representations read there.

Two rules for the index, both from the published code:

- ``joined`` (unified-model-editing, AlphaEdit): the number of tokens of
  ``prefix + subject`` encoded as one string, minus one. Right for tokenizers
  that add a BOS.
- ``separate`` (kmeng01/memit): the prefix (its trailing space stripped),
  ``" " + subject`` and the suffix are tokenised one by one and their lengths
  added. Counts a BOS twice on tokenizers that add one.

The prompt itself is always tokenised as one string.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn
from transformers import PreTrainedTokenizerBase

from ... import nethook
from ...batching import pad_id_of, pad_right
from ...devices import model_device
from ...errors import BadRequestError, SubjectNotFoundError
from ...hparams import SUBJECT_INDEX


@dataclass(frozen=True)
class Located:
    """Token ids of a filled template and the index of the subject's last token."""

    ids: list[int]
    index: int


def subject_last_index(
    tok: PreTrainedTokenizerBase, template: str, subject: str, rule: str = "joined"
) -> int:
    """Index of the subject's last token in ``template`` (one ``{}``) filled with ``subject``."""
    prefix, _, _suffix = template.partition("{}")
    if rule == "joined":
        return len(tok.encode(prefix + subject)) - 1
    if rule == "separate":
        word = subject
        if prefix:
            # the published code asserts the prefix ends in a space; without one
            # (e.g. "({})") it keeps the prefix whole and the subject as given
            if prefix.endswith(" "):
                prefix, word = prefix[:-1], " " + subject.strip()
        n_prefix = len(tok(prefix)["input_ids"]) if prefix else 0
        return n_prefix + len(tok(word)["input_ids"]) - 1
    raise BadRequestError(f"subject_index must be one of {', '.join(SUBJECT_INDEX)}, not {rule!r}")


def locate(tok: PreTrainedTokenizerBase, template: str, subject: str, rule: str) -> Located:
    """Tokenise ``template`` filled with ``subject``; find the subject's last token."""
    ids = list(tok(template.replace("{}", subject, 1))["input_ids"])
    idx = subject_last_index(tok, template, subject, rule)
    if not 0 <= idx < len(ids):
        raise SubjectNotFoundError(
            f"the subject {subject!r} was not found among the tokens of {template!r}"
        )
    return Located(ids, idx)


@torch.no_grad()
def reprs_at(
    model: nn.Module,
    tok: PreTrainedTokenizerBase,
    items: Sequence[Located],
    module_name: str,
    track: str,
    batch_size: int = 128,
) -> torch.Tensor:
    """The input (``track="in"``) or output (``"out"``) of ``module_name`` at each item's
    index, rows in order, float32. Right padding; the pass stops after the module."""
    if track not in ("in", "out"):
        raise ValueError(f"track must be 'in' or 'out', not {track!r}")
    rows: list[torch.Tensor] = []
    for start in range(0, len(items), batch_size):
        chunk = items[start : start + batch_size]
        ids, mask = pad_right([it.ids for it in chunk], pad_id_of(tok), model_device(model))
        with nethook.capture(model, module_name, stop=True) as rec, nethook.stop_after():
            model(input_ids=ids, attention_mask=mask, use_cache=False)
        x = rec.input if track == "in" else rec.output
        assert x is not None
        r = torch.arange(len(chunk), device=x.device)
        c = torch.tensor([it.index for it in chunk], device=x.device)
        rows.append(x[r, c].float())
    return torch.cat(rows)


def group_average(keys: torch.Tensor, n_templates: int) -> torch.Tensor:
    """(n·t, d) keys, t templates per request with the bare one first → (n, d):
    ½ the bare key + ½ the mean of the prefixed ones (the bare key alone if t = 1)."""
    k = keys.reshape(-1, n_templates, keys.shape[-1])
    if n_templates == 1:
        return k[:, 0]
    return 0.5 * k[:, 0] + 0.5 * k[:, 1:].mean(1)
