"""MEMIT (kmeng01/memit, memit_main.py) as a registry method, with MEMIT_seq as an option.

Per layer, in float64: solve (λC₀ + KKᵀ)A = K (a linear solve, no explicit
inverse) and Δ = R Aᵀ, factored as V = R (out × n), U = Aᵀ (n × in). Options:
``accumulate`` (MEMIT_seq, AlphaEdit's repository): λC₀ + Σ K_prev K_prevᵀ + KKᵀ,
the sum over every applied step's keys on the edited model; ``norm_lambda``
(ν, ENCORE's Frobenius-norm constraint on ΔW): + νI.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch

from .base import Update
from .family import FamilyMethod, LayerContext, Solved, moment
from .registry import register

if TYPE_CHECKING:
    from ..editor import Editor


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


def accumulated(editor: Editor, method: str, layer: int) -> torch.Tensor | None:
    """The Σ K Kᵀ (float32) a method has carried for ``layer``, if any."""
    state = editor.method_state.get(method)
    return None if state is None else state.get(layer)


def add_keys(editor: Editor, method: str, update: Update) -> None:
    """Fold each layer's stored keys into ``method_state[method][layer] += K Kᵀ`` (float32)."""
    if all(lu.keys is None for lu in update.layers):
        return
    state = editor.method_state.setdefault(method, {})
    for lu in update.layers:
        if lu.keys is None:
            continue
        k = lu.keys.float().cpu()
        prev = state.get(lu.layer)
        state[lu.layer] = k @ k.T if prev is None else prev + k @ k.T


class Memit(FamilyMethod):
    """MEMIT: options ``accumulate`` (MEMIT_seq), ``norm_lambda`` (ν), ``v_stop``."""

    name = "memit"

    def settings(self, editor: Editor, options: dict[str, Any]) -> dict[str, Any]:
        hp = editor.hp
        return {
            "mom2_update_weight": float(options.get("mom2_update_weight", hp.mom2_update_weight)),
            "update_norm_lambda": float(options.get("norm_lambda", hp.update_norm_lambda)),
            "accumulate": bool(options.get("accumulate", hp.memit_accumulate)),
        }

    def wants_keys(self, settings: dict[str, Any]) -> bool:
        return bool(settings["accumulate"])

    def solve(self, editor: Editor, ctx: LayerContext, settings: dict[str, Any]) -> Solved:
        extra = accumulated(editor, self.name, ctx.layer) if settings["accumulate"] else None
        u, v = memit_solve(
            moment(editor, ctx.layer),
            ctx.keys,
            ctx.resid,
            settings["mom2_update_weight"],
            extra,
            settings["update_norm_lambda"],
        )
        return Solved(u, v, {"accumulated": extra is not None})

    def after_apply(self, editor: Editor, update: Update) -> None:
        # the stored keys decide, not the options: a resumed run rebuilds its steps
        # from their factors and keys alone (a step without accumulate keeps no keys)
        add_keys(editor, self.name, update)


register(Memit())
