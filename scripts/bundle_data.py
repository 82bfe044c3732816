"""Make the package data of rome/bundled/ for the embedded model (see its README).

    OMP_NUM_THREADS=1 python scripts/bundle_data.py [--family-templates FILE]

Samples ROME's context templates and the covariance corpus exactly as an editor
with the smollm2-135m preset would (same functions, seeds and settings), collects
the second moment of model.layers.{3..7}.mlp.down_proj in one pass over the corpus,
and writes them with their fingerprints and an index. ``--family-templates`` takes
the family's six templates as a JSON list (made by the family's own sampler).
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import torch
import transformers

from rome import covariance as cov
from rome import load_model
from rome.bundle import (
    collect_moment_sums,
    rome_template_settings,
    stats_settings,
    weights_fingerprint,
    write_bundled_stats,
)
from rome.paths import slug
from rome.templates import sample_templates

LAYERS = (3, 4, 5, 6, 7)


def parse_args() -> argparse.Namespace:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--out", default=str(Path(__file__).parents[1] / "rome" / "bundled"))
    ap.add_argument("--family-templates", help="JSON list of the family's six templates")
    ap.add_argument("--family-settings", help="JSON object: the settings they were made with")
    return ap.parse_args()


def write_templates(lm, folder: Path, index: dict, args: argparse.Namespace) -> None:
    """ROME's sampled templates (and the family's, if given) into ``folder`` and ``index``."""
    hp = lm.hparams
    templates = index.setdefault("templates", {})
    t0 = time.perf_counter()
    rome_t = sample_templates(
        lm.model, lm.tokenizer, hp.context_template_length_params, hp.template_seed
    )
    (folder / "templates_rome.json").write_text(json.dumps(rome_t, indent=1))
    templates["rome"] = {
        "file": "templates_rome.json",
        "settings": rome_template_settings(hp.context_template_length_params, hp.template_seed),
        "seconds": round(time.perf_counter() - t0, 1),
    }
    if args.family_templates:
        fam = json.loads(Path(args.family_templates).read_text())
        (folder / "templates_family.json").write_text(json.dumps(fam, indent=1))
        templates["family"] = {
            "file": "templates_family.json",
            "settings": json.loads(args.family_settings),
        }


def write_stats(lm, folder: Path, key: str, index: dict) -> float:
    """The second moment of every layer of :data:`LAYERS`, from one pass over the corpus,
    into ``folder`` and ``index``; returns the seconds of that pass."""
    hp = lm.hparams
    modules = [hp.weight_module(layer) for layer in LAYERS]
    t0 = time.perf_counter()
    texts = cov.corpus_texts(
        hp.mom2_dataset,
        lm.model,
        lm.tokenizer,
        hp.mom2_n_samples,
        hp.mom2_max_len,
        hp.template_seed,
    )
    sums = collect_moment_sums(
        lm.model,
        lm.tokenizer,
        modules,
        texts,
        hp.mom2_n_samples,
        hp.mom2_max_len,
        progress=lambda d, t: print(f"statistics {d}/{t} texts", flush=True),
    )
    seconds = time.perf_counter() - t0
    settings = stats_settings(
        hp.mom2_dataset, hp.mom2_n_samples, hp.mom2_max_len, hp.mom2_dtype, hp.template_seed
    )
    stats_index = index.setdefault("stats", {})
    for layer, name in zip(LAYERS, modules, strict=True):
        meta = cov.stats_meta(
            key,
            layer,
            name,
            hp.mom2_dataset,
            sums[name],
            hp.mom2_max_len,
            hp.mom2_dtype,
            hp.template_seed,
            seconds,
        )
        meta.extra["made_by"] = "scripts/bundle_data.py (one pass over layers 3-7)"
        st = cov.SecondMoment(sums[name].mean(), meta)
        stats_index[name] = write_bundled_stats(folder, st, settings)
    return seconds


def made_with(lm, seconds: float) -> dict:
    """The versions, threads, seconds and the fingerprint of the weights the stats depend on."""
    depends = [
        n
        for n, _ in lm.model.named_parameters()
        if n.startswith("model.embed_tokens")
        or any(n.startswith(f"model.layers.{i}.") for i in range(max(LAYERS) + 1))
    ]
    return {
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "python": platform.python_version(),
        "threads": torch.get_num_threads(),
        "statistics_seconds": round(seconds, 1),
        "weights_fingerprint": weights_fingerprint(lm.model, depends),
        "weights_fingerprint_of": "model.embed_tokens and model.layers.0-7 (what the keys of "
        "layers 3-7 depend on), rome.bundle.weights_fingerprint",
    }


def main() -> None:
    args = parse_args()
    lm = load_model(args.model)
    hp = lm.hparams
    key = slug(hp.model)
    folder = Path(args.out) / key
    folder.mkdir(parents=True, exist_ok=True)
    index_path = folder / "index.json"
    index = json.loads(index_path.read_text()) if index_path.is_file() else {}
    index.update(model_key=key, model=hp.model, preset=hp.name)
    write_templates(lm, folder, index, args)
    index_path.write_text(json.dumps(index, indent=1))
    seconds = write_stats(lm, folder, key, index)
    index["made_with"] = made_with(lm, seconds)
    index_path.write_text(json.dumps(index, indent=1))
    print("wrote", folder)


if __name__ == "__main__":
    main()
