"""What the Model tab shows of a loaded model: its facts and its covariance's state."""

from __future__ import annotations

import torch

from rome import Editor, LoadedModel

from .records import ModelInfo


def model_info(lm: LoadedModel, ed: Editor) -> ModelInfo:
    gpu = None
    if lm.device.type == "cuda":
        gpu = int(torch.cuda.memory_allocated(lm.device))
    cov, ready = covariance_status(lm, ed, lm.hparams.layer)
    return ModelInfo(
        name=lm.name,
        source=lm.source,
        device=str(lm.device),
        dtype=str(lm.dtype).replace("torch.", ""),
        n_layers=lm.n_layers,
        layer=lm.hparams.layer,
        weight_module=lm.hparams.weight_module(),
        memory_bytes=lm.memory_bytes(),
        gpu_memory_bytes=gpu,
        default_mode=lm.hparams.default_mode,
        covariance=cov,
        covariance_ready=ready,
        notes=lm.hparams.notes,
        seconds=lm.seconds,
    )


def covariance_status(lm: LoadedModel, ed: Editor, layer: int) -> tuple[str, bool]:
    """A description of layer's covariance and whether it is ready (in memory or cached)."""
    hp = lm.hparams
    if hp.covariance == "identity":
        return "identity (no covariance)", True
    meta = ed.stats_meta(layer)
    if meta is not None:
        return f"{meta.corpus}: {meta.n_texts} texts, {meta.n_tokens} tokens", True
    corpus = corpus_words(hp.mom2_dataset)
    path = ed.stats_file(layer)
    if path is not None and path.is_file():
        return f"{corpus}, {hp.mom2_n_samples} texts (cached on disk)", True
    return f"{corpus}, {hp.mom2_n_samples} texts (not computed yet)", False


def corpus_words(dataset: str) -> str:
    """The covariance corpus in words."""
    return {
        "sampled": "text sampled from the model",
        "wikipedia": "Wikipedia",
        "wikitext": "WikiText-103",
    }.get(dataset, dataset)
