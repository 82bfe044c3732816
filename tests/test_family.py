"""MEMIT, EMMET and AlphaEdit: the identities of FAMILY.md on tiny models, apply/undo, one
real edit on SmolLM2 per method (``ci``)."""

from __future__ import annotations

import pytest
import torch

import rome.methods  # noqa: F401  (registers the family)
from rome import BadRequestError, Editor, EditRequest, load_model, load_preset
from rome.methods import get_method
from rome.methods.alphaedit import alphaedit_solve, null_space_projector
from rome.methods.emmet import emmet_solve
from rome.methods.family import (
    compute_zs,
    family_templates,
    group_average,
    locate,
    moment,
    optimise_zs,
    reprs_at,
    subject_last_index,
    use_templates,
)
from rome.methods.family.loop import _keys, _probe
from rome.methods.memit import memit_solve

REQS = [
    EditRequest("{}", "Toyota", "Brazil"),
    EditRequest("{} is in", "The Eiffel Tower", "Rome", "Paris"),
    EditRequest("The capital of {} is", "Japan", "London", "Tokyo"),
]


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm())


@pytest.fixture(scope="module")
def gpt2_family():
    lm = load_model("tiny-gpt2")
    ed = Editor(lm.model, lm.tokenizer, load_preset("tiny-gpt2-family"), cache_dir=None)
    return lm, ed


@pytest.fixture(scope="module")
def keys_c0(gpt2_family):
    """Real keys (in, 3) of layer 1 on the base model, its C₀ (float64), residuals (out, 3)."""
    lm, ed = gpt2_family
    templates = family_templates(ed)
    items = [
        locate(ed.tok, t.format(r.prompt), r.subject, "joined") for r in REQS for t in templates
    ]
    k = _keys(ed, items, ed.hp.weight_module(1), len(templates)).double()
    gen = torch.Generator().manual_seed(0)
    r = torch.randn(ed.module(1).weight.shape[1], len(REQS), generator=gen, dtype=torch.float64)
    return k, moment(ed, 1).double(), r


# ------------------------------------------------------------ shared machinery
def test_templates_seeded_six_with_start_words(gpt2_family):
    lm, ed = gpt2_family
    ts = family_templates(ed)
    again = family_templates(Editor(lm.model, lm.tokenizer, ed.hp, cache_dir=None))
    assert ts == again and len(ts) == 6 and ts[0] == "{}"
    for t, word in zip(ts[1:], ["The", "Therefore", "Because", "I", "You"], strict=True):
        assert t.startswith(word) and t.endswith(". {}") and t.count("{}") == 1


def test_use_templates_refuses_a_second_set(gpt2_family):
    lm, _ = gpt2_family
    ed = Editor(lm.model, lm.tokenizer, load_preset("tiny-gpt2-family"), cache_dir=None)
    use_templates(ed, ["{}", "A b. {}"])
    assert family_templates(ed) == ["{}", "A b. {}"]
    with pytest.raises(BadRequestError):
        use_templates(ed, ["{}", "C d. {}"])


def test_subject_index_rules_agree_without_bos(gpt2_family):
    lm, _ = gpt2_family
    tok = lm.tokenizer
    for template in ["{} is in", "The capital of {} is", "Hello there. {} was written by"]:
        joined = subject_last_index(tok, template, "The Eiffel Tower", "joined")
        separate = subject_last_index(tok, template, "The Eiffel Tower", "separate")
        ids = tok(template.format("The Eiffel Tower"))["input_ids"]
        assert joined == separate
        assert tok.decode(ids[: joined + 1]).endswith("Tower")


def test_group_average_is_half_bare_half_prefixed():
    keys = torch.arange(12.0).reshape(6, 2)  # one request, 6 templates
    want = 0.5 * keys[0] + 0.5 * keys[1:].mean(0)
    assert torch.equal(group_average(keys, 6)[0], want)


