"""The editing engine on tiny GPT-2 and Llama models built from a config."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from rome import (
    BadRequestError,
    Editor,
    EditRequest,
    LayerOutOfRangeError,
    NothingToUndoError,
    SubjectNotFoundError,
    UnknownPresetError,
    UnsafeUpdateError,
    load_model,
    load_preset,
)
from rome import covariance as cov
from rome.keys import average_keys
from rome.nethook import count_hooks
from rome.update import bias_of, weight_out_in
from rome.vstar import compute_v_star

# The subject's last token is the prompt's last token: in a random tiny model
# attention carries little from earlier positions, so this is where an edit
# can show its effect on the next-token distribution.
REQ = EditRequest("The city of {}", "the Eiffel Tower", "Rome", "Paris")
TEMPLATES = ["{}", "Once upon a time. {}", "In the news today. {}"]


def snapshot(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def same_weights(model: torch.nn.Module, snap: dict[str, torch.Tensor]) -> bool:
    return all(torch.equal(v, snap[k]) for k, v in model.state_dict().items())


def editor(lm, **kw) -> Editor:
    """An editor on the session's private cache: covariance is collected once per model."""
    return Editor(lm.model, lm.tokenizer, lm.hparams, templates=TEMPLATES, **kw)


@pytest.mark.parametrize("mode", ["original", "rrome", "prompt"])
def test_edit_maps_kv_to_vstar_and_raises_p_new(tiny, mode):
    ed = editor(tiny)
    res = ed.compute(REQ, mode=mode)
    module = ed.module(res.layer)
    ed.apply(res)
    b = bias_of(module)
    with torch.no_grad():
        out = weight_out_in(module) @ res.k_v + (b if b is not None else 0)
    rel = float((out - res.v_star).norm() / res.v_star.norm())
    assert rel < 1e-4
    assert res.p_new_after > 5 * res.p_new_before
    assert res.update_norm == pytest.approx(float(res.u.norm() * res.v.norm()), rel=1e-5)
    assert res.update_norm_ratio == pytest.approx(res.update_norm / res.weight_norm)
    assert res.v_star_trace[0]["loss"] > res.v_star_trace[-1]["loss"]


def test_modes_use_their_keys(tiny_gpt2):
    results = editor(tiny_gpt2).compare(REQ)
    o, r, p = results["original"], results["rrome"], results["prompt"]
    assert torch.equal(o.k_v, p.k_v) and torch.equal(o.k_u, r.k_u) and torch.equal(r.k_u, r.k_v)
    assert not torch.equal(o.k_u, o.k_v)
    assert torch.equal(o.v_star, r.v_star)  # v* is shared by the modes
    assert o.cos_kstar_ks == pytest.approx(
        float(torch.nn.functional.cosine_similarity(o.k_u, o.k_v, dim=0)), abs=1e-6
    )


def test_compute_and_compare_leave_weights_bit_identical(tiny):
    snap = snapshot(tiny.model)
    ed = editor(tiny)
    ed.compare(REQ)
    assert same_weights(tiny.model, snap)
    assert count_hooks(tiny.model) == 0
    assert all(p.requires_grad for p in tiny.model.parameters())


def test_undo_restores_bit_identical_weights(tiny):
    snap = snapshot(tiny.model)
    ed = editor(tiny)
    first = ed.compute(REQ)
    ed.apply(first)
    after_first = snapshot(tiny.model)
    ed.apply(ed.compute(EditRequest("The home of {}", "the Louvre", "Berlin")))
    assert not same_weights(tiny.model, after_first)
    ed.undo()
    assert same_weights(tiny.model, after_first)
    ed.undo()
    assert same_weights(tiny.model, snap)
    with pytest.raises(NothingToUndoError):
        ed.undo()
    ed.apply(first)
    assert ed.revert_all() == 1
    assert same_weights(tiny.model, snap)
    assert count_hooks(tiny.model) == 0


