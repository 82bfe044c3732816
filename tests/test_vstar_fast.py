"""Prefix reuse and batched requests equal the one-request, whole-sequence v* loop.

The reference is ``compute_v_star(fast=False)`` (the published structure:
the whole model over whole sequences, one request at a time). In float64
the two agree to ~1e-14 (the levers are exact); in float32 they agree to
float error, which 19 Adam steps amplify by a few hundred at most.
"""

from __future__ import annotations

import pytest
import torch

from rome import load_model
from rome.editor import Editor
from rome.optimise import optimise_targets
from rome.request import EditRequest
from rome.scoring import target_ids
from rome.upper import build_rows
from rome.vstar import compute_v_star

# Subjects at different depths: the prefixes before the subject's last token
# differ in length between requests, templates and the KL row.
REQUESTS = [
    EditRequest(
        prompt="{} is located in the city of", subject="The Eiffel Tower", target_new="Rome"
    ),
    EditRequest(prompt="{} was written by", subject="Hamlet", target_new="Charles Dickens"),
    EditRequest(prompt="The capital of {} is", subject="Japan", target_new="Berlin"),
    EditRequest(
        prompt="The mother tongue of {} is", subject="Danielle Darrieux", target_new="English"
    ),
]
TEMPLATES = [
    "{}",
    "The Louvre is in Paris. {}",
    "He was born. {}",
    "Berlin is the capital of Germany and more. {}",
]


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


def tiny(arch: str, dtype: torch.dtype):
    lm = load_model(f"tiny-{arch}")
    lm.model.to(dtype)
    return lm


def reference(lm, hp, requests=REQUESTS, templates=TEMPLATES):
    return [
        compute_v_star(lm.model, lm.tokenizer, hp, r, templates, hp.layer, fast=False)
        for r in requests
    ]


def float32_noise(lm, hp, refs, requests=REQUESTS, templates=TEMPLATES) -> list[float]:
    """How far float32 noise moves each request's δ and v* through the optimisation, on
    this machine and kernel: the reference loop again on weights each moved by one unit
    in the last place (2⁻²⁴ relative, random signs), its distance from ``refs``."""
    saved = [p.detach().clone() for p in lm.model.parameters()]
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in lm.model.parameters():
            sign = torch.randint(0, 2, p.shape, generator=gen).to(p.dtype) * 2 - 1
            p.add_(sign * p.abs() * 2.0**-24)
    try:
        moved = reference(lm, hp, requests, templates)
    finally:
        with torch.no_grad():
            for p, w in zip(lm.model.parameters(), saved, strict=True):
                p.copy_(w)
    pairs = zip(moved, refs, strict=True)
    return [max(rel(m.delta, r.delta), rel(m.v_star, r.v_star)) for m, r in pairs]


def reorder_factor(lm) -> float:
    """How much more a sum taken in another order (another kernel's, a batch's) can move
    than one ulp on each of its terms does: up to n·u against √n·u (random signs), so
    √n, n the longest sum in the forward (the vocabulary's softmax, the MLP's inner
    width, the hidden size)."""
    c = lm.model.config
    hidden = getattr(c, "hidden_size", None) or c.n_embd
    inner = getattr(c, "intermediate_size", None) or getattr(c, "n_inner", None) or 4 * hidden
    return float(max(c.vocab_size, inner, hidden)) ** 0.5


