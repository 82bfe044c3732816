"""Frozen ``nn.Linear`` layers on oneDNN's prepacked fp32 matrix products (CPU).

A target-vector optimisation runs the same frozen weights forward and
backward at every step. PyTorch's CPU ``linear`` calls MKL's sgemm, which on
this project's AMD CPUs (Zen 4: AVX-512) runs a slower code path than
oneDNN's matrix product on a weight reordered once into oneDNN's blocked
layout (``torch.ops.mkldnn._reorder_linear_weight``, the kernel PyTorch's own
compiler uses for CPU inference): measured 15-40 % faster per product at an
optimisation's shapes, 2x at the head's. Inside :func:`packed_linears` the
eligible layers run on those packed weights, forward and, for the input's
gradient, backward (a second packed copy of ``Wᵀ``); the weights themselves
are untouched and get no gradient.

Same arithmetic, other kernels: results differ from ``F.linear`` by float32
rounding only (tests/test_fastlinear.py). Only float32 weights on the CPU
with at least :data:`MIN_ELEMENTS` entries (smaller ones gain nothing) that do
not require grad are packed. The packed copies are kept per weight (and its
in-place version, so an edited weight is packed anew) up to
:data:`CACHE_BYTES` in all; past that they are packed for one optimisation.
``ROME_PACKED_LINEAR=0`` in the environment switches the lever off.
"""

from __future__ import annotations

import contextlib
import os
import weakref
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

#: weights with fewer entries keep ``F.linear`` (packing a small matrix gains nothing)
MIN_ELEMENTS = 1 << 16
#: packed copies kept across optimisations, in bytes (forward and backward copies)
CACHE_BYTES = 2 << 30


def available() -> bool:
    """Whether oneDNN's prepacked linear is there and not switched off."""
    if os.environ.get("ROME_PACKED_LINEAR", "1") == "0":
        return False
    ops = torch.ops.mkldnn
    return (
        torch.backends.mkldnn.is_available()
        and hasattr(ops, "_linear_pointwise")
        and hasattr(ops, "_reorder_linear_weight")
    )


def _pack(w: torch.Tensor, rows_hint: int) -> torch.Tensor:
    return torch.ops.mkldnn._reorder_linear_weight(w.detach().contiguous(), rows_hint)


def _linear(x: torch.Tensor, packed: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    return torch.ops.mkldnn._linear_pointwise(x, packed, bias, "none", [], "")


@dataclass
class _Packed:
    version: tuple[int, int]  # the weight's (storage pointer, in-place version) when packed
    rows_hint: int
    fwd: torch.Tensor
    bwd: torch.Tensor | None = None  # Wᵀ, packed on the first backward


#: id(weight) -> (a weak reference to it, its packed copies); entries whose weight is gone
#: are dropped at the next :func:`packed_linears` (a WeakKeyDictionary would compare
#: tensors with ``==``)
_cache: dict[int, tuple[weakref.ref[torch.Tensor], _Packed]] = {}


def _cached(w: torch.Tensor) -> _Packed | None:
    entry = _cache.get(id(w))
    return entry[1] if entry is not None and entry[0]() is w else None


def _prune() -> int:
    """Drop the entries of weights that are gone; the bytes the others hold."""
    for key in [k for k, (ref, _) in _cache.items() if ref() is None]:
        del _cache[key]
    return sum(
        (p.fwd.numel() + (0 if p.bwd is None else p.bwd.numel())) * 4 for _, p in _cache.values()
    )


class _PackedFn(torch.autograd.Function):
    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any, x: torch.Tensor, state: _Packed, weight: torch.Tensor, bias: torch.Tensor | None
    ) -> torch.Tensor:
        ctx.state, ctx.weight = state, weight
        return _linear(x, state.fwd, bias)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[Any, ...]:  # type: ignore[override]
        state: _Packed = ctx.state
        if state.bwd is None:
            state.bwd = _pack(ctx.weight.t(), state.rows_hint)
        return _linear(grad.contiguous(), state.bwd, None), None, None, None


def eligible(module: nn.Module) -> bool:
    """A frozen float32 CPU ``nn.Linear`` big enough to gain from packing."""
    if not isinstance(module, nn.Linear):
        return False
    w = module.weight
    return (
        w.device.type == "cpu"
        and w.dtype == torch.float32
        and not w.requires_grad
        and w.numel() >= MIN_ELEMENTS
        and (module.bias is None or not module.bias.requires_grad)
    )


def _state(w: torch.Tensor, rows_hint: int, keep: bool) -> _Packed:
    version = (w.data_ptr(), w._version)
    old = _cached(w)
    if old is not None and old.version == version:
        return old
    state = _Packed(version, rows_hint, _pack(w, rows_hint))
    if keep:
        _cache[id(w)] = (weakref.ref(w), state)
    return state


@contextlib.contextmanager
def packed_linears(
    roots: Iterable[nn.Module], rows_hint: int, enabled: bool = True
) -> Iterator[int]:
    """Inside, every eligible ``nn.Linear`` under ``roots`` runs on packed weights.

    ``rows_hint``: about how many rows (tokens) each product has (oneDNN picks its
    blocking by it). Yields how many layers were switched. Forward hooks of the
    layers still run (the layer's ``forward`` is replaced, not its call).
    """
    layers: list[nn.Linear] = []
    if enabled and available():
        seen: set[int] = set()
        for root in roots:
            for m in root.modules():
                if id(m) not in seen and eligible(m):
                    seen.add(id(m))
                    layers.append(m)  # type: ignore[arg-type]
    need = sum(2 * m.weight.numel() * 4 for m in layers if _cached(m.weight) is None)
    keep = _prune() + need <= CACHE_BYTES
    patched: list[nn.Linear] = []
    try:
        for m in layers:
            state = _state(m.weight, max(1, rows_hint), keep)
            m.forward = _forward_of(m, state)  # type: ignore[method-assign]
            patched.append(m)
        yield len(patched)
    finally:
        for m in patched:
            del m.forward


def _forward_of(m: nn.Linear, state: _Packed) -> Any:
    weight, bias = m.weight, m.bias

    def forward(x: torch.Tensor) -> torch.Tensor:
        if x.dtype != torch.float32 or x.device.type != "cpu" or torch.is_autocast_enabled("cpu"):
            return nn.functional.linear(x, weight, bias)
        if torch.is_grad_enabled() and x.requires_grad:
            return _PackedFn.apply(x, state, weight, bias)  # type: ignore[no-any-return]
        return _linear(x, state.fwd, bias)

    return forward
