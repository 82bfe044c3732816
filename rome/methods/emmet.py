"""EMMET (scalable-model-editing/unified-model-editing, emmet/emmet_main.py).

All float64, explicit inverses as published: C̃ = w·C₀ (+ νI), D = KᵀC̃⁻¹K
(+ μI only when n > 1; a pseudo-inverse when D cannot be inverted), and
Δ = R D⁻¹KᵀC̃⁻¹, factored as V = R, U = D⁻¹KᵀC̃⁻¹ (n × in). For n = 1 the
update maps the key exactly to cur + r whatever w and μ (r-ROME's form); for
n > 1 and ν = 0 it equals MEMIT with λ = w·μ.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch

from .family import FamilyMethod, LayerContext, Solved, moment
from .registry import register

if TYPE_CHECKING:
    from ..editor import Editor


def emmet_solve(
    c0: torch.Tensor,
    keys: torch.Tensor,
    resid: torch.Tensor,
    w: float,
    mu: float,
    nu: float = 0.0,
) -> tuple[torch.Tensor, torch.Tensor, bool]:
    """(U, V, used a pseudo-inverse) in float64 with ``V @ U = R D⁻¹ Kᵀ C̃⁻¹``."""
    k = keys.double()
    c = c0.to(k.device).double()
    if w != 1:
        c = c * w
    if nu:
        c = c + nu * torch.eye(c.shape[0], dtype=c.dtype, device=c.device)
    c_inv = torch.linalg.inv(c)
    d = k.T @ c_inv @ k
    if d.shape[0] > 1:
        d = d + mu * torch.eye(d.shape[0], dtype=d.dtype, device=d.device)
    pinv = False
    try:
        d_inv = torch.linalg.inv(d)
    except RuntimeError:  # singular D (torch's LinAlgError)
        d_inv, pinv = torch.linalg.pinv(d), True
    return (d_inv @ k.T @ c_inv).contiguous(), resid.double(), pinv


class Emmet(FamilyMethod):
    """EMMET: w = ``mom2_update_weight``, μ = ``emmet_lambda``, ν = ``update_norm_lambda``."""

    name = "emmet"

    def settings(self, editor: Editor, options: dict[str, Any]) -> dict[str, Any]:
        hp = editor.hp
        return {
            "mom2_update_weight": float(options.get("mom2_update_weight", hp.mom2_update_weight)),
            "emmet_lambda": float(options.get("emmet_lambda", hp.emmet_lambda)),
            "update_norm_lambda": float(options.get("norm_lambda", hp.update_norm_lambda)),
        }

    def solve(self, editor: Editor, ctx: LayerContext, settings: dict[str, Any]) -> Solved:
        u, v, pinv = emmet_solve(
            moment(editor, ctx.layer),
            ctx.keys,
            ctx.resid,
            settings["mom2_update_weight"],
            settings["emmet_lambda"],
            settings["update_norm_lambda"],
        )
        return Solved(u, v, {"pseudo_inverse": pinv})


register(Emmet())
