"""The v* stabilisers (preset fields, off by default) on tiny GPT-2 and Llama models."""

from __future__ import annotations

import json

import pytest
import torch

from rome import Editor, EditRequest
from rome.anchor import CALIBRATION_REQUESTS, anchored, trimmed_mean
from rome.batching import prompt_ids, target_ids
from rome.devices import model_device
from rome.errors import BadRequestError
from rome.update import bias_of, weight_out_in
from rome.vstar import compute_v_star

REQ = EditRequest("The city of {}", "the Eiffel Tower", "Rome", "Paris")
TEMPLATES = ["{}", "Once upon a time. {}", "In the news today. {}"]


def test_defaults_are_the_reference_rule(tiny):
    assert tiny.hparams.v_stop == "loss"
    assert tiny.hparams.v_norm_anchor is False
    assert tiny.hparams.v_autocast is None


def test_most_probable_stops_no_later_and_target_is_argmax(tiny):
    hp = tiny.hparams.replace(v_num_grad_steps=40)
    ref = compute_v_star(tiny.model, tiny.tokenizer, hp, REQ, TEMPLATES, hp.layer)
    mp = compute_v_star(
        tiny.model, tiny.tokenizer, hp.replace(v_stop="most_probable"), REQ, TEMPLATES, hp.layer
    )
    assert mp.steps < ref.steps
    last = mp.trace[-1]
    # stopped by the most-probable rule (not the loss): every target token is the argmax
    assert last["loss"] >= hp.v_early_stop_loss
    assert last["argmax_all"] == 1.0
    # the steps before the stop did not satisfy the rule
    assert all(row["argmax_all"] == 0.0 for row in mp.trace[:-1])
    # until it stops, most_probable follows the reference trajectory exactly
    for a, b in zip(mp.trace, ref.trace, strict=False):
        assert a["loss"] == b["loss"]


def test_most_probable_check_on_the_model_itself(tiny):
    """When MPES stops early, the edited model does predict each target token (``prompt``
    mode, whose update maps the bare prompt's key k(s) to v* exactly)."""
    hp = tiny.hparams.replace(v_num_grad_steps=40, v_stop="most_probable")
    ed = Editor(tiny.model, tiny.tokenizer, hp, templates=TEMPLATES, cache_dir=None)
    res = ed.compute(REQ, mode="prompt")
    assert res.v_stop == "most_probable"
    assert res.to_dict(factors=False)["v_steps"] == len(res.v_star_trace)
    last = res.v_star_trace[-1]
    assert len(res.v_star_trace) < hp.v_num_grad_steps and last["loss"] >= hp.v_early_stop_loss
    tok = tiny.tokenizer
    prompt, target = prompt_ids(tok, REQ.text), target_ids(tok, REQ.target_new)
    ids = torch.tensor([prompt + target[:-1]], device=model_device(tiny.model))

    def predicted() -> list[int]:
        with torch.no_grad():
            logits = tiny.model(input_ids=ids).logits[0]
        return logits[len(prompt) - 1 : len(prompt) - 1 + len(target)].argmax(-1).tolist()

    assert predicted() != target  # the unedited model does not say it
    ed.apply(res)
    assert predicted() == target


def test_norm_anchor_gives_the_reference_norm_and_keeps_the_identity(tiny):
    hp = tiny.hparams.replace(v_norm_anchor=True, v_num_grad_steps=5)
    ed = Editor(tiny.model, tiny.tokenizer, hp, templates=TEMPLATES)
    rho = ed.norm_anchor(hp.layer)
    # the anchor is the trimmed mean of the calibration v*'s on the unedited model
    plain = hp.replace(v_norm_anchor=False)
    lm, tok = tiny.model, tiny.tokenizer
    norms = [
        float(compute_v_star(lm, tok, plain, r, TEMPLATES, hp.layer).v_star.norm())
        for r in CALIBRATION_REQUESTS
    ]
    assert rho == pytest.approx(trimmed_mean(norms), rel=1e-6)
    for mode in ("original", "rrome", "prompt"):
        res = ed.compute(REQ, mode=mode)
        assert res.norm_anchor == pytest.approx(rho)
        assert res.v_star is not None
        assert float(res.v_star.norm()) == pytest.approx(rho, rel=1e-5)
        assert res.v_star_norm_raw is not None and res.v_star_norm_raw != pytest.approx(rho)
    res = ed.compute(REQ, mode="rrome")
    module = ed.module(res.layer)
    ed.apply(res)
    b = bias_of(module)
    with torch.no_grad():
        out = weight_out_in(module) @ res.k_v + (b if b is not None else 0)
    assert float((out - res.v_star).norm() / res.v_star.norm()) < 1e-4


def test_norm_anchor_is_measured_on_the_unedited_weights(tiny):
    hp = tiny.hparams.replace(v_norm_anchor=True, v_num_grad_steps=5)
    first = Editor(tiny.model, tiny.tokenizer, hp, templates=TEMPLATES, cache_dir=None)
    rho = first.norm_anchor(hp.layer)
    first.apply(first.compute(REQ, mode="prompt"))
    again = Editor(tiny.model, tiny.tokenizer, hp, templates=TEMPLATES, cache_dir=None)
    again._base = first._base  # the same base weights, as a replay's resume has them
    edited = weight_out_in(first.module(hp.layer)).detach().clone()
    assert again.norm_anchor(hp.layer) == pytest.approx(rho, rel=1e-6)
    assert torch.equal(weight_out_in(first.module(hp.layer)), edited)


