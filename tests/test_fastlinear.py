"""Frozen linears on oneDNN's packed weights (rome/fastlinear.py): float rounding only.

Bounds: a product over K = 512 terms summed in another order (other blocking)
differs by at most K·eps ≈ 3e-5 of the terms' magnitude in float32 and
typically by √K·eps ≈ 1.4e-6 relative; 1e-5 on the whole output's norm sits
between the two. The optimisation compounds such differences over its steps.
"""

from __future__ import annotations

import contextlib

import pytest
import torch
from torch import nn

from rome import fastlinear, load_model
from rome.optimise import optimise_targets
from rome.request import EditRequest

pytestmark = pytest.mark.skipif(not fastlinear.available(), reason="no oneDNN in this torch")


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach().double(), b.detach().double()
    return float((a - b).norm() / b.norm())


def frozen_linear(bias: bool = True) -> nn.Linear:
    torch.manual_seed(0)
    lin = nn.Linear(512, 384, bias=bias)
    lin.requires_grad_(False)
    return lin


@pytest.mark.parametrize("bias", [True, False])
def test_forward_and_input_gradient_match_f_linear(bias):
    lin = frozen_linear(bias)
    x = torch.randn(3, 7, 512, requires_grad=True)
    g = torch.randn(3, 7, 384)
    want = nn.functional.linear(x, lin.weight, lin.bias)
    (want_grad,) = torch.autograd.grad(want, x, g)
    with fastlinear.packed_linears([lin], 21) as n:
        assert n == 1
        got = lin(x)
        (got_grad,) = torch.autograd.grad(got, x, g)
        with torch.no_grad():
            got_nograd = lin(x)
    assert rel(got, want) < 1e-5
    assert rel(got_grad, want_grad) < 1e-5
    assert torch.equal(got_nograd, got.detach())  # the same kernel with and without grad
    assert lin.weight.grad is None
    assert "forward" not in vars(lin)  # the module's own forward is back
    assert torch.equal(lin(x), want)


def test_an_edited_weight_is_packed_anew_and_hooks_still_run():
    lin = frozen_linear()
    x = torch.randn(5, 512)
    seen = []
    lin.register_forward_hook(lambda _m, _a, out: seen.append(out))
    with fastlinear.packed_linears([lin], 5):
        lin(x)
    with torch.no_grad():
        lin.weight.mul_(2.0)  # in place, as an applied edit is
    with fastlinear.packed_linears([lin], 5):
        got = lin(x)
    assert len(seen) == 2
    assert rel(got, nn.functional.linear(x, lin.weight, lin.bias)) < 1e-5


def test_only_frozen_float32_linears_big_enough_are_switched():
    trainable = nn.Linear(512, 384)
    small = nn.Linear(16, 16).requires_grad_(False)
    double = nn.Linear(512, 384).double().requires_grad_(False)
    with fastlinear.packed_linears([trainable, small, double], 4) as n:
        assert n == 0
    with fastlinear.packed_linears([frozen_linear()], 4, enabled=False) as n:
        assert n == 0


def test_switched_off_by_the_environment(monkeypatch):
    monkeypatch.setenv("ROME_PACKED_LINEAR", "0")
    with fastlinear.packed_linears([frozen_linear()], 4) as n:
        assert n == 0


def test_v_star_on_packed_linears_matches_f_linear(monkeypatch):
    """The whole optimisation on tiny-llama with every block and head linear packed
    (the size floor lowered: its 64-wide layers are below it)."""
    monkeypatch.setattr(fastlinear, "MIN_ELEMENTS", 0)
    lm = load_model("tiny-llama")
    hp = lm.hparams.replace(v_num_grad_steps=6)
    req = [EditRequest("{} is located in the city of", "The Eiffel Tower", "Rome")]
    templates = [["{}", "The Louvre is in Paris. {}", "He was born. {}"]]
    switched: list[int] = []
    real = fastlinear.packed_linears

    @contextlib.contextmanager
    def spy(*a, **k):
        with real(*a, **k) as n:
            switched.append(n)
            yield n

    monkeypatch.setattr(fastlinear, "packed_linears", spy)
    runs = {
        packed: optimise_targets(
            lm.model, lm.tokenizer, hp, req, templates, hp.layer, packed=packed
        )[0]
        for packed in (True, False)
    }
    blocks = len(lm.model.model.layers) - hp.layer - 1
    assert switched == [7 * blocks, 1, 0, 0]  # q k v o gate up down per block, the head
    a, b = runs[True], runs[False]
    assert a.steps == b.steps
    # float32 rounding of each product, compounded over 6 Adam steps
    assert 0 < rel(a.delta, b.delta) < 1e-4  # (0: the packed kernels did run)
    assert rel(a.keys, b.keys) < 1e-6  # the keys are below the packed blocks: F.linear
