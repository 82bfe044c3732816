"""Second-moment statistics C = E[k kᵀ] of the edited weight's inputs.

The collector stops each forward pass at the edited module. ``C⁻¹ x`` is
applied through a Cholesky factor (float64, with a small ridge only if the
matrix needs it), computed once per (model, layer) by whoever owns the
:class:`CovFactor`.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from torch import nn
from transformers import PreTrainedTokenizerBase

from . import nethook
from .errors import BadRequestError, WeightsUnavailableError
from .scoring import model_device, pad_id_of, pad_right
from .templates import seed_token_id

log = logging.getLogger(__name__)

Progress = Callable[[int, int], None]  # (done, total) in texts

HUB_CORPORA = {
    "wikipedia": ("wikimedia/wikipedia", "20231101.en"),
    "wikitext": ("Salesforce/wikitext", "wikitext-103-raw-v1"),
}


@dataclass
class StatsMeta:
    model: str
    layer: int
    module: str
    corpus: str
    n_texts: int
    n_tokens: int
    max_len: int
    dtype: str
    seconds: float = 0.0
    source: str = "collected"
    extra: dict[str, Any] = field(default_factory=dict)


@dataclass
class SecondMoment:
    """The uncentred second moment and what it was computed from."""

    matrix: torch.Tensor  # (d, d) float32, already divided by the token count
    meta: StatsMeta


def _batches(
    tok: PreTrainedTokenizerBase, texts: Iterable[str], max_len: int, batch_tokens: int
) -> Iterator[tuple[list[list[int]], int]]:
    """Token lists grouped so each batch holds about ``batch_tokens`` tokens."""
    batch: list[list[int]] = []
    n_texts = 0
    for text in texts:
        n_texts += 1
        ids = list(tok(text, truncation=True, max_length=max_len)["input_ids"])
        if not ids:
            continue
        batch.append(ids)
        if sum(len(b) for b in batch) >= batch_tokens:
            yield batch, n_texts
            batch, n_texts = [], 0
    if batch or n_texts:
        yield batch, n_texts


@torch.no_grad()
def collect_second_moment(
    model: nn.Module,
    tok: PreTrainedTokenizerBase,
    module_name: str,
    texts: Iterable[str],
    n_texts: int,
    max_len: int = 128,
    batch_tokens: int = 4096,
    progress: Progress | None = None,
    stop_at_layer: bool = True,
) -> tuple[torch.Tensor, int, int]:
    """Sum of k kᵀ over all non-pad tokens of ``texts``: (mean matrix, tokens, texts).

    ``stop_at_layer=False`` runs the whole model (the published collector;
    kept for the benchmark).
    """
    device = model_device(model)
    acc: torch.Tensor | None = None
    total = torch.zeros((), dtype=torch.float64)
    seen_texts = 0
    pad = pad_id_of(tok)
    for batch, consumed in _batches(tok, texts, max_len, batch_tokens):
        seen_texts += consumed
        if batch:
            ids, mask = pad_right(batch, pad, device)
            with nethook.capture(model, module_name, stop=stop_at_layer) as rec:
                with nethook.stop_after():
                    model(input_ids=ids, attention_mask=mask, use_cache=False)
            assert rec.input is not None
            k = rec.input[mask.bool()].float()
            part = k.T @ k
            acc = part.double() if acc is None else acc + part.double()
            total += k.shape[0]
        if progress is not None:
            progress(min(seen_texts, n_texts), n_texts)
    if acc is None or total == 0:
        raise BadRequestError("the covariance corpus produced no tokens")
    return (acc / total).float().cpu(), int(total), seen_texts


def sampled_texts(
    model: nn.Module,
    tok: PreTrainedTokenizerBase,
    n: int,
    length: int,
    seed: int = 0,
    batch: int = 64,
) -> Iterator[str]:
    """Text sampled from the model itself (the offline corpus): seeded, top-k 50.

    The global RNG is forked, so sampling leaves the caller's random state alone.
    """
    device = model_device(model)
    start = seed_token_id(tok)
    made = 0
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(seed)
        while made < n:
            b = min(batch, n - made)
            ids = torch.full((b, 1), start, dtype=torch.long, device=device)
            out = model.generate(  # type: ignore[operator]
                input_ids=ids,
                attention_mask=torch.ones_like(ids),
                do_sample=True,
                top_k=50,
                max_new_tokens=length - 1,
                min_new_tokens=length - 1,
                pad_token_id=pad_id_of(tok),
            )
            made += b
            yield from tok.batch_decode(out[:, 1:], skip_special_tokens=True)


def hub_texts(corpus: str) -> Iterator[str]:
    """Texts streamed from the Hugging Face hub (needs a network)."""
    name, config = HUB_CORPORA[corpus]
    try:
        from datasets import load_dataset

        ds = load_dataset(name, config, split="train", streaming=True)
        for row in ds:
            text = row["text"].strip()
            if text:
                yield text
    except Exception as exc:  # datasets raises many kinds when offline
        raise WeightsUnavailableError(
            f"cannot stream the {corpus!r} corpus from the hub ({exc.__class__.__name__}). "
            "Offline, use --corpus sampled (text sampled from the model), --corpus PATH "
            "(local .txt files), --covariance identity, or import ROME's .npz stats"
        ) from None


def file_texts(path: Path) -> Iterator[str]:
    """Paragraphs (blank-line separated) of a .txt file or of every .txt in a folder."""
    files = sorted(path.rglob("*.txt")) if path.is_dir() else [path]
    if not files:
        raise BadRequestError(f"no .txt files under {path}")
    for f in files:
        for para in f.read_text(errors="replace").split("\n\n"):
            if para.strip():
                yield para.strip()


def cached_sampled_texts(
    model: nn.Module,
    tok: PreTrainedTokenizerBase,
    n: int,
    length: int,
    seed: int,
    path: Path | None,
) -> Iterator[str]:
    """Sampled texts, kept in ``path`` so every layer's statistics reuse one sample.

    Yields as it samples (so progress moves), and writes the file at the end.
    """
    if path is not None and path.is_file():
        texts = json.loads(path.read_text())
        if len(texts) >= n:
            yield from texts[:n]
            return
    made: list[str] = []
    for text in sampled_texts(model, tok, n, length, seed):
        made.append(text)
        yield text
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(made))


def corpus_texts(
    corpus: str,
    model: nn.Module,
    tok: PreTrainedTokenizerBase,
    n: int,
    max_len: int,
    seed: int,
    text_cache: Path | None = None,
) -> Iterator[str]:
    """The first ``n`` texts of a corpus: ``wikipedia``, ``wikitext``, ``sampled`` or a path.

    Sampled text is kept under ``text_cache`` (when given) for reuse.
    """
    if corpus == "sampled":
        path = text_cache / f"sampled_{n}x{max_len}_seed{seed}.json" if text_cache else None
        src: Iterable[str] = cached_sampled_texts(model, tok, n, max_len, seed, path)
    elif corpus in HUB_CORPORA:
        src = hub_texts(corpus)
    elif Path(corpus).exists():
        src = file_texts(Path(corpus))
    else:
        raise BadRequestError(
            f"unknown corpus {corpus!r}: use wikipedia, wikitext, sampled or a path to .txt files"
        )
    for i, text in enumerate(src):
        if i >= n:
            break
        yield text


def stats_path(root: Path, model_key: str, corpus: str, module: str, dtype: str, n: int) -> Path:
    """``stats/{model}/{corpus}_stats/{module}_{dtype}_mom2_{n}.safetensors`` (ROME's layout)."""
    corpus_key = Path(corpus).name if Path(corpus).exists() else corpus
    return (
        root
        / "stats"
        / model_key
        / f"{corpus_key}_stats"
        / f"{module}_{dtype}_mom2_{n}.safetensors"
    )


def save_stats(path: Path, stats: SecondMoment) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    save_file({"mom2": stats.matrix.contiguous()}, str(tmp))
    tmp.replace(path)
    path.with_suffix(".json").write_text(json.dumps(asdict(stats.meta), indent=1))


def load_stats(path: Path) -> SecondMoment:
    matrix = load_file(str(path))["mom2"]
    meta = StatsMeta(**json.loads(path.with_suffix(".json").read_text()))
    return SecondMoment(matrix, meta)


def import_rome_npz(path: str | Path, model_key: str, layer: int, module: str) -> SecondMoment:
    """Read a stats file written by ROME's ``layer_stats`` (keys ``mom2.mom2``, ``mom2.count``)."""
    data = np.load(str(path), allow_pickle=True)
    try:
        mom2 = torch.from_numpy(np.asarray(data["mom2.mom2"], dtype=np.float64))
        count = float(np.asarray(data["mom2.count"]))
    except KeyError:
        raise BadRequestError(
            f"{path} is not a ROME stats file (no mom2.mom2 / mom2.count keys)"
        ) from None
    meta = StatsMeta(
        model=model_key,
        layer=layer,
        module=module,
        corpus=f"imported:{Path(path).name}",
        n_texts=-1,
        n_tokens=int(count),
        max_len=-1,
        dtype=str(data["mom2.mom2"].dtype),
        source=str(path),
    )
    return SecondMoment((mom2 / count).float(), meta)


def compute_stats(
    model: nn.Module,
    tok: PreTrainedTokenizerBase,
    model_key: str,
    layer: int,
    module: str,
    corpus: str,
    n_texts: int,
    max_len: int,
    dtype: str = "float32",
    seed: int = 0,
    progress: Progress | None = None,
    text_cache: Path | None = None,
) -> SecondMoment:
    t0 = time.perf_counter()
    texts = corpus_texts(corpus, model, tok, n_texts, max_len, seed, text_cache)
    matrix, n_tokens, seen = collect_second_moment(
        model, tok, module, texts, n_texts, max_len, progress=progress
    )
    meta = StatsMeta(
        model=model_key,
        layer=layer,
        module=module,
        corpus=corpus,
        n_texts=seen,
        n_tokens=n_tokens,
        max_len=max_len,
        dtype=dtype,
        seconds=time.perf_counter() - t0,
        extra={"seed": seed} if corpus == "sampled" else {},
    )
    log.info("covariance for %s over %d tokens of %s", module, n_tokens, corpus)
    return SecondMoment(matrix, meta)


class CovFactor:
    """Applies ``C⁻¹ x`` through a float64 Cholesky factor; ``None`` means identity."""

    def __init__(self, matrix: torch.Tensor | None, ridge: float = 1e-6, description: str = ""):
        self.description = description or ("identity" if matrix is None else "second moment")
        self.ridge_used = 0.0
        self._chol: torch.Tensor | None = None
        if matrix is None:
            return
        c = matrix.double().cpu()
        c = 0.5 * (c + c.T)
        scale = float(c.diagonal().mean().clamp_min(1e-30))
        eye = torch.eye(c.shape[0], dtype=torch.float64)
        for extra in (0.0, ridge, ridge * 1e2, ridge * 1e4, ridge * 1e6):
            chol, info = torch.linalg.cholesky_ex(c + extra * scale * eye)
            if int(info) == 0:
                self._chol, self.ridge_used = chol, extra
                break
        if self._chol is None:
            raise BadRequestError(
                "the covariance matrix is not positive definite, even with a ridge"
            )
        if self.ridge_used:
            log.warning("covariance needed a ridge of %.1e x mean(diag)", self.ridge_used)

    @property
    def is_identity(self) -> bool:
        return self._chol is None

    def solve(self, x: torch.Tensor) -> torch.Tensor:
        if self._chol is None:
            return x.clone()
        y = torch.cholesky_solve(x.double().cpu().reshape(-1, 1), self._chol)
        return y.reshape(x.shape).to(device=x.device, dtype=x.dtype)