def test_hooks_removed_when_work_fails_midway(tiny_gpt2):
    ed = editor(tiny_gpt2)

    def boom(phase: str, done: int, total: int) -> None:
        if phase == "v*" and done == 3:
            raise KeyboardInterrupt

    snap = snapshot(tiny_gpt2.model)
    with pytest.raises(KeyboardInterrupt):
        ed.compute(REQ, progress=boom)
    assert count_hooks(tiny_gpt2.model) == 0
    assert all(p.requires_grad for p in tiny_gpt2.model.parameters())
    assert same_weights(tiny_gpt2.model, snap)


def test_explicit_templates_and_covariance_are_deterministic(tiny_gpt2):
    lm = tiny_gpt2
    d = weight_out_in(Editor(lm.model, lm.tokenizer, lm.hparams, cache_dir=None).module(1)).shape[1]
    g = torch.Generator().manual_seed(1)
    a = torch.randn(d, 2 * d, generator=g)
    c = a @ a.T / (2 * d)
    runs = []
    for _ in range(2):
        ed = editor(lm)
        ed.set_covariance(lm.hparams.layer, c, "random test matrix")
        runs.append(ed.compute(REQ, mode="original"))
    assert torch.equal(runs[0].u, runs[1].u) and torch.equal(runs[0].v, runs[1].v)
    assert runs[0].covariance == "random test matrix"
    # u is along C⁻¹ k_u
    expect = torch.linalg.solve(c.double(), runs[0].k_u.double())
    cos = torch.nn.functional.cosine_similarity(expect.float(), runs[0].u, dim=0)
    assert float(cos) > 0.9999


def test_fast_vstar_matches_full_forward(tiny):
    hp = tiny.hparams
    fast = compute_v_star(tiny.model, tiny.tokenizer, hp, REQ, TEMPLATES, hp.layer, fast=True)
    slow = compute_v_star(tiny.model, tiny.tokenizer, hp, REQ, TEMPLATES, hp.layer, fast=False)
    assert fast.steps == slow.steps
    assert torch.allclose(fast.v_star, slow.v_star, rtol=1e-4, atol=1e-4)
    assert fast.trace[0]["loss"] == pytest.approx(slow.trace[0]["loss"], rel=1e-5)


def test_key_averaging():
    keys = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.0, 3.0]])
    assert torch.allclose(average_keys(keys, "uniform"), torch.tensor([1 / 3, 4 / 3]))
    assert torch.allclose(average_keys(keys, "grouped"), torch.tensor([0.5, 1.0]))


def test_grouped_averaging_is_recorded(tiny_gpt2):
    lm = tiny_gpt2
    ed = Editor(
        lm.model,
        lm.tokenizer,
        lm.hparams.replace(key_averaging="grouped"),
        cache_dir=None,
        templates=TEMPLATES,
    )
    res = ed.compute(REQ)
    assert res.key_averaging == "grouped"
    assert res.to_dict()["key_averaging"] == "grouped"


@pytest.mark.parametrize(
    "req, error",
    [
        (EditRequest("The city of", "the Eiffel Tower", "Rome"), BadRequestError),
        (EditRequest("{} and {}", "the Eiffel Tower", "Rome"), BadRequestError),
        (EditRequest("The city of {}", "the Eiffel Tower", ""), BadRequestError),
        (EditRequest("The city of {}", "the Eiffel Tower", "   "), BadRequestError),
        (EditRequest("The city of {}", "", "Rome"), BadRequestError),
        (EditRequest("The city of {}", "Paris", "Rome", "Rome"), BadRequestError),
    ],
)
def test_bad_requests_raise_and_change_nothing(tiny_gpt2, req, error):
    snap = snapshot(tiny_gpt2.model)
    with pytest.raises(error):
        editor(tiny_gpt2).compute(req)
    assert same_weights(tiny_gpt2.model, snap)


def test_subject_not_among_tokens(tiny_gpt2):
    from rome.tokens import encode_with_subject

    with pytest.raises(SubjectNotFoundError):
        encode_with_subject(tiny_gpt2.tokenizer, "The city of {}", "   ")


