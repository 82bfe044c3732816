"""Keys: the input of the edited weight at the subject's last token.

The forward pass stops right after the edited module: nothing above the
edited layer runs.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn
from transformers import PreTrainedTokenizerBase

from . import nethook
from .batching import pad_id_of, pad_right
from .devices import model_device
from .tokens import encode_with_subject


@torch.no_grad()
def keys_at_subject(
    model: nn.Module,
    tok: PreTrainedTokenizerBase,
    module_name: str,
    templates: Sequence[str],
    subject: str,
    stop: bool = True,
) -> torch.Tensor:
    """One key per template (each with one ``{}`` for the subject), as rows, float32.

    The keys are on the edited module's device (under a device map, the edited
    layer's GPU, not the embedding's). ``stop=False`` runs the whole model (the
    published behaviour; for benchmarks).
    """
    encs = [encode_with_subject(tok, t, subject) for t in templates]
    ids, mask = pad_right([e.ids for e in encs], pad_id_of(tok), model_device(model))
    with nethook.capture(model, module_name, stop=stop) as rec, nethook.stop_after():
        model(input_ids=ids, attention_mask=mask, use_cache=False)
    assert rec.input is not None
    keys = rec.input
    rows = torch.arange(len(encs), device=keys.device)
    cols = torch.tensor([e.subject_last for e in encs], device=keys.device)
    return keys[rows, cols].float()


def average_keys(keys: torch.Tensor, averaging: str) -> torch.Tensor:
    """k* from the keys of ``["{}", prefixed...]``.

    ``uniform`` (ROME): the mean over all templates. ``grouped`` (MEMIT, later
    r-ROME): the bare prompt is one group and the prefixed prompts another, so
    k(s) weighs one half.
    """
    if averaging == "uniform" or keys.shape[0] == 1:
        return keys.mean(0)
    if averaging == "grouped":
        return 0.5 * keys[0] + 0.5 * keys[1:].mean(0)
    raise ValueError(f"unknown key averaging {averaging!r}")
