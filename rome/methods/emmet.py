"""EMMET (scalable-model-editing/unified-model-editing, emmet/emmet_main.py).

All float64, explicit inverses as published: C̃ = w·C₀ (+ νI), D = KᵀC̃⁻¹K
(+ μI only when n > 1; a pseudo-inverse when D cannot be inverted), and
Δ = R D⁻¹KᵀC̃⁻¹, factored as V = R, U = D⁻¹KᵀC̃⁻¹ (n × in). For n = 1 the
update maps the key exactly to cur + r whatever w and μ (r-ROME's form); for
n > 1 and ν = 0 it equals MEMIT with λ = w·μ. C̃⁻¹ depends only on the base
model's C₀, w and ν: it is inverted once per editor and layer.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from ..context import EditContext
from .base import setting
from .family import FamilyMethod, LayerContext, Solved, moment
from .family.loop import FamilySettings


def emmet_c_inv(c0: torch.Tensor, w: float, nu: float = 0.0) -> torch.Tensor:
    """C̃⁻¹ = (w·C₀ + νI)⁻¹ in float64, an explicit inverse as published."""
    c = c0.double()
    if w != 1:
        c = c * w
    if nu:
        c = c + nu * torch.eye(c.shape[0], dtype=c.dtype, device=c.device)
    return torch.linalg.inv(c)


def emmet_solve(
    c0: torch.Tensor,
    keys: torch.Tensor,
    resid: torch.Tensor,
    w: float,
    mu: float,
    nu: float = 0.0,
    c_inv: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, bool]:
    """(U, V, used a pseudo-inverse) in float64 with ``V @ U = R D⁻¹ Kᵀ C̃⁻¹``
    (``c_inv``: C̃⁻¹ already made by :func:`emmet_c_inv` from the same C₀, w, ν)."""
    k = keys.double()
    if c_inv is None:
        c_inv = emmet_c_inv(c0.to(k.device), w, nu)
    c_inv = c_inv.to(k.device)
    d = k.T @ c_inv @ k
    if d.shape[0] > 1:
        d = d + mu * torch.eye(d.shape[0], dtype=d.dtype, device=d.device)
    pinv = False
    try:
        d_inv = torch.linalg.inv(d)
    except RuntimeError:  # singular D (torch's LinAlgError)
        d_inv, pinv = torch.linalg.pinv(d), True
    return (d_inv @ k.T @ c_inv).contiguous(), resid.double(), pinv


@dataclass(frozen=True)
class EmmetSettings(FamilySettings):
    mom2_update_weight: float = setting(
        15000.0, "w, the weight of C₀", low=0, inclusive=False, legacy="mom2_update_weight"
    )
    emmet_lambda: float = setting(
        0.1, "μ, added to D when a step has more than one request", low=0, legacy="emmet_lambda"
    )
    update_norm_lambda: float = setting(
        0.0, "ν·I added to w·C₀", low=0, legacy="update_norm_lambda"
    )


class Emmet(FamilyMethod):
    """EMMET: w, μ and ν."""

    name = "emmet"
    summary = "several layers, equality-constrained"
    Settings = EmmetSettings

    def solve(self, ctx: EditContext, lc: LayerContext, settings: Any) -> Solved:
        w, nu = settings.mom2_update_weight, settings.update_norm_lambda
        c0 = moment(ctx, lc.layer)
        c_inv = ctx.caches.cached(
            (self.name, "C_inv", lc.layer, w, nu), lambda: emmet_c_inv(c0, w, nu)
        )
        u, v, pinv = emmet_solve(c0, lc.keys, lc.resid, w, settings.emmet_lambda, nu, c_inv)
        return Solved(u, v, {"pseudo_inverse": pinv})
