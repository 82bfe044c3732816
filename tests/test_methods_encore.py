"""ENCORE: MEMIT with ν·I, the earlier steps' loop keys and the most-probable early stop;
with ν = 0, no earlier keys and no early stop it is MEMIT; one SmolLM2 edit (``ci``)."""

from __future__ import annotations

import pytest
import torch

import rome.methods  # noqa: F401  (registers the methods)
from rome import BadRequestError, Editor, EditRequest, load_model, load_preset
from rome.methods.encore import mpes_rule
from rome.methods.family import family_templates, locate
from rome.methods.family.loop import _keys
from rome.optimise import StepFacts

REQS = [
    EditRequest("{} is in", "The Eiffel Tower", "Rome", "Paris"),
    EditRequest("The capital of {} is", "Japan", "London", "Tokyo"),
    EditRequest("{}", "Toyota", "Brazil"),
    EditRequest("{} was written by", "Hamlet", "Charles Dickens"),
]
PLAIN = {"norm_lambda": 0.0, "add_prev_edits": True, "prob_cutoff": 0}


def editor(arch: str = "gpt2", **settings) -> Editor:
    lm = load_model(f"tiny-{arch}")
    hp = load_preset(f"tiny-{arch}-family").replace(method_settings={"encore": settings})
    return Editor(lm.model, lm.tokenizer, hp.validate(), cache_dir=None)


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_encore_without_its_additions_is_memit_bit_for_bit(arch):
    """ν = 0, no earlier keys (one step), no early stop: MEMIT's factors exactly."""
    enc = editor(arch, **PLAIN).edit(REQS[:2], "encore")
    mem = editor(arch).edit(REQS[:2], "memit")
    for x, y in zip(enc.layers, mem.layers, strict=True):
        assert torch.equal(x.U, y.U) and torch.equal(x.V, y.V)


def test_encore_carries_the_loop_keys_in_float64_and_uses_them():
    ed = editor(**PLAIN)
    templates = family_templates(ed)
    items = [
        locate(ed.tok, t.format(r.prompt), r.subject, "joined") for r in REQS[:2] for t in templates
    ]
    first = ed.edit(REQS[:2], "encore")
    # layer 0's loop keys were read before anything was written: the base model's keys
    base_keys = _keys(ed, items, first.layers[0].weight_name, len(templates))
    assert torch.equal(first.layers[0].keys, base_keys)
    ed.apply_step(first)
    # a layer's input does not depend on its own or later layers' weights: the loop keys
    # are those read after the step too (what MEMIT_seq keeps), bit for bit
    for lu in first.layers:
        assert torch.equal(_keys(ed, items, lu.weight_name, len(templates)), lu.keys)
    for lu in first.layers:
        k = lu.keys.double()
        state = ed.method_state["encore"][lu.layer]
        assert state.dtype == torch.float64 and torch.equal(state, k @ k.T)
    second = ed.edit(REQS[2:], "encore")
    assert all(x["previous_keys"] for x in second.options["per_layer"])
    # without the earlier keys the second step is MEMIT's on the same weights
    alone = ed.edit(REQS[2:], "encore", add_prev_edits=False)
    memit = ed.edit(REQS[2:], "memit")
    assert torch.equal(alone.layers[0].V @ alone.layers[0].U, memit.layers[0].V @ memit.layers[0].U)
    assert not torch.equal(second.layers[0].U, alone.layers[0].U)


def test_norm_lambda_shrinks_the_update():
    small = editor(**{**PLAIN, "norm_lambda": 10.0}).edit(REQS[:2], "encore")
    plain = editor(**PLAIN).edit(REQS[:2], "encore")
    assert small.norm < plain.norm


def test_the_published_mpes_counter():
    rule = mpes_rule(-2)
    step = lambda correct: rule(StepFacts([0, 1], correct, [0.1, 0.1]))  # noqa: E731
    assert step([5, 4]) == [False, False]  # request 0: first most-probable step
    assert step([6, 5]) == [False, False]  # exactly 5, as published: 6 does not count
    assert step([5, 5]) == [True, True]  # the 2nd for both (not consecutive for 0)
    assert mpes_rule(0.5)(StepFacts([0, 1], [0, 0], [0.4, 0.6])) == [False, True]


def test_mpes_stops_z_earlier_on_a_model_where_the_target_becomes_top():
    """tiny-llama reaches the target's argmax: the counter stops z after it."""
    ed = editor("llama", **{**PLAIN, "prob_cutoff": -1})
    plain = editor("llama", **PLAIN)
    a, b = ed.edit(REQS[2:3], "encore"), plain.edit(REQS[2:3], "encore")
    steps_a, steps_b = a.records[0]["z_steps"], b.records[0]["z_steps"]
    assert steps_a < steps_b
    # and the batched loop stops where the one-request reference loop stops
    ref = ed.edit(REQS[2:3], "encore", z_loop="reference")
    assert ref.records[0]["z_steps"] == steps_a


@pytest.mark.parametrize(
    ("settings", "why"),
    [
        ({"norm_lambda": -1}, r"encore: setting norm_lambda must be in \[0, inf\]"),
        ({"prob_cutoff": -2.5}, "negative whole number"),
        ({"prob_cutoff": 1.5}, "must be in"),
        ({"add_prev_edits": 1}, "true or false"),
    ],
)
def test_out_of_range_settings_are_refused_in_one_line(settings, why):
    hp = load_preset("tiny-gpt2-family")
    with pytest.raises(BadRequestError, match=why) as err:
        hp.replace(method_settings={"encore": settings}).validate()
    assert "\n" not in str(err.value)


@pytest.mark.slow
@pytest.mark.ci
def test_one_encore_edit_holds_on_smollm2():
    lm = load_model("smollm2-135m")
    ed = Editor(lm.model, lm.tokenizer, load_preset("smollm2-135m-encore"))
    req = EditRequest("{} is located in the city of", "The Eiffel Tower", "Rome", "Paris")
    upd = ed.edit([req], "encore")
    rec = upd.records[0]
    assert upd.unsafe_reason is None and upd.method == "encore"
    assert rec["p_new_before"] < 0.01 < 0.5 < rec["p_new_after"]
