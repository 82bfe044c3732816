"""MEMIT (kmeng01/memit, memit_main.py) as a registry method, with MEMIT_seq as a setting.

Per layer, in float64: solve (λC₀ + KKᵀ)A = K (a linear solve, no explicit
inverse) and Δ = R Aᵀ, factored as V = R (out × n), U = Aᵀ (n × in). Settings:
``accumulate`` (MEMIT_seq, AlphaEdit's repository): λC₀ + Σ K_prev K_prevᵀ + KKᵀ,
the sum over every applied step's keys on the edited model (the carried state);
``update_norm_lambda`` (ν, ENCORE's Frobenius-norm constraint on ΔW): + νI.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from ..context import EditContext
from .base import Update, setting
from .family import FamilyMethod, LayerContext, Solved, moment
from .family.loop import FamilySettings


def memit_solve(
    c0: torch.Tensor,
    keys: torch.Tensor,
    resid: torch.Tensor,
    lam: float,
    extra: torch.Tensor | None = None,
    nu: float = 0.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(U, V) in float64 with ``V @ U = R Kᵀ (λC₀ + extra + νI + KKᵀ)⁻¹``."""
    k = keys.double()
    a = lam * c0.to(k.device).double()
    if extra is not None:
        a = a + extra.to(k.device).double()
    if nu:
        a = a + nu * torch.eye(a.shape[0], dtype=a.dtype, device=a.device)
    adj = torch.linalg.solve(a + k @ k.T, k)  # (in, n)
    return adj.T.contiguous(), resid.double()


def solve_layer(
    ctx: EditContext,
    lc: LayerContext,
    weight: float,
    extra: torch.Tensor | None,
    nu: float,
    flag: str,
) -> Solved:
    """MEMIT's solve of one layer with C₀'s weight ``weight``, ``extra`` (Σ K Kᵀ of
    earlier steps, or None) and ν; ``flag`` names, in the layer's info, whether
    ``extra`` took part."""
    u, v = memit_solve(moment(ctx, lc.layer), lc.keys, lc.resid, weight, extra, nu)
    return Solved(u, v, {flag: extra is not None})


def accumulated(ctx: EditContext, layer: int) -> torch.Tensor | None:
    """The Σ K Kᵀ the method has carried for ``layer``, if any."""
    return None if ctx.state is None else ctx.state.get(layer)


def add_keys(
    state: dict[int, torch.Tensor] | None, update: Update, dtype: torch.dtype = torch.float32
) -> Any:
    """``state`` with each layer's stored keys folded in: ``Σ K Kᵀ += K Kᵀ`` (in
    ``dtype``); a new dict of new tensors (the old state is what undo puts back)."""
    out = dict(state or {})
    for lu in update.layers:
        if lu.keys is None:
            continue
        k = lu.keys.to(dtype).cpu()
        prev = out.get(lu.layer)
        out[lu.layer] = k @ k.T if prev is None else prev + k @ k.T
    return out or state


@dataclass(frozen=True)
class MemitSettings(FamilySettings):
    mom2_update_weight: float = setting(
        15000.0, "λ, the weight of C₀", low=0, inclusive=False, legacy="mom2_update_weight"
    )
    update_norm_lambda: float = setting(
        0.0, "ν·I added to λC₀ (ENCORE's norm constraint)", low=0, legacy="update_norm_lambda"
    )
    accumulate: bool = setting(
        False, "MEMIT_seq: add the Σ K Kᵀ of the applied steps", legacy="memit_accumulate"
    )


class Memit(FamilyMethod):
    """MEMIT: λ, ν and MEMIT_seq's accumulated keys."""

    name = "memit"
    summary = "several layers, least squares"
    Settings: type = MemitSettings

    def stores_keys(self, settings: Any) -> bool:
        return bool(settings.accumulate)

    def solve(self, ctx: EditContext, lc: LayerContext, settings: Any) -> Solved:
        extra = accumulated(ctx, lc.layer) if settings.accumulate else None
        return solve_layer(
            ctx, lc, settings.mom2_update_weight, extra, settings.update_norm_lambda, "accumulated"
        )

    def fold(self, state: Any, update: Update) -> Any:
        return add_keys(state, update)
