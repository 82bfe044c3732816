"""Context templates: ``"{}"`` plus short model-sampled prefixes, each ``"<prefix>. {}"``.

ROME samples them unseeded on every run; here they are sampled once per
(model, seed, lengths) with a seeded generator and cached on disk, or given
explicitly by the caller.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import nn
from transformers import PreTrainedTokenizerBase

from .devices import model_device
from .errors import BadRequestError
from .paths import atomic_write_text

log = logging.getLogger(__name__)

SEED_TOKEN = "<|endoftext|>"


def seed_token_id(tok: PreTrainedTokenizerBase) -> int:
    """``<|endoftext|>`` where the vocabulary has it (GPT-2, SmolLM2), else BOS, else EOS."""
    vocab = tok.get_vocab()
    if SEED_TOKEN in vocab:
        return int(vocab[SEED_TOKEN])
    for cand in (tok.bos_token_id, tok.eos_token_id):
        if cand is not None:
            return int(cand)
    raise BadRequestError("the tokenizer has no <|endoftext|>, BOS or EOS token to seed sampling")


@torch.no_grad()
def sample_prefixes(
    model: nn.Module,
    tok: PreTrainedTokenizerBase,
    length: int,
    n: int,
    generator: torch.Generator,
    top_k: int = 5,
) -> list[str]:
    """``n`` texts of ``length`` tokens (seed token included, as ROME counts), top-k sampled."""
    device = model_device(model)
    ids = torch.full((n, 1), seed_token_id(tok), dtype=torch.long, device=device)
    for _ in range(max(0, length - 1)):
        logits = model(input_ids=ids, use_cache=False).logits[:, -1].float()
        top, idx = logits.topk(top_k, dim=-1)
        choice = torch.multinomial(top.softmax(-1).cpu(), 1, generator=generator).to(device)
        ids = torch.cat([ids, idx.gather(1, choice)], dim=1)
    texts = tok.batch_decode(ids[:, 1:], skip_special_tokens=True)
    return [t.replace("{", " ").replace("}", " ") for t in texts]


def sample_templates(
    model: nn.Module,
    tok: PreTrainedTokenizerBase,
    length_params: Sequence[Sequence[int]],
    seed: int,
) -> list[str]:
    gen = torch.Generator().manual_seed(seed)
    out = ["{}"]
    for length, n in length_params:
        out += [p + ". {}" for p in sample_prefixes(model, tok, int(length), int(n), gen)]
    return out


def normalise_templates(templates: Sequence[str]) -> list[str]:
    """Check each has one ``{}``; make ``"{}"`` the first (v_init is read from it)."""
    out = [t for t in templates if t != "{}"]
    for t in out:
        if t.count("{}") != 1:
            raise BadRequestError(f"context template without exactly one '{{}}': {t!r}")
    return ["{}", *out]


def load_templates_file(path: str | Path) -> list[str]:
    try:
        data = json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise BadRequestError(f"cannot read templates from {path}: {exc}") from None
    if not isinstance(data, list) or not all(isinstance(t, str) for t in data):
        raise BadRequestError(f"{path} must hold a JSON list of strings")
    return normalise_templates(data)


def cached_templates(
    model: nn.Module,
    tok: PreTrainedTokenizerBase,
    model_key: str,
    length_params: Sequence[Sequence[int]],
    seed: int,
    cache_dir: Path | None,
    shipped: Sequence[str] | None = None,
) -> list[str]:
    """Sample once per (model, lengths, seed); reuse the file in ``cache_dir`` after.

    Without a cached file, ``shipped`` (the templates the package ships for this model
    and settings, rome/bundled; the editor looks them up) are used when given.
    """
    lengths = "_".join(f"{a}x{b}" for a, b in length_params)
    path = cache_dir / f"templates_{model_key}_{lengths}_seed{seed}.json" if cache_dir else None
    if path is not None and path.is_file():
        return normalise_templates(json.loads(path.read_text()))
    if shipped is not None:
        return normalise_templates(shipped)
    templates = sample_templates(model, tok, length_params, seed)
    if path is not None:  # atomic: a concurrent process never reads half a file
        atomic_write_text(path, json.dumps(templates, indent=1))
        log.info("sampled %d context templates, cached at %s", len(templates), path)
    return templates