def test_delta_reaches_block_output_as_z(gpt2_family):
    """After a one-layer MEMIT edit with λ → 0 and only the bare template, the block output at
    the subject equals z (the last layer takes the whole residual)."""
    lm, _ = gpt2_family
    hp = load_preset("tiny-gpt2-family").replace(
        layers=[1], method_settings={"memit": {"mom2_update_weight": 1e-6}}
    )
    ed = Editor(lm.model, lm.tokenizer, hp, cache_dir=None)
    use_templates(ed, ["{}"])
    upd = ed.edit([REQS[0]], "memit")
    rec = upd.records[0]
    assert rec["residual_after"] < 1e-3 * rec["z_norm"]


# ------------------------------------------------------------ identities (exact algebra)
def test_memit_one_layer_one_request_is_sherman_morrison(gpt2_family, keys_c0):
    k, c0, r = keys_c0
    k, r = k[:, :1], r[:, :1]
    lam = 3.0
    u, v = memit_solve(c0, k, r, lam)
    cinv_k = torch.linalg.solve(c0, k)
    s = float(k.T @ cinv_k)
    want = r @ cinv_k.T / (lam + s)
    assert rel(v @ u, want) < 1e-9
    ue, ve, _ = emmet_solve(c0, k, r, w=7.0, mu=0.3)
    assert rel(v @ u, (ve @ ue) * s / (lam + s)) < 1e-9


def test_memit_update_from_the_method_matches_sherman_morrison(gpt2_family):
    """The method end to end: keys, C₀, residual (V = R) and the solve agree with the formula."""
    lm, _ = gpt2_family
    hp = load_preset("tiny-gpt2-family").replace(
        layers=[1], method_settings={"memit": {"mom2_update_weight": 2.0}}
    )
    ed = Editor(lm.model, lm.tokenizer, hp, cache_dir=None)
    upd = ed.edit([REQS[1]], "memit")
    (lu,) = upd.layers
    templates = family_templates(ed)
    items = [locate(ed.tok, t.format(REQS[1].prompt), REQS[1].subject, "joined") for t in templates]
    k = _keys(ed, items, lu.weight_name, len(templates)).double()
    c0 = moment(ed, 1).double()
    r = lu.V.double()
    cinv_k = torch.linalg.solve(c0, k)
    want = r @ cinv_k.T / (2.0 + float(k.T @ cinv_k))
    assert rel(lu.delta(), want) < 1e-5
    assert abs(upd.records[0]["residual_norms"]["1"] - float(r.norm())) < 1e-4 * float(r.norm())


@pytest.mark.parametrize("w, mu", [(1.0, 0.1), (1000.0, 0.0), (50.0, 5.0)])
def test_emmet_one_request_maps_key_exactly(keys_c0, w, mu):
    k, c0, r = keys_c0
    k, r = k[:, :1], r[:, :1]
    u, v, pinv = emmet_solve(c0, k, r, w, mu)
    assert not pinv
    assert rel((v @ u) @ k, r) < 1e-9
    # for one request w and μ cancel: ΔW = r (C₀⁻¹k)ᵀ / (kᵀC₀⁻¹k), computed here apart
    # (float64 throughout: the bound is float64 round-off through C₀'s inverse)
    cinv_k = torch.linalg.solve(c0, k)
    want = r @ cinv_k.T / float(k.T @ cinv_k)
    assert rel(v @ u, want) < 1e-9


def test_emmet_batch_mu_zero_maps_keys_and_mu_shrinks(keys_c0):
    k, c0, r = keys_c0
    w = 10.0
    u, v, _ = emmet_solve(c0, k, r, w, 0.0)
    assert rel((v @ u) @ k, r) < 1e-7
    mu = 0.5
    u, v, _ = emmet_solve(c0, k, r, w, mu)
    d0 = k.T @ torch.linalg.solve(w * c0, k)
    want = r @ torch.linalg.solve(d0 + mu * torch.eye(3, dtype=d0.dtype), d0)
    assert rel((v @ u) @ k, want) < 1e-7


