"""The speed levers of the target-vector loop change nothing but float rounding.

- Block ``layer`` runs once per optimisation (``skip_edited_block``): every step
  starts at block ``layer + 1`` from its output with ``δ`` added at the subject.
  In float64 the result equals the per-step path to 1e-10 (one addition
  reassociated, ``residual + (mlp + δ)`` against ``(residual + mlp) + δ``; the
  rest is the same arithmetic); with ``δ`` on the block's own output nothing is
  reassociated, so the bits are equal even in float32.
- The keys (the edited module's input at the subject) and the target's
  log-probability before the edit are read from the first step (``δ = 0``);
  they equal a separate keys pass (:func:`rome.keys.keys_at_subject`, to its
  float32 rounding) and a separate scoring pass (:func:`rome.scoring.score_targets`,
  to its float32 logits).
"""

from __future__ import annotations

import pytest
import torch

from rome import load_model
from rome.keys import keys_at_subject
from rome.optimise import optimise_targets
from rome.request import EditRequest
from rome.scoring import score_targets

REQUESTS = [
    EditRequest("{} is located in the city of", "The Eiffel Tower", "Rome"),
    EditRequest("{} was written by", "Hamlet", "Charles Dickens"),
    EditRequest("The capital of {} is", "Japan", "Berlin"),
]
TEMPLATES = ["{}", "The Louvre is in Paris. {}", "He was born. {}"]


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


def tiny(arch: str, dtype: torch.dtype):
    lm = load_model(f"tiny-{arch}")
    lm.model.to(dtype)
    return lm


def run(lm, skip: bool, reuse: bool = True, **kw):
    hp = lm.hparams
    return optimise_targets(
        lm.model,
        lm.tokenizer,
        hp,
        REQUESTS,
        [TEMPLATES] * len(REQUESTS),
        hp.layer,
        prefix_reuse=reuse,
        skip_edited_block=skip,
        **kw,
    )


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
@pytest.mark.parametrize("reuse", [True, False])
def test_edited_block_once_equals_every_step_float64(arch, reuse):
    lm = tiny(arch, torch.float64)
    fast, slow = run(lm, True, reuse), run(lm, False, reuse)
    for a, b in zip(fast, slow, strict=True):
        assert a.steps == b.steps
        # float64: one reassociated addition per step, amplified by <= 20 Adam steps
        assert rel(a.delta, b.delta) < 1e-10
        assert rel(a.v_init, b.v_init) == 0.0  # the same module output, read once
        for x, y in zip(a.trace, b.trace, strict=True):
            assert x["loss"] == pytest.approx(y["loss"], rel=1e-10)


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_edited_block_once_is_bit_identical_on_the_block_output(arch):
    """δ on the decoder block's output (the family's z): the same additions in the same
    order, so the same bits, float32 included."""
    lm = tiny(arch, torch.float32)
    name = f"{lm.hparams.layers_module}.{lm.hparams.layer}"
    fast = run(lm, True, hook_module_name=name)
    slow = run(lm, False, hook_module_name=name)
    for a, b in zip(fast, slow, strict=True):
        assert a.steps == b.steps
        assert torch.equal(a.delta, b.delta)


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
@pytest.mark.parametrize("skip", [True, False])
def test_first_step_gives_keys_and_scores_before_the_edit(arch, skip):
    lm = tiny(arch, torch.float64)
    hp = lm.hparams
    got = run(lm, skip)
    for req, vs in zip(REQUESTS, got, strict=True):
        prompts = [t.format(req.prompt) for t in TEMPLATES]
        keys = keys_at_subject(
            lm.model, lm.tokenizer, hp.weight_module(hp.layer), prompts, req.subject
        )
        assert vs.keys is not None and vs.row_logprob is not None
        # keys_at_subject returns float32 keys: its rounding (2^-24 relative) bounds it
        assert rel(vs.keys, keys) < 1e-7
        assert vs.keys.dtype == torch.float64  # ours stay in the model's dtype
        filled = [p.replace("{}", req.subject, 1) for p in prompts]
        scores = score_targets(lm.model, lm.tokenizer, filled, [req.target_new] * len(filled))
        want = torch.tensor([s.sum_logprob for s in scores], dtype=torch.float64)
        # score_targets rounds the logits to float32 (2^-24 relative) before log_softmax
        assert rel(vs.row_logprob, want) < 1e-6


def test_no_first_step_values_under_bf16_autocast():
    """bf16 autocast changes the first step's values: the editor must not read them."""
    lm = tiny("gpt2", torch.float32)
    hp = lm.hparams.replace(v_autocast="bf16", v_num_grad_steps=2)
    (vs,) = optimise_targets(lm.model, lm.tokenizer, hp, REQUESTS[:1], [TEMPLATES], hp.layer)
    assert vs.keys is None and vs.row_logprob is None


def test_kl_rows_are_shared_where_a_rewriting_row_has_the_same_tokens():
    """The KL row ``"{} is a"`` of a prompt that starts with the subject begins like its
    bare ``"{}"`` row; the other prompt's does not."""
    from rome.optimise import kl_sources
    from rome.upper import build_rows

    lm = tiny("llama", torch.float32)
    rows = build_rows(lm.tokenizer, REQUESTS, [TEMPLATES] * len(REQUESTS))
    kl = [i for i, k in enumerate(rows.is_kl) if k]
    # Eiffel Tower and Hamlet start their prompts; "The capital of {} is" does not
    assert kl_sources(rows, list(rows.subject)) == {
        kl[0]: rows.first_row[0],
        kl[1]: rows.first_row[1],
    }
    assert kl_sources(rows, [0] * len(rows.seqs)) == {
        kl[0]: rows.first_row[0],
        kl[1]: rows.first_row[1],
    }


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
@pytest.mark.parametrize("reuse", [True, False])
def test_shared_kl_row_equals_its_own_row_float64(arch, reuse):
    """Reading the KL logits from the bare row (causal model: the same hidden states at
    the subject's last token, δ included) changes only how the products and the
    gradient's sums are grouped."""
    lm = tiny(arch, torch.float64)
    shared, own = run(lm, True, reuse), run(lm, True, reuse, share_kl=False)
    for a, b in zip(shared, own, strict=True):
        assert a.steps == b.steps
        for key in ("loss", "kl", "nll"):  # δ = 0: the same sums to float64 rounding
            assert a.trace[0][key] == pytest.approx(b.trace[0][key], rel=1e-12, abs=1e-15)
        # Adam divides each coordinate's gradient by that coordinate's running RMS, so
        # one whose gradient is at rounding level moves by up to lr whatever its size:
        # regrouped float64 sums (1e-16) grow to 3.6e-8 over 20 steps on tiny-llama
        assert rel(a.delta, b.delta) < 1e-6
