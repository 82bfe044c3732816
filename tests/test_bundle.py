"""Templates and statistics shipped with the package (rome/bundled), and the one-pass collector."""

from __future__ import annotations

import json

import pytest
import torch

from rome import bundle, load_model
from rome import covariance as cov
from rome.editor import Editor
from rome.paths import slug

TEXTS = [f"The Eiffel Tower is in Paris, record {i}. " * (i % 3 + 1) for i in range(30)]


def test_upper_triangle_round_trip():
    g = torch.Generator().manual_seed(0)
    a = torch.randn(7, 5, generator=g)
    m = a @ a.T
    m = (m + m.T) / 2  # exactly symmetric: the round trip is then exact
    packed = bundle.triu_pack(m)
    assert packed.numel() == 7 * 8 // 2
    assert torch.equal(bundle.triu_unpack(packed, 7), m)


def test_one_pass_equals_one_module_at_a_time(tiny):
    hp = tiny.hparams
    mods = [hp.weight_module(layer) for layer in (1, 2, 3)]
    sums = bundle.collect_moment_sums(tiny.model, tiny.tokenizer, mods, TEXTS, 30, 24, 300)
    for m in mods:
        one = cov.collect_moment_sum(tiny.model, tiny.tokenizer, m, TEXTS, 30, 24, 300)
        assert torch.equal(one.total, sums[m].total)
        assert (one.n_tokens, one.n_texts) == (sums[m].n_tokens, sums[m].n_texts)


def _ship(folder, lm, layer: int) -> tuple[cov.SecondMoment, list[str]]:
    """A bundle for a tiny model, as scripts/bundle_data.py writes one."""
    hp = lm.hparams
    key = slug(hp.model)
    (folder / key).mkdir(parents=True)
    module = hp.weight_module(layer)
    ms = cov.collect_moment_sum(lm.model, lm.tokenizer, module, TEXTS, 30, 24)
    meta = cov.stats_meta(key, layer, module, "sampled", ms, 24, "float32", 0, 0.0)
    st = cov.SecondMoment(ms.mean(), meta)
    settings = bundle.stats_settings(
        hp.mom2_dataset, hp.mom2_n_samples, hp.mom2_max_len, hp.mom2_dtype, hp.template_seed
    )
    entry = bundle.write_bundled_stats(folder / key, st, settings)
    templates = ["{}", "Shipped prefix. {}", "Another one. {}"]
    (folder / key / "templates_rome.json").write_text(json.dumps(templates))
    index = {
        "templates": {
            "rome": {
                "file": "templates_rome.json",
                "settings": bundle.rome_template_settings(
                    hp.context_template_length_params, hp.template_seed
                ),
            }
        },
        "stats": {module: entry},
    }
    (folder / key / "index.json").write_text(json.dumps(index))
    return st, templates


def test_editor_uses_shipped_data_when_the_cache_has_none(tiny_gpt2, tmp_path, monkeypatch):
    lm = tiny_gpt2
    layer = lm.hparams.layer
    shipped, templates = _ship(tmp_path / "bundled", lm, layer)
    monkeypatch.setattr(bundle, "bundle_dir", lambda key: tmp_path / "bundled" / key)
    ed = Editor(lm.model, lm.tokenizer, lm.hparams, cache_dir=tmp_path / "cache")
    assert ed.templates() == templates
    phases = []
    got = ed.stats(layer, progress=lambda p, d, t: phases.append(p))
    assert torch.equal(got.matrix, shipped.matrix)
    assert got.meta.source.startswith("bundled:")
    assert phases == ["statistics (shipped with the package)"]
    # another layer, or an explicit corpus, is computed afresh
    other = ed.stats(layer - 1)
    assert not other.meta.source.startswith("bundled")
    assert ed.stats(layer, corpus="sampled").meta.source == "collected"


def test_shipped_stats_with_other_settings_are_not_used(tiny_gpt2, tmp_path, monkeypatch):
    lm = tiny_gpt2
    _ship(tmp_path / "bundled", lm, lm.hparams.layer)
    monkeypatch.setattr(bundle, "bundle_dir", lambda key: tmp_path / "bundled" / key)
    hp = lm.hparams.replace(mom2_n_samples=lm.hparams.mom2_n_samples + 1, template_seed=1)
    ed = Editor(lm.model, lm.tokenizer, hp, cache_dir=tmp_path / "cache")
    assert ed.stats(hp.layer).meta.source == "collected"
    assert "Shipped prefix. {}" not in ed.templates()


def test_the_package_ships_smollm2_data():
    index = json.loads((bundle.bundle_dir("embedded_smollm2-135m") / "index.json").read_text())
    assert set(index["templates"]) == {"rome", "family"}
    assert len(bundle.bundled_templates("embedded_smollm2-135m", "rome") or []) == 21
    family = bundle.bundled_templates("embedded_smollm2-135m", "family") or []
    assert len(family) == 6 and family[0] == "{}"
    assert sorted(index["stats"]) == [f"model.layers.{i}.mlp.down_proj" for i in range(3, 8)]


@pytest.mark.slow
def test_shipped_smollm2_stats_fit_the_loaded_model():
    lm = load_model("smollm2-135m")
    hp = lm.hparams
    index = json.loads((bundle.bundle_dir(slug(hp.model)) / "index.json").read_text())
    names = [
        n
        for n, _ in lm.model.named_parameters()
        if n.startswith("model.embed_tokens")
        or any(n.startswith(f"model.layers.{i}.") for i in range(8))
    ]
    assert bundle.weights_fingerprint(lm.model, names) == index["made_with"]["weights_fingerprint"]
    ed = Editor(lm.model, lm.tokenizer, hp, cache_dir=None)
    st = ed.caches._bundled_stats(hp.layer, 1536)
    assert st is not None and st.meta.n_texts == hp.mom2_n_samples
    assert st.matrix.shape == (1536, 1536)
