"""RECT (SasyaTitech/NAS ``baselines/memit/memit_rect_main.py``): MEMIT whose update keeps
only its largest relative changes.

The step is MEMIT's (the layer loop writes each layer's whole update before the
next layer's keys, as the published ``execute_memit`` does). Then, per layer, on
the weight W as it is before the step: r = |ΔW / (W + 1e-8)| elementwise (W + ε
in the weight's float32), k = int(numel · (100 − keep_percent) / 100), t = the
k-th smallest r, and only the entries with r ≥ t are added (published: 40 %).
``keep_percent`` 100 keeps every entry (k = 0; the published ``kthvalue`` would
refuse it): the update is MEMIT's, bit for bit once applied.

The kept update is sparse, not low-rank: it is stored as factors with one side
the identity (V = I, U = ΔW_kept when out ≤ in; else U = I, V = ΔW_kept), so
``V U`` is ΔW_kept exactly. Stateless.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

import torch

from ..context import EditContext
from ..request import EditRequest
from ..update import add_delta, restore, weight_out_in
from .base import LayerUpdate, Update, setting
from .family.loop import _probe
from .memit import Memit, MemitSettings

EPSILON = 1e-8  # published: added to W before the ratio


def rectify(delta: torch.Tensor, weight: torch.Tensor, keep_percent: float) -> torch.Tensor:
    """``delta`` (float32) with the entries of the smallest |Δ/(W + ε)| set to zero."""
    ratio = (delta.double() / (weight.float() + EPSILON)).abs()
    k = int(ratio.numel() * (100 - keep_percent) / 100)
    if k <= 0:
        return delta.clone()
    threshold = torch.kthvalue(ratio.reshape(-1), k).values
    return torch.where(ratio >= threshold, delta, torch.zeros_like(delta))


def dense_factors(delta: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(U, V) with ``V @ U == delta`` exactly: one side the identity, the smaller one."""
    out_f, in_f = delta.shape
    if out_f <= in_f:
        return delta.contiguous(), torch.eye(out_f, dtype=delta.dtype)
    return torch.eye(in_f, dtype=delta.dtype), delta.contiguous()


@dataclass(frozen=True)
class RectSettings(MemitSettings):
    keep_percent: float = setting(
        40.0,
        "percent of each layer's entries kept: those whose |ΔW/W| is largest",
        low=0.0,
        inclusive=False,
        high=100.0,
    )


class Rect(Memit):
    """RECT: MEMIT's step, then each layer's update rectified (``keep_percent``)."""

    name = "rect"
    finish_keeps_layers = False  # the loop's Δ is rectified after it (then reprobed)
    summary = "memit keeping only its largest relative changes"
    Settings = RectSettings

    def settings(self, hp: Any, overrides: Any = None) -> Any:
        return dataclasses.replace(super().settings(hp, overrides), accumulate=False)

    def finish(self, ctx: EditContext, update: Update, settings: Any) -> None:
        kept: list[LayerUpdate] = []
        for lu, info in zip(update.layers, update.options["per_layer"], strict=True):
            full = lu.delta()
            w = weight_out_in(ctx.module(lu.layer)).detach()
            delta = rectify(full, w, settings.keep_percent)
            u, v = dense_factors(delta.cpu())
            kept.append(LayerUpdate(lu.layer, lu.weight_name, u, v))
            info["kept_entries"] = int((delta != 0).sum())
            info["memit_norm"] = lu.norm
        update.layers[:] = kept
        _reprobe(ctx, update)


def _reprobe(ctx: EditContext, update: Update) -> None:
    """The records' probabilities after the step, with the rectified update written."""
    saved = [(lu.layer, add_delta(ctx.module(lu.layer), lu.delta())) for lu in update.layers]
    try:
        reqs = [EditRequest(**r["request"]) for r in update.records]
        after = _probe(ctx, reqs)
        if ctx.while_applied is not None:  # the caller's probes, in this same trial
            ctx.while_applied()
    finally:
        for layer, w in reversed(saved):
            restore(ctx.module(layer), w)
    for rec, (p_new, p_true) in zip(update.records, after, strict=True):
        rec["p_new_after"], rec["p_true_after"] = p_new, p_true