def test_norm_anchor_uses_the_first_n_calibration_requests(tiny, tmp_path):
    hp = tiny.hparams.replace(v_norm_anchor=True, v_num_grad_steps=3, v_norm_anchor_samples=3)
    plain = hp.replace(v_norm_anchor=False)
    lm, tok = tiny.model, tiny.tokenizer
    norms = [
        float(compute_v_star(lm, tok, plain, r, TEMPLATES, hp.layer).v_star.norm())
        for r in CALIBRATION_REQUESTS[:4]
    ]
    three = Editor(lm, tok, hp, templates=TEMPLATES, cache_dir=tmp_path).norm_anchor(hp.layer)
    assert three == pytest.approx(sum(norms[:3]) / 3, rel=1e-6)
    four_hp = hp.replace(v_norm_anchor_samples=4)
    four = Editor(lm, tok, four_hp, templates=TEMPLATES, cache_dir=tmp_path).norm_anchor(hp.layer)
    assert four == pytest.approx(sum(norms) / 4, rel=1e-6)
    assert four != pytest.approx(three, rel=1e-6)
    # N is part of the cache key: one file each, holding its own N norms
    cached = [json.loads(f.read_text()) for f in (tmp_path / "anchors").rglob("*.json")]
    assert sorted(len(c["norms"]) for c in cached) == [3, 4]
    with pytest.raises(BadRequestError, match="v_norm_anchor_samples must be 1 to 20"):
        Editor(lm, tok, hp.replace(v_norm_anchor_samples=21), templates=TEMPLATES).norm_anchor(
            hp.layer
        )


def test_anchored_keeps_the_direction():
    v = torch.tensor([3.0, 4.0])
    a = anchored(v, 10.0)
    assert torch.allclose(a, torch.tensor([6.0, 8.0]))
    assert trimmed_mean([1.0] * 19 + [100.0]) == 1.0


def test_drift_tracks_cumulative_change(tiny):
    ed = Editor(tiny.model, tiny.tokenizer, tiny.hparams, templates=TEMPLATES)
    layer = tiny.hparams.layer
    assert ed.drift(layer) == (0.0, 1.0)
    w0 = weight_out_in(ed.module(layer)).detach().clone()
    res = ed.compute(REQ, mode="rrome")
    ed.apply(res)
    w1 = weight_out_in(ed.module(layer)).detach().clone()
    d, ratio = ed.drift(layer)
    assert d == pytest.approx(res.update_norm, rel=1e-4)
    assert d == pytest.approx(float((w1 - w0).norm()), rel=1e-5)
    assert ratio == pytest.approx(float(w1.norm() / w0.norm()), rel=1e-6)
    assert ratio != pytest.approx(1.0, abs=1e-6)  # the edit did change the weight's norm
    ed.apply(ed.compute(EditRequest("The home of {}", "the Louvre", "Berlin"), mode="rrome"))
    w2 = weight_out_in(ed.module(layer)).detach()
    d2, ratio2 = ed.drift(layer)
    assert d2 == pytest.approx(float((w2 - w0).norm()), rel=1e-5)  # from W_0, not from W_1
    assert d2 != pytest.approx(float((w2 - w1).norm()), rel=1e-3)
    assert ratio2 == pytest.approx(float(w2.norm() / w0.norm()), rel=1e-6)


class _CpuInfo:
    """Stands in for ``Path`` in rome.vstar: /proc/cpuinfo reads as ``text``."""

    text: str | None = None

    def __init__(self, _path: str) -> None:
        pass

    def read_text(self) -> str:
        if self.text is None:
            raise OSError("no /proc/cpuinfo")
        return self.text


@pytest.mark.parametrize(
    ("cpuinfo", "has_bf16"),
    [
        ("flags\t: fpu sse2 avx2 avx512f avx512_bf16", True),
        ("flags\t: fpu sse2 amx_tile amx_bf16", True),
        ("flags\t: fpu sse2 avx2 avx512f", False),
        (None, False),  # not Linux
    ],
)
def test_cpu_bf16_units_are_read_from_cpuinfo(monkeypatch, cpuinfo, has_bf16):
    from rome import vstar

    monkeypatch.setattr(_CpuInfo, "text", cpuinfo)
    monkeypatch.setattr(vstar, "Path", _CpuInfo)
    assert vstar._cpu_has_bf16() is has_bf16
    assert vstar.resolve_autocast("auto", torch.device("cpu")) == ("bf16" if has_bf16 else None)


def test_auto_autocast_is_bf16_only_where_bf16_is_fast(tiny, monkeypatch):
    from rome import vstar

    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert vstar.resolve_autocast(None, cpu) is None
    assert vstar.resolve_autocast("bf16", cpu) == "bf16"
    assert vstar.resolve_autocast("auto", torch.device("meta")) is None
    for supported, expected in ((True, "bf16"), (False, None)):
        monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda s=supported: s)
        assert vstar.resolve_autocast("auto", cuda) == expected

    hp = tiny.hparams.replace(v_num_grad_steps=3)
    reference = Editor(tiny.model, tiny.tokenizer, hp, templates=TEMPLATES).compute(REQ, "rrome")
    auto = hp.replace(v_autocast="auto")
    for fast in (False, True):
        monkeypatch.setattr(vstar, "_cpu_has_bf16", lambda f=fast: f)
        res = Editor(tiny.model, tiny.tokenizer, auto, templates=TEMPLATES).compute(REQ, "rrome")
        assert res.v_autocast == ("bf16" if fast else None)  # the edit records what ran
        assert res.v_star is not None and reference.v_star is not None
        # and it is what ran: fp32 repeats the reference exactly, bf16 does not
        assert torch.equal(res.v_star, reference.v_star) is not fast
