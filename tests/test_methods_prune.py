"""PRUNE: the accumulated update's singular values above W₀'s largest log-restrained (the
paper's rule at every step or at the end; the published branch's rule kept); an update
whose singular values stay under W₀'s is left as MEMIT's; one SmolLM2 edit (``ci``)."""

from __future__ import annotations

import math

import pytest
import torch

import rome.methods  # noqa: F401  (registers the methods)
from rome import BadRequestError, Editor, EditRequest, load_model, load_preset
from rome.methods.prune import restrain
from rome.update import weight_out_in

REQS = [
    EditRequest("{} is in", "The Eiffel Tower", "Rome", "Paris"),
    EditRequest("The capital of {} is", "Japan", "London", "Tokyo"),
    EditRequest("{}", "Toyota", "Brazil"),
    EditRequest("{} was written by", "Hamlet", "Charles Dickens"),
]


def editor(arch: str = "gpt2", **settings) -> Editor:
    lm = load_model(f"tiny-{arch}")
    hp = load_preset(f"tiny-{arch}-family").replace(method_settings={"prune": settings})
    return Editor(lm.model, lm.tokenizer, hp.validate(), cache_dir=None)


def w(ed: Editor, layer: int) -> torch.Tensor:
    return weight_out_in(ed.module(layer)).detach().double().clone()


def sigma(m: torch.Tensor) -> torch.Tensor:
    return torch.linalg.svdvals(m.double())


def test_restrain_maps_only_the_singular_values_above_sigma_max():
    gen = torch.Generator().manual_seed(0)
    q1, _ = torch.linalg.qr(torch.randn(6, 6, generator=gen, dtype=torch.float64))
    q2, _ = torch.linalg.qr(torch.randn(9, 6, generator=gen, dtype=torch.float64))
    s = torch.tensor([9.0, 5.0, 2.0, 1.0, 0.5, 0.1], dtype=torch.float64)
    got = sigma(restrain(q1 @ torch.diag(s) @ q2.T, 2.0))
    want = [
        math.log(9.0) - math.log(2.0) + 2.0,
        math.log(5.0) - math.log(2.0) + 2.0,
        2,
        1,
        0.5,
        0.1,
    ]
    # float64 SVDs of a 6 × 9 matrix: ~1e-15 relative; 1e-12 leaves room
    assert torch.allclose(got, torch.tensor(want, dtype=torch.float64), rtol=1e-12)
    small = q1 @ torch.diag(s / 10) @ q2.T
    assert torch.allclose(restrain(small, 2.0), small, atol=1e-14)  # all under: unchanged


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_an_update_under_w0s_largest_singular_value_is_memits(arch):
    """λ = 3000 keeps the tiny models' updates under σ_max(W₀): PRUNE is then MEMIT (at
    1000 GPT-2's layer-1 update, C₀ read on the base model, is over it: 1.75 > 1.68)."""
    a, b, base = editor(arch), editor(arch), editor(arch)
    for ed in (a, b):
        ed.hp = ed.hp.replace(mom2_update_weight=3000.0)
    for step in (REQS[:2], REQS[2:]):
        pr, me = a.edit(step, "prune"), b.edit(step, "memit")
        assert all(x["adjusted"] for x in pr.options["per_layer"])
        a.apply_step(pr)
        b.apply_step(me)
    for layer in a.hp.edited_layers():
        d = w(b, layer) - w(base, layer)
        assert float(sigma(d).max()) < float(sigma(w(base, layer)).max())  # the case tested
        # the same weights to the float32 rounding of two different sums of the same terms
        assert float((w(a, layer) - w(b, layer)).norm() / d.norm()) < 1e-5


def test_every_step_keeps_w_minus_w0_restrained():
    """With σ_max lowered below the update's singular values, W − W₀ = adj(S) after each
    step, S the sum of the raw MEMIT updates (rebuilt from the stored keys)."""
    ed = editor()
    base = {x: w(ed, x) for x in ed.hp.edited_layers()}
    for layer in ed.hp.edited_layers():
        ed.cached(("prune", "sigma_max", layer), lambda: 1e-3)  # every σ of S above it
    total: dict[int, torch.Tensor] = {}
    for step in (REQS[:2], REQS[2:]):
        upd = ed.edit(step, "prune")
        ed.apply_step(upd)
        for lu in upd.layers:
            n_in = lu.U.shape[1]
            raw = lu.keys[:, n_in:].T.double() @ lu.keys[:, :n_in].double()
            total[lu.layer] = total.get(lu.layer, 0) + raw
    for layer, s in total.items():
        got = sigma(w(ed, layer) - base[layer])[:4]
        want = torch.log(sigma(s)[:4]) - math.log(1e-3) + 1e-3
        assert torch.allclose(got, want, rtol=1e-4)  # float32 weights hold the result


def test_published_rule_adds_the_restrained_update_to_the_edited_weight():
    ed = editor(rule="published", when="end", end_step=2)
    base = {x: w(ed, x) for x in ed.hp.edited_layers()}
    for layer in ed.hp.edited_layers():
        ed.cached(("prune", "sigma_max", layer), lambda: 1e-3)
    first = ed.edit(REQS[:2], "prune")
    assert not any(x["adjusted"] for x in first.options["per_layer"])
    ed.apply_step(first)
    before = {x: w(ed, x) for x in ed.hp.edited_layers()}
    second = ed.edit(REQS[2:], "prune")
    ed.apply_step(second)
    for lu in second.layers:
        n_in = lu.U.shape[1]
        raw = lu.keys[:, n_in:].T.double() @ lu.keys[:, :n_in].double()
        s = before[lu.layer] + raw - base[lu.layer]
        want = base[lu.layer] + s + restrain(s, 1e-3)  # W₀ + S + adj(S)
        got = w(ed, lu.layer)
        assert float((got - want).norm() / (want - base[lu.layer]).norm()) < 1e-5


@pytest.mark.parametrize(
    ("settings", "why"),
    [
        ({"rule": "published"}, "rule published adjusts once"),
        ({"rule": "both"}, "must be one of paper, published"),
        ({"when": "end", "end_step": 0}, r"end_step must be in \[1, inf\]"),
    ],
)
def test_out_of_range_settings_are_refused_in_one_line(settings, why):
    hp = load_preset("tiny-gpt2-family")
    with pytest.raises(BadRequestError, match=why) as err:
        hp.replace(method_settings={"prune": settings}).validate()
    assert "\n" not in str(err.value)


@pytest.mark.slow
@pytest.mark.ci
def test_one_prune_edit_holds_on_smollm2():
    lm = load_model("smollm2-135m")
    ed = Editor(lm.model, lm.tokenizer, load_preset("smollm2-135m-prune"))
    req = EditRequest("{} is located in the city of", "The Eiffel Tower", "Rome", "Paris")
    upd = ed.edit([req], "prune")
    rec = upd.records[0]
    assert upd.unsafe_reason is None and upd.method == "prune"
    assert rec["p_new_before"] < 0.01 < 0.5 < rec["p_new_after"]
