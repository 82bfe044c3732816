"""The Qwen2.5-7B-Instruct presets (SasyaTitech/NAS hparams/*/Qwen2p5-7B.json, UltraEdit's
config/model/qwen2.5-7b.yaml) checked on a tiny Qwen2 built from a config: their module
names resolve on the architecture, each method edits with the preset's settings (its
layers moved into the 4-layer model, its statistics from sampled text), the edit raises
the new target and undoes bit for bit."""

from __future__ import annotations

import pytest
import torch

from rome import Editor, EditRequest, load_model, load_preset
from rome.arch import templates_for

REQ = EditRequest("{} is located in the city of", "The Eiffel Tower", "Rome", "Paris")
TINY = load_preset("tiny-qwen2")
QWEN = ("qwen2p5-7b", "qwen2p5-7b-memit", "qwen2p5-7b-alphaedit", "qwen2p5-7b-nas")
QWEN += ("qwen2p5-7b-ultraedit",)


def test_the_architecture_templates_are_the_presets():
    t = templates_for("qwen2")
    for name in QWEN:
        hp = load_preset(name)
        assert (hp.layers_module, hp.mlp_out_module, hp.final_norm_module) == (
            t.layers,
            t.mlp_out,
            t.final_norm,
        )
        assert hp.model == "Qwen/Qwen2.5-7B-Instruct"


def on_tiny(name: str, layers: list[int]):
    """The preset with what depends on the 7B model's size replaced for the tiny one."""
    hp = load_preset(name)
    small = dict(
        model=TINY.model,
        name=f"{name}-on-tiny-qwen2",
        layer=layers[-1],
        v_loss_layer=3,
        mom2_dataset=TINY.mom2_dataset,
        mom2_n_samples=TINY.mom2_n_samples,
        mom2_max_len=TINY.mom2_max_len,
        max_update_ratio=TINY.max_update_ratio,
        context_template_length_params=TINY.context_template_length_params,
    )
    if hp.layers is not None:
        small["layers"] = layers
    if hp.method in ("alphaedit", "nas"):
        small["nullspace_threshold"] = 1.0  # the tiny C₀'s eigenvalues: 0.4-50, not 7B's
    return hp.replace(**small)


@pytest.mark.parametrize(
    "name, layers",
    [
        ("qwen2p5-7b", [1]),
        ("qwen2p5-7b-memit", [0, 1]),
        ("qwen2p5-7b-alphaedit", [0, 1]),
        ("qwen2p5-7b-nas", [0, 1]),
        ("qwen2p5-7b-ultraedit", [1, 2]),
    ],
)
def test_each_qwen2p5_preset_edits_a_tiny_qwen2(name, layers):
    lm = load_model("tiny-qwen2")
    assert lm.model.config.model_type == "qwen2"
    assert lm.model.model.layers[0].self_attn.q_proj.bias is not None  # Qwen2's q/k/v bias
    hp = on_tiny(name, layers)
    if hp.method == "ultraedit":  # the published 1e-6 is for 3,584-wide 7B keys
        hp = hp.replace(method_settings={"ultraedit": {"lr": 0.05, "modules": "gate_up"}})
    ed = Editor(lm.model, lm.tokenizer, hp)
    before = {n: p.detach().clone() for n, p in lm.model.named_parameters()}
    upd = ed.edit([REQ], method=hp.method)
    assert [lu.layer for lu in upd.layers] == (layers if hp.method != "rome" else [hp.layer])
    ed.apply_step(upd)
    rec = upd.records[0]
    p_before = rec.get("p_new_before", rec.get("probe_before", {}).get("p_new"))
    p_after = rec.get("p_new_after", rec.get("probe_after", {}).get("p_new"))
    assert p_after is not None and p_before is not None and p_after > p_before
    ed.undo()
    assert all(torch.equal(before[n], p) for n, p in lm.model.named_parameters())
