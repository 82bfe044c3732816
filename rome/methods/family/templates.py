"""The family's context templates: ``"{}"`` plus one prefix per start word.

As the three published repositories build them (``get_context_templates``):
one prefix per start word ("The", "Therefore", "Because", "I", "You"),
top-k 5 sampling from the model until the prefix is 10 tokens long with its
start word, then NFKD, blank lines to spaces, ``<|endoftext|>`` removed,
braces replaced by spaces, and ``". {}"`` appended. The published code samples
them unseeded once per process; here a seeded generator makes them
reproducible, the editor keeps them (sampled on the unedited weights), and a
caller may pass them explicitly (parity, a resumed replay).
"""

from __future__ import annotations

import unicodedata
from collections.abc import Sequence
from typing import TYPE_CHECKING

import torch
from torch import nn
from transformers import PreTrainedTokenizerBase

from ...devices import model_device
from ...errors import BadRequestError

if TYPE_CHECKING:
    from ...context import EditContext, HasCaches

TEMPLATES_KEY = ("family", "templates")


def normalise_prefix(text: str) -> str:
    """The published clean-up of one sampled text, then ``". {}"``."""
    text = unicodedata.normalize("NFKD", text).replace("\n\n", " ").replace("<|endoftext|>", "")
    return text.replace("{", " ").replace("}", " ") + ". {}"


@torch.no_grad()
def sample_family_templates(
    model: nn.Module,
    tok: PreTrainedTokenizerBase,
    words: Sequence[str],
    length: int = 10,
    top_k: int = 5,
    seed: int = 0,
) -> list[str]:
    """``["{}", "<prefix 1>. {}", ...]``, one prefix per start word, seeded top-k sampling.

    ``length`` counts the tokens of the whole prefix, the start word's (and a
    BOS the tokenizer adds) included, as the published ``max_out_len``. Special
    tokens are dropped when decoding (the published decode keeps them and only
    removes ``<|endoftext|>``; the two agree for GPT-2, GPT-J and SmolLM2).
    """
    gen = torch.Generator().manual_seed(seed)
    device = model_device(model)
    out = ["{}"]
    for word in words:
        ids = torch.tensor([list(tok(word)["input_ids"])], dtype=torch.long, device=device)
        while ids.shape[1] < length:
            logits = model(input_ids=ids, use_cache=False).logits[:, -1].float()
            probs = logits.softmax(-1)
            top, idx = probs.topk(top_k, dim=-1)
            choice = torch.multinomial((top / top.sum(-1, keepdim=True)).cpu(), 1, generator=gen)
            ids = torch.cat([ids, idx.gather(1, choice.to(device))], dim=1)
        out.append(normalise_prefix(str(tok.decode(ids[0].tolist(), skip_special_tokens=True))))
    return out


def check_templates(templates: Sequence[str]) -> list[str]:
    """The first must be ``"{}"``; each must hold exactly one ``{}``."""
    ts = list(templates)
    if not ts or ts[0] != "{}":
        raise BadRequestError('the family\'s context templates must start with the bare "{}"')
    for t in ts:
        if t.count("{}") != 1:
            raise BadRequestError(f"context template without exactly one '{{}}': {t!r}")
    return ts


def family_templates(editor: HasCaches | EditContext) -> list[str]:
    """The editor's family templates: the preset's explicit list, else sampled once
    (seeded with ``template_seed``) on the unedited weights and kept by the editor."""

    def make() -> list[str]:
        hp = editor.hp
        if hp.family_context_templates is not None:
            return check_templates(hp.family_context_templates)
        with editor.caches.base_weights():
            return sample_family_templates(
                editor.model,
                editor.tok,
                hp.family_template_words,
                hp.family_template_length,
                hp.family_template_top_k,
                hp.template_seed,
            )

    return list(editor.caches.cached(TEMPLATES_KEY, make))


def use_templates(editor: HasCaches | EditContext, templates: Sequence[str]) -> None:
    """Make ``editor`` use these family templates (a resumed replay, a parity run).

    Must be called before the editor's first family edit.
    """
    ts = check_templates(templates)
    got = editor.caches.cached(TEMPLATES_KEY, lambda: ts)
    if list(got) != ts:
        raise BadRequestError("this editor already uses other family context templates")
