"""RECT: MEMIT's step with each layer's update kept only where its relative change is
largest; at 100 % it is MEMIT; its settings checked; one SmolLM2 edit (``ci``)."""

from __future__ import annotations

import json

import pytest
import torch

import rome.methods  # noqa: F401  (registers the methods)
from rome import BadRequestError, Editor, EditRequest, load_model, load_preset
from rome.methods.rect import dense_factors, rectify
from rome.update import weight_out_in

REQS = [
    EditRequest("{} is in", "The Eiffel Tower", "Rome", "Paris"),
    EditRequest("The capital of {} is", "Japan", "London", "Tokyo"),
]


def editor(arch: str = "gpt2", **settings) -> Editor:
    lm = load_model(f"tiny-{arch}")
    hp = load_preset(f"tiny-{arch}-family")
    if settings:
        hp = hp.replace(method_settings={"rect": settings}).validate()
    return Editor(lm.model, lm.tokenizer, hp, cache_dir=None)


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_rect_at_100_percent_is_memit_bit_for_bit(arch):
    a, b = editor(arch, keep_percent=100.0), editor(arch)
    rect, memit = a.edit(REQS, "rect"), b.edit(REQS, "memit")
    a.apply_step(rect)
    b.apply_step(memit)
    for layer in a.hp.edited_layers():
        assert torch.equal(a.module(layer).weight, b.module(layer).weight)
    # its records were re-scored on the rectified weights: here MEMIT's
    assert [r["p_new_after"] for r in rect.records] == [r["p_new_after"] for r in memit.records]


def test_rect_keeps_the_largest_relative_changes():
    ed = editor()
    upd = ed.edit(REQS, "rect")
    full = editor().edit(REQS, "memit")
    for lu, mu, info in zip(upd.layers, full.layers, upd.options["per_layer"], strict=True):
        d, w = lu.delta(), weight_out_in(ed.module(lu.layer)).detach()
        ratio = (mu.delta().double() / (w.float() + 1e-8)).abs()
        kept = d != 0
        n = d.numel()
        # k = int(n·0.6): entries at or above the k-th smallest ratio: n − k + 1 without ties
        assert int(kept.sum()) == n - int(n * 60 / 100) + 1 == info["kept_entries"]
        assert ratio[kept].min() >= ratio[~kept].max()
        assert torch.equal(d[kept], mu.delta()[kept])  # the kept entries are MEMIT's own
    # and the edit still lands mostly: the first request gains probability (9.8× here with
    # C₀ read on the base model; MEMIT's full update 14.9×; a RECT keeping nothing: 1×)
    assert upd.records[0]["p_new_after"] > 5 * upd.records[0]["p_new_before"]


def test_dense_factors_multiply_back_exactly():
    gen = torch.Generator().manual_seed(0)
    for shape in [(3, 5), (5, 3)]:
        d = torch.randn(*shape, generator=gen)
        u, v = dense_factors(d)
        assert torch.equal(v @ u, d) and u.shape[0] == min(shape)


def test_rectify_edge_cases():
    d = torch.tensor([[1.0, -2.0], [0.5, 4.0]])
    w = torch.ones(2, 2)
    assert torch.equal(rectify(d, w, 100.0), d)
    # 25 % of 4 entries: k = 3, the 3rd smallest ratio is 2, and the published ``>=``
    # keeps n − k + 1 = 2 entries, not 1
    assert torch.equal(rectify(d, w, 25.0), torch.tensor([[0.0, -2.0], [0.0, 4.0]]))


@pytest.mark.parametrize(
    ("value", "why"),
    [(0.0, r"rect: setting keep_percent must be in \(0, 100\]"), (101, "in"), ("x", "number")],
)
def test_out_of_range_settings_are_refused_in_one_line(value, why):
    hp = load_preset("tiny-gpt2-family")
    with pytest.raises(BadRequestError, match=why) as err:
        hp.replace(method_settings={"rect": {"keep_percent": value}}).validate()
    assert "\n" not in str(err.value)
    with pytest.raises(BadRequestError, match="unknown setting"):
        hp.replace(method_settings={"rect": {"keep": 1}}).validate()


def test_a_preset_file_with_a_bad_setting_exits_2_in_one_line(tmp_path):
    from typer.testing import CliRunner

    from workbench.cli import app

    data = json.loads(json.dumps(load_preset("tiny-gpt2-family").to_dict()))
    data["method_settings"] = {"rect": {"keep_percent": -5}}
    path = tmp_path / "p.json"
    path.write_text(json.dumps(data))
    res = CliRunner().invoke(
        app,
        ["edit", "--model", "tiny-gpt2", "--hparams", str(path), "--method", "rect",
         "--prompt", "{} is in", "--subject", "The Eiffel Tower", "--target-new", "Rome"],
    )  # fmt: skip
    assert res.exit_code == 2, res.output
    lines = [x for x in res.output.splitlines() if x.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:") and "keep_percent" in lines[0]


@pytest.mark.slow
@pytest.mark.ci
def test_one_rect_edit_holds_on_smollm2():
    lm = load_model("smollm2-135m")
    ed = Editor(lm.model, lm.tokenizer, load_preset("smollm2-135m-rect"))
    req = EditRequest("{} is located in the city of", "The Eiffel Tower", "Rome", "Paris")
    upd = ed.edit([req], "rect")
    rec = upd.records[0]
    assert upd.unsafe_reason is None and upd.method == "rect"
    assert rec["p_new_before"] < 0.01 < 0.5 < rec["p_new_after"]