def test_emmet_equals_memit_with_lambda_w_mu(keys_c0):
    k, c0, r = keys_c0
    for w, mu in [(1000.0, 0.1), (1.0, 0.1), (20.0, 3.0)]:
        ue, ve, _ = emmet_solve(c0, k, r, w, mu)
        um, vm = memit_solve(c0, k, r, w * mu)
        assert rel(ve @ ue, vm @ um) < 1e-8


def test_alphaedit_update_in_range_of_p_and_stationary(gpt2_family, keys_c0):
    k, c0, r = keys_c0
    p32, kept = null_space_projector(c0.float(), 0.1)
    assert 0 < kept < c0.shape[0]
    p = p32.double()
    prev = k[:, :1] * 0.5 + 0.1  # some earlier keys
    cache = prev @ prev.T
    l2 = 2.0
    u, v = alphaedit_solve(p, cache, k, r, l2)
    x = (v @ u).T  # (in, out)
    eye = torch.eye(p.shape[0], dtype=p.dtype)
    assert float(((eye - p) @ x).norm() / x.norm()) < 1e-5
    # The minimiser of ‖KᵀX − Rᵀ‖² + tr(Xᵀ cache X) + L2‖X‖² over X in P's range, solved
    # apart in an orthonormal basis B of that range (X = B Y: a normal equation in Y),
    # not from the solver's system. B is P's own float32 singular vectors, so the bound
    # is float32 round-off in P (B Bᵀ and P agree to ~1e-7 relative).
    s_u, s_v, _ = torch.linalg.svd(c0.float().cpu(), full_matrices=False)
    b = s_u[:, s_v < 0.1].double()
    a = b.T @ (k @ k.T + cache) @ b + l2 * torch.eye(b.shape[1], dtype=b.dtype)
    x_ref = b @ torch.linalg.solve(a, b.T @ k @ r.T)
    assert rel(x, x_ref) < 1e-5


def test_alphaedit_identity_projector_is_memit(keys_c0):
    k, c0, r = keys_c0
    eye = torch.eye(c0.shape[0], dtype=torch.float64)
    u, v = alphaedit_solve(eye, None, k, r, 10.0)
    um, vm = memit_solve(eye, k, r, 10.0)
    assert rel(v @ u, vm @ um) < 1e-10
    u, v = alphaedit_solve(eye, 5.0 * c0, k, r, 0.0)
    um, vm = memit_solve(c0, k, r, 5.0)
    assert rel(v @ u, vm @ um) < 1e-8


def test_alphaedit_projector_keeping_nothing_is_an_error(gpt2_family):
    lm, _ = gpt2_family
    ed = Editor(lm.model, lm.tokenizer, load_preset("tiny-gpt2-family"), cache_dir=None)
    with pytest.raises(BadRequestError, match=r"layer 0.*nullspace_threshold 1e-09"):
        ed.edit([REQS[0]], "alphaedit", nullspace_threshold=1e-9)


# ------------------------------------------------------------ through the Editor
@pytest.mark.parametrize("arch", ["gpt2", "llama"])
@pytest.mark.parametrize("method", ["memit", "emmet", "alphaedit"])
def test_apply_then_undo_is_bit_exact_and_edit_holds(arch, method):
    lm = load_model(f"tiny-{arch}")
    ed = Editor(lm.model, lm.tokenizer, load_preset(f"tiny-{arch}-family"), cache_dir=None)
    layers = get_method(method).layers(ed)
    base = ed.fingerprint(layers)
    upd = ed.edit(REQS[:2], method)
    assert ed.fingerprint(layers) == base  # computing leaves the model as it was
    assert [lu.layer for lu in upd.layers] == [0, 1] and upd.unsafe_reason is None
    assert all(lu.rank == 2 for lu in upd.layers)
    ed.apply_step(upd)
    assert ed.fingerprint(layers) != base
    # the weights during compute were those apply produces: the same score, bit for bit
    probe = _probe(ed, REQS[:2])  # the same batch compute scored
    assert [p for p, _ in probe] == [r["p_new_after"] for r in upd.records]
    assert probe[0][0] > 100 * upd.records[0]["p_new_before"]
    ed.undo()
    assert ed.fingerprint(layers) == base