def test_unknown_preset_and_layer_out_of_range(tiny_gpt2):
    with pytest.raises(UnknownPresetError, match="smollm2-135m"):
        load_preset("no-such-model")
    with pytest.raises(UnknownPresetError):
        load_model("definitely/not-a-model-here")
    with pytest.raises(LayerOutOfRangeError):
        load_model("tiny-gpt2", layer=9)
    with pytest.raises(LayerOutOfRangeError):
        editor(tiny_gpt2).compute(REQ, layer=4)
    with pytest.raises(BadRequestError):
        editor(tiny_gpt2).compute(REQ, mode="fancy")


def test_unsafe_updates_are_refused(tiny_gpt2):
    lm = tiny_gpt2
    ed = Editor(
        lm.model,
        lm.tokenizer,
        lm.hparams.replace(max_update_ratio=1e-3),
        cache_dir=None,
        templates=TEMPLATES,
    )
    snap = snapshot(lm.model)
    res = ed.compute(REQ)
    assert res.unsafe_reason and "weight's norm" in res.unsafe_reason
    with pytest.raises(UnsafeUpdateError):
        ed.apply(res)
    nan_v = res.v.clone()
    nan_v[0] = float("nan")
    with pytest.raises(UnsafeUpdateError, match="NaN"):
        ed.apply_factors(res.layer, res.u, nan_v)
    assert same_weights(lm.model, snap)
    assert ed.applied == []


def test_presets_carry_reference_values():
    xl = load_preset("gpt2-xl")
    assert (xl.layer, xl.v_num_grad_steps, xl.v_lr, xl.clamp_norm_factor) == (17, 20, 0.5, 4.0)
    assert (xl.kl_factor, xl.v_weight_decay, xl.mom2_n_samples) == (0.0625, 0.5, 100000)
    assert xl.mlp_out_module == "transformer.h.{}.mlp.c_proj"
    gptj = load_preset("EleutherAI/gpt-j-6B")
    assert (gptj.layer, gptj.v_loss_layer, gptj.mlp_out_module) == (
        5,
        27,
        "transformer.h.{}.mlp.fc_out",
    )
    assert load_preset("gpt2-medium").clamp_norm_factor == 3.0
    assert load_preset("gpt2-large").layer == 12
    assert load_preset("smollm2-135m").mlp_out_module == "model.layers.{}.mlp.down_proj"


def test_user_preset_file(tmp_path):
    hp = load_preset("tiny-gpt2").replace(name="mine", layer=2)
    path = tmp_path / "mine.json"
    import json

    path.write_text(json.dumps(hp.to_dict()))
    assert load_preset(path).layer == 2
    path.write_text(json.dumps({**hp.to_dict(), "bogus": 1}))
    with pytest.raises(BadRequestError, match="bogus"):
        load_preset(path)


def test_stop_at_layer_collector_matches_full_forward(tiny):
    texts = ["The Eiffel Tower is in Paris.", "Toyota is a company from Japan and more."]
    name = tiny.hparams.weight_module()
    sa = cov.collect_moment_sum(tiny.model, tiny.tokenizer, name, texts, 2)
    sb = cov.collect_moment_sum(tiny.model, tiny.tokenizer, name, texts, 2, stop_at_layer=False)
    assert sa.n_tokens == sb.n_tokens > 10
    a, b = sa.mean(), sb.mean()
    assert torch.allclose(a, b, rtol=1e-5, atol=1e-6)
    assert torch.allclose(a, a.T)
    assert count_hooks(tiny.model) == 0


def test_cov_factor_solves_and_handles_singular():
    g = torch.Generator().manual_seed(0)
    a = torch.randn(8, 20, generator=g)
    c = a @ a.T / 20
    x = torch.randn(8, generator=g)
    f = cov.CovFactor(c)
    assert torch.allclose(
        f.solve(x).double(), torch.linalg.solve(c.double(), x.double()), atol=1e-4
    )
    singular = torch.zeros(4, 4)
    singular[0, 0] = 1.0
    assert cov.CovFactor(singular).ridge_used > 0
    assert torch.equal(cov.CovFactor(None).solve(x), x)


