"""AlphaEdit (jianghoucheng/AlphaEdit, AlphaEdit_main.py, experiments/evaluate.py).

Float32 throughout. Once per editor and layer, before any edit: the thin SVD
of the base model's float32 C₀, keeping the singular vectors whose singular
value is below ``nullspace_threshold`` (absolute); P = UUᵀ. Per layer:
[P(KKᵀ + cache) + L2·I] X = P K Rᵀ, solved here as X = B Rᵀ with
[P(KKᵀ + cache) + L2·I] B = P K, so ΔW = Xᵀ = R Bᵀ (V = R, U = Bᵀ). After all
layers the keys on the edited model go into ``LayerUpdate.keys``;
:meth:`AlphaEdit.fold` adds K Kᵀ to the carried cache (a resume folds its
stored steps again; undo puts back the cache the step found).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from ..context import EditContext
from ..errors import BadRequestError
from .base import Update, setting
from .family import FamilyMethod, LayerContext, Solved, moment
from .family.loop import FamilySettings
from .memit import accumulated, add_keys


def null_space_projector(c0: torch.Tensor, threshold: float) -> tuple[torch.Tensor, int]:
    """(P, kept directions): P = UUᵀ over the singular vectors of ``c0`` with σ < threshold."""
    u, s, _ = torch.linalg.svd(c0.float().cpu(), full_matrices=False)
    keep = (s < threshold).nonzero(as_tuple=True)[0]
    kept = u[:, keep]
    return kept @ kept.T, int(keep.numel())


def alphaedit_solve(
    p: torch.Tensor,
    cache: torch.Tensor | None,
    keys: torch.Tensor,
    resid: torch.Tensor,
    l2: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(U, V) in the keys' dtype with ``(V @ U)ᵀ = [P(KKᵀ + cache) + L2·I]⁻¹ P K Rᵀ``."""
    k = keys
    pd = p.to(device=k.device, dtype=k.dtype)
    kk = k @ k.T
    if cache is not None:
        kk = kk + cache.to(device=k.device, dtype=k.dtype)
    m = pd @ kk + l2 * torch.eye(k.shape[0], dtype=k.dtype, device=k.device)
    b = torch.linalg.solve(m, pd @ k)  # (in, n)
    return b.T.contiguous(), resid.to(k.dtype)


@dataclass(frozen=True)
class AlphaEditSettings(FamilySettings):
    nullspace_threshold: float = setting(
        0.02,
        "keep the singular directions of C₀ below this (absolute)",
        low=0,
        inclusive=False,
        legacy="nullspace_threshold",
    )
    alphaedit_l2: float = setting(10.0, "AlphaEdit's L2", low=0, legacy="alphaedit_l2")


class AlphaEdit(FamilyMethod):
    """AlphaEdit: the null-space threshold and L2; carries Σ K Kᵀ per layer."""

    name = "alphaedit"
    summary = "memit in C's null space"
    Settings: type = AlphaEditSettings

    def stores_keys(self, settings: Any) -> bool:
        return True

    def projector(self, ctx: EditContext, layer: int, threshold: float) -> tuple[torch.Tensor, int]:
        """P for ``layer`` (cached per editor); an error when it keeps no direction."""

        def make() -> tuple[torch.Tensor, int]:
            p, kept = null_space_projector(moment(ctx, layer), threshold)
            if kept == 0:
                raise BadRequestError(
                    f"alphaedit: the null-space projector of layer {layer} keeps no direction: "
                    f"every singular value of C₀ is >= nullspace_threshold {threshold:g}; "
                    "raise the threshold (preset field nullspace_threshold)"
                )
            return p, kept

        return ctx.caches.cached(self.projector_key(layer, threshold), make)  # type: ignore[no-any-return]

    def projector_key(self, layer: int, threshold: float) -> tuple[str, str, int, float]:
        """Where the caches keep P for ``layer`` (a saved state may put its own there)."""
        return (self.name, "P", layer, threshold)

    def prepare(self, ctx: EditContext, layers: list[int], settings: Any) -> None:
        for layer in layers:
            self.projector(ctx, layer, settings.nullspace_threshold)

    def solve(self, ctx: EditContext, lc: LayerContext, settings: Any) -> Solved:
        p, kept = self.projector(ctx, lc.layer, settings.nullspace_threshold)
        cache = accumulated(ctx, lc.layer)
        u, v = alphaedit_solve(p, cache, lc.keys.float(), lc.resid.float(), settings.alphaedit_l2)
        return Solved(u, v, {"kept_directions": kept, "cache": cache is not None})

    def fold(self, state: Any, update: Update) -> Any:
        return add_keys(state, update)
