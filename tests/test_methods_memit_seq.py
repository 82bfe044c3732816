"""MEMIT_seq as a named method: the same computation as ``memit`` with ``accumulate``,
under its own name and state; one SmolLM2 edit (``ci``)."""

from __future__ import annotations

import pytest
import torch

import rome.methods  # noqa: F401  (registers the methods)
from rome import Editor, EditRequest, load_model, load_preset

REQS = [
    EditRequest("{} is in", "The Eiffel Tower", "Rome", "Paris"),
    EditRequest("The capital of {} is", "Japan", "London", "Tokyo"),
    EditRequest("{}", "Toyota", "Brazil"),
    EditRequest("{} was written by", "Hamlet", "Charles Dickens"),
]


def editor(arch: str = "gpt2") -> Editor:
    lm = load_model(f"tiny-{arch}")
    return Editor(lm.model, lm.tokenizer, load_preset(f"tiny-{arch}-family"), cache_dir=None)


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_memit_seq_equals_memit_with_accumulate_over_two_steps(arch):
    """Both on their own editor of the same model, bit for bit: factors, keys, weights."""
    a, b = editor(arch), editor(arch)
    for step in (REQS[:2], REQS[2:]):
        seq = a.edit(step, "memit-seq")
        acc = b.edit(step, "memit", accumulate=True)
        for x, y in zip(seq.layers, acc.layers, strict=True):
            assert torch.equal(x.U, y.U) and torch.equal(x.V, y.V)
            assert x.keys is not None and torch.equal(x.keys, y.keys)
        a.apply_step(seq)
        b.apply_step(acc)
    assert all(x["accumulated"] for x in seq.options["per_layer"])  # the second step used it
    for layer in a.hp.edited_layers():
        assert torch.equal(a.module(layer).weight, b.module(layer).weight)
        assert torch.equal(a.method_state["memit-seq"][layer], b.method_state["memit"][layer])


def test_memit_seq_state_is_its_own_and_undo_leaves_weights_bit_exact():
    ed = editor()
    layers = ed.hp.edited_layers()
    base = ed.fingerprint(layers)
    first = ed.edit(REQS[:2], "memit-seq")
    assert not any(x["accumulated"] for x in first.options["per_layer"])
    ed.apply_step(first)
    assert set(ed.method_state["memit-seq"]) == set(layers) and "memit" not in ed.method_state
    k = first.layers[0].keys
    assert k is not None and torch.equal(ed.method_state["memit-seq"][layers[0]], k @ k.T)
    ed.undo()
    assert ed.fingerprint(layers) == base


def test_the_memit_seq_preset_still_runs_memit_accumulating():
    """The preset a running replay resumes from: method memit, keys accumulated."""
    hp = load_preset("smollm2-135m-memit-seq")
    assert hp.method == "memit" and rome.methods.get_method("memit").settings(hp).accumulate


@pytest.mark.slow
@pytest.mark.ci
def test_one_memit_seq_edit_holds_on_smollm2():
    lm = load_model("smollm2-135m")
    ed = Editor(lm.model, lm.tokenizer, load_preset("smollm2-135m-memit-seq"))
    req = EditRequest("{} is located in the city of", "The Eiffel Tower", "Rome", "Paris")
    upd = ed.edit([req], "memit-seq")
    rec = upd.records[0]
    assert upd.unsafe_reason is None and upd.method == "memit-seq"
    assert rec["p_new_before"] < 0.01 < 0.5 < rec["p_new_after"]