def stop_threshold(refs) -> float:
    """A loss threshold that stops the requests at different steps: the median of the
    losses of the step-10 trace rows, nudged off any value a run reaches."""
    losses = sorted(t["loss"] for r in refs for t in r.trace)
    mid = sorted(r.trace[min(10, len(r.trace) - 1)]["loss"] for r in refs)[len(refs) // 2]
    near = min(losses, key=lambda x: abs(x - mid))
    return mid + 1e-3 if abs(near - mid) < 1e-3 else mid


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_rows_have_mixed_prefix_lengths(arch):
    lm = load_model(f"tiny-{arch}")
    rows = build_rows(lm.tokenizer, REQUESTS, [TEMPLATES] * len(REQUESTS))
    assert len(set(rows.subject)) >= 4
    assert min(rows.subject) < max(rows.subject)


@pytest.mark.parametrize("reuse", [True, False])
def test_length_buckets_leave_no_padding(tiny_gpt2, reuse, monkeypatch):
    """With buckets the rows run in groups of (nearly) one suffix length each."""
    from rome import optimise
    from rome.batching import pad_id_of
    from rome.optimise import _activate
    from rome.upper import compute_prefix

    lm, hp = tiny_gpt2, tiny_gpt2.hparams
    rows = build_rows(lm.tokenizer, REQUESTS, [TEMPLATES] * len(REQUESTS))
    cuts = list(rows.subject) if reuse else [0] * len(rows.seqs)
    pad = pad_id_of(lm.tokenizer)
    prefix = compute_prefix(lm.model, rows, cuts, pad)
    dev = torch.device("cpu")
    act = _activate(lm.model, hp, hp.layer, rows, [0, 1, 2, 3], cuts, prefix, pad, dev)
    suffix = [len(rows.seqs[i]) - cuts[i] for i in act.rows]
    run_tokens = sum(g.run.hidden.shape[0] * g.run.hidden.shape[1] for g in act.groups)
    # a group joins a longer one only when that pads it by at most _MERGE_PAD_TOKENS
    bound = optimise._MERGE_PAD_TOKENS * (len(set(suffix)) - len(act.groups))
    assert sum(suffix) <= run_tokens <= sum(suffix) + bound
    monkeypatch.setattr(optimise, "_MERGE_PAD_TOKENS", 0)  # one group per suffix length
    exact = _activate(lm.model, hp, hp.layer, rows, [0, 1, 2, 3], cuts, prefix, pad, dev)
    assert len(exact.groups) == len(set(suffix)) >= 2
    assert sum(g.run.hidden.shape[0] * g.run.hidden.shape[1] for g in exact.groups) == sum(suffix)
    one = _activate(
        lm.model,
        hp.replace(v_length_buckets=False),
        hp.layer,
        rows,
        [0, 1, 2, 3],
        cuts,
        prefix,
        pad,
        dev,
    )
    assert len(one.groups) == 1
    padded = one.groups[0].run.hidden.shape[0] * one.groups[0].run.hidden.shape[1]
    assert padded >= run_tokens and padded > sum(suffix)


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
@pytest.mark.parametrize("reuse", [True, False])
@pytest.mark.parametrize("buckets", [True, False])
def test_batch_equals_one_at_a_time_float64(arch, reuse, buckets):
    """Exactness: in float64 δ, v*, the stopping step and the loss trace agree to 1e-10,
    with the rows in one padded batch or in groups of one suffix length each."""
    lm = tiny(arch, torch.float64)
    hp = lm.hparams.replace(v_length_buckets=buckets)
    hp = hp.replace(v_early_stop_loss=stop_threshold(reference(lm, hp)))
    refs = reference(lm, hp)
    assert len({r.steps for r in refs}) >= 2, "the requests should stop at different steps"
    # share_kl off: reading a KL row's logits from its bare row regroups the gradient's
    # sums, which Adam's eps amplifies past 1e-10 (its own test: test_speed_levers.py)
    got = optimise_targets(
        lm.model,
        lm.tokenizer,
        hp,
        REQUESTS,
        [TEMPLATES] * 4,
        hp.layer,
        prefix_reuse=reuse,
        share_kl=False,
    )
    for g, r in zip(got, refs, strict=True):
        assert g.steps == r.steps
        assert rel(g.delta, r.delta) < 1e-10
        assert rel(g.v_star, r.v_star) < 1e-10
        assert rel(g.v_init, r.v_init) < 1e-12
        for a, b in zip(g.trace, r.trace, strict=True):
            assert a["loss"] == pytest.approx(b["loss"], rel=1e-10)


@pytest.mark.kernels
@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_prefix_reuse_batch_equals_one_at_a_time_float32(arch):
    """Float32: prefix reuse over a batch of four requests stopping at different steps.

    The stopping steps are equal; δ and v* differ only by float32 noise through the
    optimisation (the float64 test shows the computation itself is exact to 1e-14). That
    noise is measured here, on this machine's kernel: one request on the random tiny
    GPT-2 has a first gradient component of 1.9e-7, 20x Adam's eps, where the first
    update g/(|g| + eps) turns 1e-7 relative noise into 1e-5..1e-4 of its δ (7.9e-5
    measured under AVX2, 1.1e-4 on a CPU with AMX), the others 1e-6.
    """
    lm = tiny(arch, torch.float32)
    hp = lm.hparams
    hp = hp.replace(v_early_stop_loss=stop_threshold(reference(lm, hp)))
    refs = reference(lm, hp)
    assert len({r.steps for r in refs}) >= 2
    got = optimise_targets(lm.model, lm.tokenizer, hp, REQUESTS, [TEMPLATES] * 4, hp.layer)
    errors = []
    for g, r in zip(got, refs, strict=True):
        assert g.steps == r.steps
        errors.append(max(rel(g.delta, r.delta), rel(g.v_star, r.v_star)))
    noise = sorted(float32_noise(lm, hp, refs))
    # the bound: the noise one ulp makes, times how much more a reordered sum can make
    k = reorder_factor(lm)
    assert max(errors) < k * noise[-1], (errors, noise, k)
    assert sorted(errors)[-2] < k * noise[-2], (errors, noise, k)  # all but the sensitive one


def test_each_request_keeps_its_own_trajectory(tiny_gpt2):
    """A request alone and the same request in a batch (with others that stop earlier or
    later, and a different template list) take the same steps to the same δ."""
    lm = tiny_gpt2
    lm.model.double()
    hp = lm.hparams
    hp = hp.replace(v_early_stop_loss=stop_threshold(reference(lm, hp)))
    alone = [
        optimise_targets(lm.model, lm.tokenizer, hp, [r], [t], hp.layer)[0]
        for r, t in zip(REQUESTS, [TEMPLATES, TEMPLATES[:2], TEMPLATES, ["{}"]], strict=True)
    ]
    together = optimise_targets(
        lm.model,
        lm.tokenizer,
        hp,
        REQUESTS,
        [TEMPLATES, TEMPLATES[:2], TEMPLATES, ["{}"]],
        hp.layer,
    )
    for a, b in zip(together, alone, strict=True):
        assert a.steps == b.steps
        assert rel(a.delta, b.delta) < 1e-10


def test_a_request_that_stops_at_once_is_never_moved(tiny_gpt2):
    """Loss below the threshold at step 0: no Adam step, δ stays exactly zero, while
    another request in the batch keeps optimising."""
    lm = tiny_gpt2
    hp = lm.hparams
    refs = reference(lm, hp, REQUESTS[:2])
    thr = (refs[0].trace[0]["loss"] + refs[1].trace[0]["loss"]) / 2
    hp = hp.replace(v_early_stop_loss=thr)
    low, high = sorted(range(2), key=lambda i: refs[i].trace[0]["loss"])
    got = optimise_targets(lm.model, lm.tokenizer, hp, REQUESTS[:2], [TEMPLATES] * 2, hp.layer)
    assert got[low].steps == 1
    assert torch.count_nonzero(got[low].delta) == 0
    assert got[high].steps > 1
    assert float(got[high].delta.norm()) > 0


def test_most_probable_stop_per_request(tiny_gpt2):
    """MPES per request: one request whose target is already the model's top token on
    its only prompt stops at step 0, the others run on; each as it would alone."""
    lm = tiny_gpt2
    lm.model.double()
    hp = lm.hparams.replace(v_stop="most_probable")
    req = REQUESTS[0]
    ids = lm.tokenizer(req.text, return_tensors="pt")["input_ids"]
    with torch.no_grad():
        top = int(lm.model(input_ids=ids).logits[0, -1].argmax())
    reqs = [req, *REQUESTS[1:3]]
    templates = [["{}"], TEMPLATES, TEMPLATES]
    targets = [[top], *(target_ids(lm.tokenizer, r.target_new) for r in REQUESTS[1:3])]
    got = optimise_targets(
        lm.model, lm.tokenizer, hp, reqs, templates, hp.layer, target_tokens=targets
    )
    alone = [
        optimise_targets(
            lm.model, lm.tokenizer, hp, [r], [t], hp.layer, prefix_reuse=False, target_tokens=[g]
        )[0]
        for r, t, g in zip(reqs, templates, targets, strict=True)
    ]
    assert got[0].steps == 1 and got[0].trace[0]["argmax_all"] == 1.0
    assert torch.count_nonzero(got[0].delta) == 0
    assert min(g.steps for g in got[1:]) > 1
    for g, a in zip(got, alone, strict=True):
        assert g.steps == a.steps
        assert rel(g.delta, a.delta) < 1e-10 if a.steps > 1 else torch.equal(g.delta, a.delta)
    refs = reference(lm, hp, REQUESTS[1:3])  # the published loop agrees on the others
    for g, r in zip(got[1:], refs, strict=True):
        assert g.steps == r.steps and rel(g.delta, r.delta) < 1e-10


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_block_output_with_mlp_norm_reproduces_rome_delta(arch):
    """The family's z (δ on the decoder block's output) with the MLP output's norm as
    the clamp reference is ROME's δ: the MLP output is the block's last addition."""
    lm = tiny(arch, torch.float64)
    hp = lm.hparams
    mlp = optimise_targets(lm.model, lm.tokenizer, hp, REQUESTS, [TEMPLATES] * 4, hp.layer)
    block = optimise_targets(
        lm.model,
        lm.tokenizer,
        hp,
        REQUESTS,
        [TEMPLATES] * 4,
        hp.layer,
        hook_module_name=f"{hp.layers_module}.{hp.layer}",
        clamp_reference=[float(v.v_init.norm()) for v in mlp],
    )
    for b, m in zip(block, mlp, strict=True):
        assert b.steps == m.steps
        assert rel(b.delta, m.delta) < 1e-10
        assert float(b.v_init.norm()) > float(m.v_init.norm())  # the residual stream's


def test_block_output_init_reference(tiny_gpt2):
    """clamp_reference="init" on a block: ‖target_init‖ of the block output bounds δ."""
    lm = tiny_gpt2
    hp = lm.hparams.replace(clamp_norm_factor=0.05)
    (z,) = optimise_targets(
        lm.model,
        lm.tokenizer,
        hp,
        REQUESTS[:1],
        [TEMPLATES],
        hp.layer,
        hook_module_name=f"{hp.layers_module}.{hp.layer}",
    )
    assert float(z.delta.norm()) == pytest.approx(0.05 * float(z.v_init.norm()), rel=1e-5)


@pytest.mark.kernels
def test_editor_records_prefix_reuse(tiny_gpt2):
    lm = tiny_gpt2
    ed = Editor(lm.model, lm.tokenizer, lm.hparams, cache_dir=None, templates=TEMPLATES)
    ed.set_covariance(lm.hparams.layer, None)
    on = ed.compute(REQUESTS[0])
    assert on.v_prefix_reuse and on.v_batch == 1
    assert on.to_dict()["v_prefix_reuse"] is True
    off_ed = Editor(
        lm.model,
        lm.tokenizer,
        lm.hparams.replace(v_prefix_reuse=False),
        cache_dir=None,
        templates=TEMPLATES,
    )
    off_ed.set_covariance(lm.hparams.layer, None)
    off = off_ed.compute(REQUESTS[0])
    assert not off.v_prefix_reuse
    assert off.v_star is not None and on.v_star is not None
    # REQUESTS[0] is the float32-sensitive request of the test above: the two differ by
    # the noise float32 makes through its optimisation, measured on this kernel
    refs = reference(lm, lm.hparams, REQUESTS[:1])
    (noise,) = float32_noise(lm, lm.hparams, refs, REQUESTS[:1])
    assert rel(on.v_star, off.v_star) < reorder_factor(lm) * noise


@pytest.mark.slow
@pytest.mark.parametrize("buckets", [True, False])
def test_smollm2_prefix_reuse_and_batch_equal_one_at_a_time(buckets):
    """SmolLM2 in float32, its shipped templates: four requests in one optimisation with
    prefix reuse equal the published one-request loop: the same stopping steps, δ and v*
    within 1e-5 but for one request within 1e-4 (measured 1.8e-5 with length buckets,
    2.7e-5 padded: the Adam-eps amplification of the float32 test above)."""
    lm = load_model("smollm2-135m")
    hp = lm.hparams.replace(v_length_buckets=buckets)
    templates = Editor(lm.model, lm.tokenizer, hp).templates()[:6]
    refs = reference(lm, hp, REQUESTS, templates)
    got = optimise_targets(lm.model, lm.tokenizer, hp, REQUESTS, [templates] * 4, hp.layer)
    errors = []
    for g, r in zip(got, refs, strict=True):
        assert g.steps == r.steps
        errors.append(max(rel(g.delta, r.delta), rel(g.v_star, r.v_star)))
    assert max(errors) < 1e-4
    assert sorted(errors)[-2] < 1e-5
