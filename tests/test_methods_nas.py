"""NAS on the batch methods: with the anchor equal to a vector's own norm it is the method
without it; a v* far above the anchor drops its δ; the anchor is measured on the unedited
weights; one SmolLM2 edit (``ci``)."""

from __future__ import annotations

import pytest

import rome.methods  # noqa: F401  (registers the methods)
from rome import BadRequestError, Editor, EditRequest, load_model, load_preset
from rome.methods.family import locate, reprs_at
from rome.methods.nas import anchor_of, use_anchor

REQ = EditRequest("{} is in", "The Eiffel Tower", "Rome", "Paris")
SMALL = {"anchor_samples": 4, "anchor_batch": 2}  # a short calibration on tiny models


def editor(arch: str = "gpt2", method: str = "nas") -> Editor:
    lm = load_model(f"tiny-{arch}")
    hp = load_preset(f"tiny-{arch}-family").replace(method_settings={method: SMALL})
    return Editor(lm.model, lm.tokenizer, hp.validate(), cache_dir=None)


def own_norm(ed: Editor, base: str) -> float:
    """‖v₀ + δ‖ of REQ's z under ``base`` on ``ed``'s current weights."""
    upd = ed.edit([REQ], base)
    z, init = upd.results[0]["z"], upd.results[0]["target_init"]
    layer = ed.hp.edited_layers()[-1]
    loc = locate(ed.tok, REQ.prompt, REQ.subject, ed.hp.subject_index)
    v0 = reprs_at(ed.model, ed.tok, [loc], ed.hp.weight_module(layer), "out")[0]
    return float((z - init + v0).norm())


@pytest.mark.parametrize(("method", "base"), [("nas", "alphaedit"), ("memit-nas", "memit")])
@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_anchor_at_the_vectors_own_norm_is_the_method_without_it(arch, method, base):
    ed = editor(arch, method)
    want = ed.edit([REQ], base)
    use_anchor(ed, ed.hp.edited_layers()[-1], own_norm(ed, base))
    got = ed.edit([REQ], method)
    assert not got.records[0]["nas_skipped"]
    # z = (h − v₀) + (v₀ + δ)·ρ/(‖v₀ + δ‖ + 1e-10) against h + δ: two float32 roundings of
    # vectors of norm ~‖h‖ (≤ 1e-6 relative each), then a solve that is linear in z
    zr = (got.results[0]["z"] - want.results[0]["z"]).norm() / want.results[0]["z"].norm()
    assert zr < 1e-5
    for x, y in zip(got.layers, want.layers, strict=True):
        d = (x.delta().double() - y.delta().double()).norm() / y.delta().double().norm()
        assert d < 1e-4  # the solve's conditioning times the z difference above


def test_a_v_star_far_above_the_anchor_drops_its_delta():
    ed = editor()
    layer = ed.hp.edited_layers()[-1]
    rho = own_norm(ed, "alphaedit") / 3  # ‖v*‖ = 3ρ > 2ρ
    use_anchor(ed, layer, rho)
    upd = ed.edit([REQ], "nas")
    rec, res = upd.records[0], upd.results[0]
    assert rec["nas_skipped"] and rec["nas_v_star_norm"] > 2 * rho
    # z = (h − v₀) + v₀: the block output as it is (to the two roundings)
    assert (res["z"] - res["target_init"]).norm() < 1e-5 * res["target_init"].norm()


def test_the_anchor_rescales_to_rho():
    ed = editor()
    layer = ed.hp.edited_layers()[-1]
    base_norm = own_norm(ed, "alphaedit")
    use_anchor(ed, layer, 0.75 * base_norm)
    upd = ed.edit([REQ], "nas")
    z, init = upd.results[0]["z"], upd.results[0]["target_init"]
    loc = locate(ed.tok, REQ.prompt, REQ.subject, ed.hp.subject_index)
    v0 = reprs_at(ed.model, ed.tok, [loc], ed.hp.weight_module(layer), "out")[0]
    assert abs(float((z - init + v0).norm()) / (0.75 * base_norm) - 1) < 1e-5
    assert upd.options["anchor_norm"] == 0.75 * base_norm


def test_the_anchor_is_measured_on_the_unedited_weights():
    a, b = editor(), editor()
    layer = a.hp.edited_layers()[-1]
    settings = rome.methods.get_method("nas").settings(a.hp)
    a.apply_step(a.edit([REQ], "alphaedit"))  # a's weights are edited before it measures
    assert anchor_of(a, layer, settings) == anchor_of(b, layer, settings)


@pytest.mark.parametrize(
    ("settings", "why"),
    [
        ({"skip_multiple": 0}, r"nas: setting skip_multiple must be in \(0, inf\]"),
        ({"anchor_samples": 21}, r"must be in \[1, 20\]"),
        ({"anchor_batch": 1.5}, "whole number"),
    ],
)
def test_out_of_range_settings_are_refused_in_one_line(settings, why):
    hp = load_preset("tiny-gpt2-family")
    with pytest.raises(BadRequestError, match=why) as err:
        hp.replace(method_settings={"nas": settings}).validate()
    assert "\n" not in str(err.value)


@pytest.mark.slow
@pytest.mark.ci
def test_one_nas_edit_holds_on_smollm2():
    lm = load_model("smollm2-135m")
    ed = Editor(lm.model, lm.tokenizer, load_preset("smollm2-135m-nas"))
    req = EditRequest("{} is located in the city of", "The Eiffel Tower", "Rome", "Paris")
    # a 4-request calibration keeps the test short (the preset's 20 take ~5x as long)
    upd = ed.edit([req], "nas", anchor_samples=4, anchor_batch=4)
    rec = upd.records[0]
    assert upd.unsafe_reason is None and not rec["nas_skipped"]
    assert rec["p_new_before"] < 0.01 < 0.5 < rec["p_new_after"]
