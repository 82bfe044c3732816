"""Data shipped with the package: the embedded model's context templates and statistics.

A first start would otherwise sample the context templates and the covariance
corpus from the model (minutes on a laptop CPU). ``rome/bundled/<model_key>/``
holds, for the embedded SmolLM2-135M, ROME's context templates, the family's
six, and the second moment of the MLP down-projection of the layers its
presets edit, made by ``scripts/bundle_data.py`` with the same code and
settings an editor would use (see ``rome/bundled/README.md``). They are used
only when the cache has none and every setting matches (model, lengths,
seed; corpus, text count, length, dtype); ``stats --force`` and ``--corpus``
compute afresh.

A second moment is symmetric: only its upper triangle is stored (float32
safetensors), about 4.7 MB per 1536-wide layer instead of 9.4 MB.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
from collections.abc import Iterable, Sequence
from importlib import resources
from importlib.resources.abc import Traversable
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load as load_bytes
from safetensors.torch import save_file
from torch import nn
from transformers import PreTrainedTokenizerBase

from . import nethook
from .batching import pad_id_of, pad_right
from .covariance import (
    ACCUMULATE_DTYPES,
    MomentSum,
    SecondMoment,
    StatsMeta,
    _batches,
    _tensor_digest,
    check_matrix,
)
from .devices import model_device
from .progress import StepProgress

log = logging.getLogger(__name__)

INDEX = "index.json"
CONVERSION_PHASE = "converting the embedded model (once)"


def conversion_pending(name: str) -> bool:
    """Whether loading ``name`` first converts the embedded model's GGUF to safetensors
    (the first phase of a first start; the other two, templates and statistics, come
    from the package)."""
    from .hparams import find_preset
    from .paths import cache_root

    preset = find_preset(name)
    if preset is None or not preset.model.startswith("embedded:"):
        return False
    target = cache_root() / "models" / "smollm2-135m"
    return not ((target / "config.json").is_file() and (target / "model.safetensors").is_file())


def bundle_dir(model_key: str) -> Traversable:
    return resources.files("rome") / "bundled" / model_key


def _index(model_key: str) -> dict[str, Any] | None:
    f = bundle_dir(model_key) / INDEX
    if not f.is_file():
        return None
    data = json.loads(f.read_text())
    return data if isinstance(data, dict) else None


def bundled_templates(
    model_key: str, kind: str, settings: dict[str, Any] | None = None
) -> list[str] | None:
    """The shipped context templates of ``kind`` (``"rome"`` or ``"family"``) for this
    model, when they were made with exactly ``settings`` (e.g. lengths and seed)."""
    index = _index(model_key)
    entry = (index or {}).get("templates", {}).get(kind)
    if entry is None or (settings is not None and entry.get("settings") != settings):
        return None
    data = json.loads((bundle_dir(model_key) / entry["file"]).read_text())
    return [str(t) for t in data]


def rome_template_settings(length_params: Sequence[Sequence[int]], seed: int) -> dict[str, Any]:
    return {"length_params": [[int(a), int(b)] for a, b in length_params], "seed": int(seed)}


def family_template_settings(
    words: Sequence[str], length: int, top_k: int, seed: int
) -> dict[str, Any]:
    """The settings the family's six templates are matched on (FAMILY.md's sampler)."""
    return {"words": list(words), "length": int(length), "top_k": int(top_k), "seed": int(seed)}


def stats_settings(corpus: str, n_texts: int, max_len: int, dtype: str, seed: int) -> dict:
    return {"corpus": corpus, "n_texts": n_texts, "max_len": max_len, "dtype": dtype, "seed": seed}


def triu_pack(matrix: torch.Tensor) -> torch.Tensor:
    """The upper triangle (diagonal included), row by row, as one float32 vector."""
    i, j = torch.triu_indices(matrix.shape[0], matrix.shape[1])
    return matrix[i, j].float().contiguous()


def triu_unpack(packed: torch.Tensor, d: int) -> torch.Tensor:
    """The symmetric ``d × d`` matrix whose upper triangle is ``packed``."""
    i, j = torch.triu_indices(d, d)
    m = torch.zeros(d, d, dtype=packed.dtype)
    m[i, j] = packed
    m[j, i] = packed
    return m


def load_bundled_stats(
    model_key: str, module: str, settings: dict[str, Any], expected_dim: int | None = None
) -> SecondMoment | None:
    """The shipped second moment of ``module`` made with ``settings``, else ``None``."""
    index = _index(model_key)
    entry = (index or {}).get("stats", {}).get(module)
    if entry is None or entry.get("settings") != settings:
        return None
    folder = bundle_dir(model_key)
    packed = load_bytes((folder / entry["file"]).read_bytes())["mom2_triu"]
    matrix = triu_unpack(packed, int(entry["dim"]))
    check_matrix(matrix, expected_dim, f"bundled {entry['file']}")
    if _tensor_digest(matrix) != entry["fingerprint"]:
        log.warning("bundled statistics %s do not match their fingerprint", entry["file"])
        return None
    meta = StatsMeta(**json.loads((folder / entry["meta"]).read_text()))
    meta.source = f"bundled:{entry['file']}"
    return SecondMoment(matrix, meta)


def write_bundled_stats(folder: Path, stats: SecondMoment, settings: dict[str, Any]) -> dict:
    """Write one layer's upper triangle and metadata; returns its index entry."""
    m = stats.meta
    name = f"{m.module}_{m.dtype}_mom2_{m.n_texts}"
    packed = triu_pack(stats.matrix)
    save_file({"mom2_triu": packed}, str(folder / f"{name}.safetensors"))
    (folder / f"{name}.json").write_text(json.dumps(m.__dict__, indent=1))
    return {
        "file": f"{name}.safetensors",
        "meta": f"{name}.json",
        "dim": int(stats.matrix.shape[0]),
        "settings": settings,
        # of the matrix as it loads (the upper triangle mirrored): a float32 k kᵀ sum
        # need not be bit-symmetric
        "fingerprint": _tensor_digest(triu_unpack(packed, int(stats.matrix.shape[0]))),
        "storage": "upper triangle, row-major, float32",
    }