def test_edit_changes_tiny_models_prediction(gpt2_family):
    lm, _ = gpt2_family
    ed = Editor(lm.model, lm.tokenizer, load_preset("tiny-gpt2-family"), cache_dir=None)
    req = REQS[0]
    target = lm.tokenizer(" Brazil")["input_ids"][0]

    def top() -> int:
        ids = lm.tokenizer(req.text, return_tensors="pt")
        with torch.no_grad():
            return int(lm.model(**ids).logits[0, -1].argmax())

    assert top() != target
    ed.apply_step(ed.edit([req], "memit"))
    assert top() == target
    ed.undo()
    assert top() != target


def test_records_are_json_ready(gpt2_family):
    import json

    _, ed = gpt2_family
    upd = ed.edit(REQS[:1], "emmet")
    rec = json.loads(json.dumps(upd.records[0]))
    assert rec["request"]["subject"] == "Toyota" and rec["z_steps"] == len(rec["z_trace"])
    assert set(rec["residual_norms"]) == {"0", "1"} and rec["target_init_norm"] > 0
    opts = json.loads(json.dumps(upd.options))
    assert opts["mom2_update_weight"] == 1.0 and opts["emmet_lambda"] == 0.1
    assert opts["layers"] == [0, 1] and len(opts["templates"]) == 6


def test_alphaedit_carries_kkt_of_edited_keys():
    lm = load_model("tiny-gpt2")
    ed = Editor(lm.model, lm.tokenizer, load_preset("tiny-gpt2-family"), cache_dir=None)
    upd = ed.edit(REQS[:2], "alphaedit")
    assert all(lu.keys is not None and lu.keys.shape == (256, 2) for lu in upd.layers)
    ed.apply_step(upd)
    # the keys were read on the edited model: the same as reading them now
    templates = family_templates(ed)
    items = [
        locate(ed.tok, t.format(r.prompt), r.subject, "joined") for r in REQS[:2] for t in templates
    ]
    for lu in upd.layers:
        now = _keys(ed, items, lu.weight_name, len(templates))
        assert rel(now, lu.keys) < 1e-6
        state = ed.method_state["alphaedit"][lu.layer]
        assert torch.allclose(state, lu.keys @ lu.keys.T)
    second = ed.edit(REQS[2:], "alphaedit")
    assert all(x["cache"] for x in second.options["per_layer"])
    ed.apply_step(second)
    k1, k2 = upd.layers[0].keys, second.layers[0].keys
    assert rel(ed.method_state["alphaedit"][0], k1 @ k1.T + k2 @ k2.T) < 1e-6


def test_memit_seq_accumulates_only_when_asked():
    lm = load_model("tiny-gpt2")
    ed = Editor(lm.model, lm.tokenizer, load_preset("tiny-gpt2-family"), cache_dir=None)
    plain = ed.edit(REQS[:1], "memit")
    assert all(lu.keys is None for lu in plain.layers) and not plain.options["accumulate"]
    ed.apply_step(plain)
    assert "memit" not in ed.method_state
    seq = ed.edit(REQS[1:2], "memit", accumulate=True)
    ed.apply_step(seq)
    assert set(ed.method_state["memit"]) == {0, 1}
    third = ed.edit(REQS[2:], "memit", accumulate=True)
    assert all(x["accumulated"] for x in third.options["per_layer"])


def test_most_probable_stopping_shortens_z(gpt2_family):
    _, ed = gpt2_family
    ref = ed.edit(REQS[:1], "memit")
    mpes = ed.edit(REQS[:1], "memit", v_stop="most_probable")
    assert mpes.records[0]["z_steps"] < ref.records[0]["z_steps"]
    assert mpes.records[0]["z_trace"][-1]["argmax_all"] == 1.0
    assert mpes.options["v_stop"] == "most_probable"