def test_stats_are_cached_and_reused(tiny_gpt2, tmp_path):
    lm = tiny_gpt2
    hp = lm.hparams.replace(mom2_n_samples=8, mom2_max_len=16)
    ed = Editor(lm.model, lm.tokenizer, hp, cache_dir=tmp_path, templates=TEMPLATES)
    st = ed.stats(hp.layer)
    path = ed.stats_file(hp.layer)
    assert path is not None and path.is_file()
    assert st.meta.corpus == "sampled" and st.meta.n_texts == 8 and st.meta.n_tokens > 0
    again = Editor(lm.model, lm.tokenizer, hp, cache_dir=tmp_path).stats(hp.layer)
    assert torch.equal(again.matrix, st.matrix)
    assert again.meta.n_tokens == st.meta.n_tokens


def test_import_rome_npz(tmp_path):
    mom2 = np.array([[4.0, 2.0], [2.0, 6.0]], dtype=np.float32)
    path = tmp_path / "model.layers.5.mlp.down_proj_float32_mom2_100000.npz"
    np.savez(path, **{"mom2.mom2": mom2, "mom2.count": np.array(2)})
    st = cov.import_rome_npz(path, "m", 5, "model.layers.5.mlp.down_proj")
    assert torch.allclose(st.matrix, torch.tensor([[2.0, 1.0], [1.0, 3.0]]))
    assert st.meta.n_tokens == 2
    bad = tmp_path / "bad.npz"
    np.savez(bad, other=mom2)
    with pytest.raises(BadRequestError):
        cov.import_rome_npz(bad, "m", 5, "x")


def test_fingerprint_tracks_edits(tiny_gpt2):
    ed = editor(tiny_gpt2)
    base = ed.fingerprint()
    res = ed.compute(REQ)
    ed.apply(res)
    edited = ed.fingerprint()
    assert edited != base
    ed.undo()
    assert ed.fingerprint() == base
    ed.apply_factors(res.layer, res.u, res.v)
    assert ed.fingerprint() == edited


def test_result_is_json_serialisable(tiny_gpt2):
    import json

    d = editor(tiny_gpt2).compute(REQ).to_dict()
    back = json.loads(json.dumps(d))
    for key in (
        "mode",
        "layer",
        "weight_name",
        "u",
        "v",
        "update_norm",
        "update_norm_ratio",
        "denominator",
        "k_star_norm",
        "k_s_norm",
        "cos_kstar_ks",
        "v_star_trace",
        "p_new_before",
        "p_new_after",
        "p_true_before",
        "p_true_after",
        "p_new_after_templated",
        "key_averaging",
        "timings",
    ):
        assert key in back


def test_templates_and_statistics_first_needed_after_an_edit_come_from_the_base_model():
    """A resume rebuilds the edits first: what it samples then must not see them."""
    from rome import load_model

    fresh = load_model("tiny-gpt2")
    base = Editor(fresh.model, fresh.tokenizer, fresh.hparams, cache_dir=None)
    want_t, want_c = base.templates(), base.stats(1).matrix
    lm = load_model("tiny-gpt2")
    ed = Editor(lm.model, lm.tokenizer, lm.hparams, keep_undo=False, cache_dir=None)
    d_out, d_in = weight_out_in(ed.module(1)).shape
    ed.apply_factors(1, torch.randn(d_in) * 3, torch.randn(d_out) * 3, force=True)
    w = ed.module(1).weight
    edited = w.detach().clone()
    assert not torch.equal(edited, fresh.model.transformer.h[1].mlp.c_proj.weight)
    assert ed.templates() == want_t
    assert torch.equal(ed.stats(1).matrix, want_c)
    assert torch.equal(ed.module(1).weight, edited)  # the edit is back in place
