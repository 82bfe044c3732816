"""Second-moment statistics C = E[k kᵀ] of the edited weight's inputs.

(Over 500 lines: the collector, the corpora, the checked cache and ROME's .npz
import share one file format and its checks; rome/distributed.py holds the
multi-process part.)

The collector stops each forward pass at the edited module. Batches are sized
by tokens; the running sum of k kᵀ stays on the edited layer's device (float64
by default). ``C⁻¹ x`` is applied through a Cholesky factor (float64, with a
small ridge only if the matrix needs it), computed once per (model, layer) by
whoever owns the :class:`CovFactor`.

Cache files are checked (shape, finite, symmetric) before they are written,
written to a unique temporary file and renamed, so a good cache file is never
replaced by a bad or half-written one. A cache file that cannot be read raises
:class:`CorruptStatsError` naming the file and how to rebuild it.
:mod:`rome.distributed` shards the same collector over torch.distributed ranks.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import time
import zipfile
from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn
from transformers import PreTrainedTokenizerBase

from . import nethook
from .batching import pad_id_of, pad_right
from .devices import model_device, module_device
from .errors import BadRequestError, BadStatsError, CorruptStatsError, WeightsUnavailableError
from .paths import atomic_write_text, temp_path_beside
from .progress import StepProgress
from .templates import seed_token_id

log = logging.getLogger(__name__)


FORWARD_PRECISIONS = ("float32", "bf16", "tf32")
ACCUMULATE_DTYPES = {"float64": torch.float64, "float32": torch.float32}
SYMMETRY_RTOL = 1e-4

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


@dataclass
class MomentSum:
    """The unnormalised sum of k kᵀ over ``n_tokens`` tokens of ``n_texts`` texts."""

    total: torch.Tensor  # (d, d), on the collecting device, float64 (or float32)
    n_tokens: int
    n_texts: int

    def mean(self) -> torch.Tensor:
        """``E[k kᵀ]`` as float32 on the CPU."""
        if self.n_tokens == 0:
            raise BadRequestError("the covariance corpus produced no tokens")
        return (self.total.double() / self.n_tokens).float().cpu()


@contextlib.contextmanager
def _precision(device: torch.device, forward: str) -> Iterator[None]:
    """bf16 autocast or TF32 matmuls for the forward pass, restored afterwards."""
    if forward not in FORWARD_PRECISIONS:
        raise BadRequestError(
            f"unknown forward precision {forward!r}: use {', '.join(FORWARD_PRECISIONS)}"
        )
    if forward == "bf16":
        with torch.autocast(device_type=device.type, dtype=torch.bfloat16):
            yield
        return
    if forward == "tf32" and device.type == "cuda":
        old = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
        try:
            yield
        finally:
            torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = old
        return
    yield


@torch.no_grad()
def collect_moment_sum(
    model: nn.Module,
    tok: PreTrainedTokenizerBase,
    module_name: str,
    texts: Iterable[str],
    n_texts: int,
    max_len: int = 128,
    batch_tokens: int = 4096,
    progress: StepProgress | None = None,
    stop_at_layer: bool = True,
    forward: str = "float32",
    accumulate: str = "float64",
) -> MomentSum:
    """Sum of k kᵀ over all non-pad tokens of ``texts``, on the edited module's device.

    Batches hold about ``batch_tokens`` tokens (texts truncated to ``max_len``).
    ``forward``: ``float32``, ``bf16`` (autocast) or ``tf32`` (TF32 matmuls on
    CUDA); each batch's k kᵀ is a float32 product, added to a running sum in
    ``accumulate`` (``float64`` default, ``float32`` halves its memory). A
    corpus (or a rank's shard of one) with no tokens gives a zero sum.
    ``stop_at_layer=False`` runs the whole model (the published collector; kept
    for the benchmark).
    """
    if accumulate not in ACCUMULATE_DTYPES:
        raise BadRequestError(
            f"unknown accumulation dtype {accumulate!r}: use {', '.join(ACCUMULATE_DTYPES)}"
        )
    if forward not in FORWARD_PRECISIONS:
        raise BadRequestError(
            f"unknown forward precision {forward!r}: use {', '.join(FORWARD_PRECISIONS)}"
        )
    in_dev = model_device(model)
    at = module_device(model, module_name)
    acc: torch.Tensor | None = None
    n_tokens = 0
    seen_texts = 0
    pad = pad_id_of(tok)
    for batch, consumed in _batches(tok, texts, max_len, batch_tokens):
        seen_texts += consumed
        if batch:
            ids, mask = pad_right(batch, pad, in_dev)
            with nethook.capture(model, module_name, stop=stop_at_layer) as rec:
                with nethook.stop_after(), _precision(at, forward):
                    model(input_ids=ids, attention_mask=mask, use_cache=False)
            assert rec.input is not None
            keys = rec.input
            k = keys[mask.to(keys.device).bool()].float()
            part = (k.T @ k).to(ACCUMULATE_DTYPES[accumulate])  # a float32 product
            acc = part if acc is None else acc.add_(part)
            n_tokens += int(k.shape[0])
        if progress is not None:
            progress(min(seen_texts, n_texts), n_texts)
    if acc is None:
        d = _in_features(model, module_name)
        acc = torch.zeros((d, d), dtype=ACCUMULATE_DTYPES[accumulate], device=at)
    return MomentSum(acc, n_tokens, seen_texts)


def _in_features(model: nn.Module, module_name: str) -> int:
    """Width of the edited module's input (Linear, or GPT-2's transposed Conv1D)."""
    module = nethook.get_module(model, module_name)
    w = module.weight
    assert isinstance(w, torch.Tensor)
    return int(w.shape[0] if module.__class__.__name__ == "Conv1D" else w.shape[1])


def expected_width(model: nn.Module, module_name: str) -> int:
    """The size ``d`` a second moment for ``module_name`` must have (``d × d``)."""
    return _in_features(model, module_name)


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
        texts = _read_text_list(path)
        if texts is not None and len(texts) >= n:
            yield from texts[:n]
            return
    made: list[str] = []
    for text in sampled_texts(model, tok, n, length, seed):
        made.append(text)
        yield text
    if path is not None:
        atomic_write_text(path, json.dumps(made))


def _read_text_list(path: Path) -> list[str] | None:
    """A cached list of texts, or ``None`` (with a warning) when the file is damaged."""
    try:
        texts = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        texts = None
    if not isinstance(texts, list) or not all(isinstance(t, str) for t in texts):
        log.warning("%s is damaged; sampling its texts again", path)
        return None
    return texts


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


def check_matrix(matrix: torch.Tensor, expected_dim: int | None = None, what: str = "") -> None:
    """Refuse a second moment that is not ``d × d`` (``d = expected_dim`` when given),
    has NaN or infinite entries, or is not symmetric (to ``SYMMETRY_RTOL`` of its
    largest entry). Raises :class:`BadStatsError` with one line."""
    name = f"{what}: " if what else ""
    if matrix.ndim != 2 or matrix.shape[0] != matrix.shape[1]:
        raise BadStatsError(f"{name}the second moment must be square, got {tuple(matrix.shape)}")
    if expected_dim is not None and matrix.shape[0] != expected_dim:
        raise BadStatsError(
            f"{name}the second moment is {matrix.shape[0]}x{matrix.shape[1]} but the edited "
            f"module's input has width {expected_dim} (statistics of another model or layer?)"
        )
    m = matrix.double()
    if not bool(torch.isfinite(m).all()):
        raise BadStatsError(f"{name}the second moment has NaN or infinite entries")
    scale = float(m.abs().max()) if m.numel() else 0.0
    asym = float((m - m.T).abs().max()) if m.numel() else 0.0
    if asym > SYMMETRY_RTOL * max(scale, 1e-30):
        raise BadStatsError(
            f"{name}the second moment is not symmetric (max |C - Cᵀ| = {asym:.3g}, "
            f"largest entry {scale:.3g})"
        )


def rebuild_hint(path: Path) -> str:
    return f"rebuild it with `rome-workbench stats --force` (same model and layer) or delete {path}"


def save_stats(path: Path, stats: SecondMoment, expected_dim: int | None = None) -> None:
    """Check the matrix, then write matrix and metadata atomically (temp file, rename).

    A bad matrix raises :class:`BadStatsError` and leaves any existing cache file
    as it was. The metadata is renamed into place first, the matrix last: the
    matrix file is what marks the statistics as cached.
    """
    check_matrix(stats.matrix, expected_dim, str(path.name))
    tmp = temp_path_beside(path)
    try:
        save_file({"mom2": stats.matrix.detach().float().cpu().contiguous()}, str(tmp))
        load_stats_matrix(tmp, path)  # read back what was written before it replaces anything
        atomic_write_text(path.with_suffix(".json"), json.dumps(asdict(stats.meta), indent=1))
        tmp.replace(path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def load_stats_matrix(path: Path, shown: Path | None = None) -> torch.Tensor:
    """The ``mom2`` matrix of a cache file; :class:`CorruptStatsError` if it cannot be read."""
    shown = shown or path
    try:
        matrix = load_file(str(path))["mom2"]
    except (SafetensorError, OSError, KeyError, ValueError) as exc:
        why = "no mom2 tensor" if isinstance(exc, KeyError) else "truncated or not safetensors"
        raise CorruptStatsError(
            f"the cached statistics {shown} cannot be read ({why}); {rebuild_hint(shown)}"
        ) from None
    return matrix


def load_stats(path: Path, expected_dim: int | None = None) -> SecondMoment:
    """Read a cache file and its metadata. A damaged file (truncated, unreadable, wrong
    shape when ``expected_dim`` is given, non-finite) raises :class:`CorruptStatsError`
    naming the file and how to rebuild it."""
    matrix = load_stats_matrix(path)
    meta_path = path.with_suffix(".json")
    try:
        meta = StatsMeta(**json.loads(meta_path.read_text()))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, TypeError) as exc:
        why = "missing" if isinstance(exc, FileNotFoundError) else "damaged"
        raise CorruptStatsError(
            f"the metadata {meta_path} of the cached statistics is {why}; {rebuild_hint(path)}"
        ) from None
    try:
        check_matrix(matrix, expected_dim)
    except BadStatsError as exc:
        raise CorruptStatsError(
            f"the cached statistics {path} are unusable ({exc}); {rebuild_hint(path)}"
        ) from None
    return SecondMoment(matrix, meta)


def import_rome_npz(
    path: str | Path, model_key: str, layer: int, module: str, expected_dim: int | None = None
) -> SecondMoment:
    """Read a stats file written by ROME's ``layer_stats`` (keys ``mom2.mom2``, ``mom2.count``).

    Refuses (:class:`BadRequestError`, one line) a file that does not exist or is
    not an npz, and (:class:`BadStatsError`) a matrix of the wrong shape, with
    non-finite entries, not symmetric, or a count that is not positive.
    """
    p = Path(path)
    if not p.is_file():
        raise BadRequestError(f"{p}: no such file" if not p.exists() else f"{p} is not a file")
    try:
        data = np.load(str(p), allow_pickle=False)
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as exc:
        raise BadRequestError(
            f"{p} is not an .npz file ({exc.__class__.__name__}); pass the mom2 .npz that "
            "ROME's layer_stats wrote"
        ) from None
    if not isinstance(data, np.lib.npyio.NpzFile):
        raise BadRequestError(f"{p} is a single .npy array, not ROME's .npz stats file")
    try:
        with data:
            raw = np.asarray(data["mom2.mom2"])
            count = float(np.asarray(data["mom2.count"]))
    except KeyError:
        raise BadRequestError(
            f"{p} is not a ROME stats file (no mom2.mom2 / mom2.count keys)"
        ) from None
    except (ValueError, TypeError, zipfile.BadZipFile, OSError) as exc:
        raise BadRequestError(f"{p}: cannot read its arrays ({exc})") from None
    if raw.dtype.kind not in "fiu":
        raise BadStatsError(f"{p.name}: mom2.mom2 holds {raw.dtype}, not numbers")
    if not np.isfinite(count) or count <= 0:
        raise BadStatsError(f"{p.name}: mom2.count is {count:g}; it must be a positive count")
    mom2 = torch.from_numpy(raw.astype(np.float64))
    matrix = (mom2 / count).float()
    check_matrix(mom2, expected_dim, p.name)
    check_matrix(matrix, expected_dim, p.name)  # finite after the float32 cast too
    meta = StatsMeta(
        model=model_key,
        layer=layer,
        module=module,
        corpus=f"imported:{p.name}",
        n_texts=-1,
        n_tokens=int(count),
        max_len=-1,
        dtype=str(raw.dtype),
        source=str(p),
    )
    return SecondMoment(matrix, meta)


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
    progress: StepProgress | None = None,
    text_cache: Path | None = None,
    batch_tokens: int = 4096,
    forward: str = "float32",
    accumulate: str = "float64",
) -> SecondMoment:
    """Collect ``E[k kᵀ]`` for ``module`` over the first ``n_texts`` texts of ``corpus``."""
    t0 = time.perf_counter()
    texts = corpus_texts(corpus, model, tok, n_texts, max_len, seed, text_cache)
    ms = collect_moment_sum(
        model,
        tok,
        module,
        texts,
        n_texts,
        max_len,
        batch_tokens,
        progress=progress,
        forward=forward,
        accumulate=accumulate,
    )
    meta = stats_meta(
        model_key, layer, module, corpus, ms, max_len, dtype, seed, time.perf_counter() - t0
    )
    if forward != "float32" or accumulate != "float64":
        meta.extra.update(forward=forward, accumulate=accumulate)
    log.info("covariance for %s over %d tokens of %s", module, ms.n_tokens, corpus)
    return SecondMoment(ms.mean(), meta)


def stats_meta(
    model_key: str,
    layer: int,
    module: str,
    corpus: str,
    ms: MomentSum,
    max_len: int,
    dtype: str,
    seed: int,
    seconds: float,
) -> StatsMeta:
    return StatsMeta(
        model=model_key,
        layer=layer,
        module=module,
        corpus=corpus,
        n_texts=ms.n_texts,
        n_tokens=ms.n_tokens,
        max_len=max_len,
        dtype=dtype,
        seconds=seconds,
        extra={"seed": seed} if corpus == "sampled" else {},
    )


def _tensor_digest(t: torch.Tensor) -> str:
    data = t.detach().to("cpu", torch.float64).contiguous().numpy().tobytes()
    return hashlib.sha256(data).hexdigest()[:16]


class CovFactor:
    """Applies ``C⁻¹ x`` through a float64 Cholesky factor; ``None`` means identity."""

    def __init__(self, matrix: torch.Tensor | None, ridge: float = 1e-6, description: str = ""):
        self.description = description or ("identity" if matrix is None else "second moment")
        self.ridge_used = 0.0
        self._chol: torch.Tensor | None = None
        #: a hash of C, so a replay can tell whether it resumes with the same statistics
        self.fingerprint = "identity" if matrix is None else _tensor_digest(matrix)
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

    def solve(self, x: torch.Tensor) -> torch.Tensor:
        if self._chol is None:
            return x.clone()
        y = torch.cholesky_solve(x.double().cpu().reshape(-1, 1), self._chol)
        return y.reshape(x.shape).to(device=x.device, dtype=x.dtype)