def test_reprs_out_is_block_output(gpt2_family):
    lm, _ = gpt2_family
    loc = locate(lm.tokenizer, "{} is in", "The Eiffel Tower", "joined")
    out = reprs_at(lm.model, lm.tokenizer, [loc], "transformer.h.1", "out")
    ids = torch.tensor([loc.ids])
    with torch.no_grad():
        hs = lm.model(input_ids=ids, output_hidden_states=True).hidden_states
    assert torch.allclose(out[0], hs[2][0, loc.index], atol=1e-5)


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
@pytest.mark.parametrize("rule", ["joined", "separate"])
def test_batched_z_equals_the_reference_loop(arch, rule):
    """optimise_zs (all requests together, prefix reuse) gives the reference loop's z,
    step count and trace per request, with requests stopping at different steps. The
    reference keeps δ in float32 whatever the model, so both run in float32."""
    lm = load_model(f"tiny-{arch}")
    ed = Editor(lm.model, lm.tokenizer, load_preset(f"tiny-{arch}-family"), cache_dir=None)
    hp = ed.hp.replace(subject_index=rule)
    templates = family_templates(ed)
    layer = hp.edited_layers()[-1]
    block = f"{hp.layers_module}.{layer}"
    ref = compute_zs(lm.model, lm.tokenizer, REQS, templates, layer, block, hp)
    # a threshold between the requests' losses at step 5 makes them stop apart
    losses = sorted(t[min(5, len(t) - 1)]["loss"] for t in ref.traces)
    hp = hp.replace(v_early_stop_loss=(losses[0] + losses[1]) / 2)
    ref = compute_zs(lm.model, lm.tokenizer, REQS, templates, layer, block, hp)
    assert len(set(ref.steps)) > 1
    for chunk in (16, 2):  # all three together; chunks of 2 and 1 (memory's bound)
        got, loop = optimise_zs(
            lm.model, lm.tokenizer, REQS, templates, layer, block, hp.replace(v_max_requests=chunk)
        )
        assert loop == "batched"
        assert got.steps == ref.steps
        assert rel(got.target_init, ref.target_init) < 1e-6
        assert rel(got.z, ref.z) < 1e-5
        assert rel(got.z - got.target_init, ref.z - ref.target_init) < 1e-4
        for a, b in zip(got.traces, ref.traces, strict=True):
            assert [x["loss"] for x in a] == pytest.approx([x["loss"] for x in b], rel=1e-4)


def test_z_loop_is_recorded_and_reference_when_loss_layer_is_lower(gpt2_family):
    lm, ed = gpt2_family
    upd = ed.edit(REQS[:1], "memit")
    assert upd.options["z_loop"] == "batched"
    assert upd.options["v_prefix_reuse"] is True
    ref = ed.edit(REQS[:1], "memit", z_loop="reference")
    assert ref.options["z_loop"] == "reference"
    assert rel(upd.layers[0].delta(), ref.layers[0].delta()) < 1e-4
    hp = ed.hp.replace(v_loss_layer=ed.hp.edited_layers()[-1])
    n = len(list(lm.model.transformer.h))
    if hp.v_loss_layer < n - 1:
        templates = family_templates(ed)
        block = f"{hp.layers_module}.{hp.v_loss_layer}"
        _, loop = optimise_zs(
            lm.model, lm.tokenizer, REQS[:1], templates, hp.v_loss_layer, block, hp
        )
        assert loop == "reference"


# ------------------------------------------------------------ SmolLM2 (ci)
@pytest.fixture(scope="module")
def smollm2():
    return load_model("smollm2-135m")


@pytest.mark.slow
@pytest.mark.ci
@pytest.mark.parametrize("method", ["memit", "emmet", "alphaedit"])
def test_one_edit_holds_on_smollm2(smollm2, method):
    lm = smollm2
    ed = Editor(lm.model, lm.tokenizer, load_preset(f"smollm2-135m-{method}"))
    req = EditRequest("{} is located in the city of", "The Eiffel Tower", "Rome", "Paris")
    upd = ed.edit([req], method)
    rec = upd.records[0]
    assert upd.unsafe_reason is None
    assert rec["p_new_before"] < 0.01 < 0.5 < rec["p_new_after"]
    assert rec["p_true_after"] < rec["p_new_after"]