def weights_fingerprint(model: nn.Module, names: Iterable[str]) -> str:
    """SHA-256 (16 hex digits) of the named parameters, in order: which weights a file
    was made from."""
    params = dict(model.named_parameters())
    h = hashlib.sha256()
    for n in names:
        w = params[n].detach().to("cpu").contiguous()
        h.update(f"{n}:{w.dtype}:{tuple(w.shape)}".encode())
        h.update(w.view(torch.uint8).numpy().tobytes())
    return h.hexdigest()[:16]


@torch.no_grad()
def collect_moment_sums(
    model: nn.Module,
    tok: PreTrainedTokenizerBase,
    modules: Sequence[str],
    texts: Iterable[str],
    n_texts: int,
    max_len: int = 128,
    batch_tokens: int = 4096,
    progress: StepProgress | None = None,
    accumulate: str = "float64",
) -> dict[str, MomentSum]:
    """:func:`rome.covariance.collect_moment_sum` for several modules in one pass.

    Each batch runs once, up to the last of ``modules`` (in forward order),
    with a capturing hook on each; the per-module sums are those the one-module
    collector gives (same batches, same float32 products, same accumulation).
    """
    acc_dtype = ACCUMULATE_DTYPES[accumulate]
    in_dev = model_device(model)
    sums: dict[str, torch.Tensor | None] = {m: None for m in modules}
    order = [n for n, _ in model.named_modules() if n in sums]
    n_tokens = seen = 0
    pad = pad_id_of(tok)
    for batch, consumed in _batches(tok, texts, max_len, batch_tokens):
        seen += consumed
        if batch:
            ids, mask = pad_right(batch, pad, in_dev)
            with nethook.stop_after(), contextlib.ExitStack() as stack:
                recs = {
                    name: stack.enter_context(
                        nethook.capture(model, name, stop=i == len(order) - 1)
                    )
                    for i, name in enumerate(order)
                }
                model(input_ids=ids, attention_mask=mask, use_cache=False)
            for name in modules:
                keys = recs[name].input
                assert keys is not None
                k = keys[mask.to(keys.device).bool()].float()
                part = (k.T @ k).to(acc_dtype)
                prev = sums[name]
                sums[name] = part if prev is None else prev.add_(part)
            n_tokens += int(mask.sum())
        if progress is not None:
            progress(min(seen, n_texts), n_texts)
    out = {}
    for name in modules:
        total = sums[name]
        assert total is not None, "the corpus produced no tokens"
        out[name] = MomentSum(total, n_tokens, seen)
    return out
