"""The method seam: settings declared as data, old flat presets mapped, state restored by undo."""

from __future__ import annotations

import pytest
import torch

from rome import BadRequestError, Editor, EditRequest, load_model, load_preset
from rome.hparams import EditHparams
from rome.methods import METHODS, get_method, options_of
from rome.methods.registry import BUILTIN

REQS = [
    EditRequest("{} is located in the city of", "The Eiffel Tower", "Rome"),
    EditRequest("The capital of {} is", "Japan", "London"),
]


def test_every_method_declares_settings_capabilities_and_a_summary():
    for m in METHODS.values():
        opts = options_of(m.Settings)
        assert all(o.help for o in opts), m.name
        assert m.summary and isinstance(m.capabilities.batched, bool)
        assert m.settings(load_preset("tiny-gpt2")) is not None
    assert [m.name for m in BUILTIN][:4] == ["rome", "memit", "emmet", "alphaedit"]


def test_old_flat_preset_fields_map_onto_the_methods_that_name_them():
    hp = load_preset("tiny-gpt2-family")  # a preset file with the old flat fields
    assert get_method("memit").settings(hp).mom2_update_weight == 1.0
    assert get_method("emmet").settings(hp).emmet_lambda == 0.1
    assert get_method("alphaedit").settings(hp).nullspace_threshold == 0.1
    assert get_method("alphaedit").settings(hp).alphaedit_l2 == 1.0
    # a stored run's flat dict reads back the same
    flat = {**load_preset("tiny-gpt2").to_dict(), "memit_accumulate": True}
    del flat["shared_settings"]
    again = EditHparams.from_dict(flat)
    assert get_method("memit").settings(again).accumulate is True
    # runs made while UltraEdit's settings were flat fields store them (zsre-smollm2.db)
    flat.update(
        ultraedit_lr=2e-6, ultraedit_modules=["mlp.gate_proj"], ultraedit_normaliser="exact"
    )
    ultra = get_method("ultraedit").settings(EditHparams.from_dict(flat))
    assert ultra.lr == 2e-6 and ultra.normaliser == "exact"
    # a method's own entry wins over the old shared field
    own = hp.replace(method_settings={**hp.method_settings, "memit": {"mom2_update_weight": 7}})
    assert get_method("memit").settings(own).mom2_update_weight == 7.0
    # a variant's own settings merge with those it extends
    seq = load_preset("smollm2-135m-memit-seq")
    assert get_method("memit").settings(seq).accumulate is True
    base = load_preset("smollm2-135m-memit")
    w = get_method("memit").settings(base).mom2_update_weight
    assert get_method("memit").settings(seq).mom2_update_weight == w


@pytest.mark.parametrize(
    ("method", "key", "value", "why"),
    [
        ("memit", "mom2_update_weight", 0, r"must be in \(0, inf\]"),
        ("memit", "accumulate", "yes", "must be true or false"),
        ("alphaedit", "alphaedit_l2", -1.0, r"must be in \[0, inf\]"),
        ("rome", "mode", "sideways", "must be one of original, rrome, prompt"),
        ("emmet", "l2", 1.0, r"emmet: unknown setting\(s\) l2"),
    ],
)
def test_a_bad_setting_is_one_error_naming_it(method, key, value, why):
    with pytest.raises(BadRequestError, match=why):
        get_method(method).settings(load_preset("tiny-gpt2"), {key: value})


def test_an_option_parses_its_cli_text():
    (acc,) = [o for o in options_of(get_method("memit").Settings) if o.name == "accumulate"]
    assert acc.parse("true", "memit") is True
    (lam,) = [o for o in options_of(get_method("memit").Settings) if o.name == "mom2_update_weight"]
    assert lam.parse("2.5", "memit") == 2.5
    with pytest.raises(BadRequestError, match="must be a number"):
        lam.parse("lots", "memit")


@pytest.fixture(scope="module")
def family():
    lm = load_model("tiny-gpt2")
    return lm, load_preset("tiny-gpt2-family")


def test_undo_and_revert_put_the_carried_state_back(family):
    lm, hp = family
    ed = Editor(lm.model, lm.tokenizer, hp, cache_dir=None)
    ed.apply_step(ed.edit([REQS[0]], "alphaedit"), force=True)
    first = {k: v.clone() for k, v in ed.method_state["alphaedit"].items()}
    ed.apply_step(ed.edit([REQS[1]], "alphaedit"), force=True)
    assert not torch.equal(ed.method_state["alphaedit"][0], first[0])
    ed.undo()
    assert all(torch.equal(ed.method_state["alphaedit"][k], first[k]) for k in first)
    ed.undo()
    assert "alphaedit" not in ed.method_state
    ed.apply_step(ed.edit([REQS[0]], "alphaedit"), force=True)
    ed.revert_all()
    assert ed.method_state == {}


def test_a_variant_editor_shares_the_edits_and_the_state(family):
    lm, hp = family
    ed = Editor(lm.model, lm.tokenizer, load_preset("tiny-gpt2"), cache_dir=None)
    med = ed.variant(hp)
    med.apply_step(med.edit([REQS[0]], "alphaedit"), force=True)
    assert len(ed.applied) == 1 and sorted(ed.method_state["alphaedit"]) == [0, 1]
    ed.undo()
    assert med.method_state == {} and med.applied == []


def test_edit_refuses_a_request_over_the_token_limit(family):
    lm, hp = family
    ed = Editor(lm.model, lm.tokenizer, hp, cache_dir=None)
    long = EditRequest("{} is in", "word " * 300, "Rome")
    for method in ("memit", "rome"):
        with pytest.raises(BadRequestError, match="the limit is 256 tokens"):
            ed.edit([long], method)


def test_a_methods_preset_is_the_variant_made_for_it():
    from rome.hparams import method_preset

    # ``smollm2-135m-memit`` + ``-nas`` names memit-nas's preset: nas gets its own
    for base in ("smollm2-135m", "smollm2-135m-memit", "smollm2-135m-alphaedit"):
        hp = load_preset(base)
        for name in ("memit", "emmet", "alphaedit", "nas", "memit-nas", "prune", "ultraedit"):
            assert method_preset(hp, name).method == name, (base, name)
    # a variant found up the chain of presets a preset extends
    assert method_preset(load_preset("smollm2-135m-alphaedit"), "memit").name == (
        "smollm2-135m-memit"
    )
