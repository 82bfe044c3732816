"""AlphaEdit (jianghoucheng/AlphaEdit, AlphaEdit_main.py, experiments/evaluate.py).

Float32 throughout. Once per editor and layer, before any edit: the thin SVD
of the base model's float32 C₀, keeping the singular vectors whose singular
value is below ``nullspace_threshold`` (absolute); P = UUᵀ. Per layer:
[P(KKᵀ + cache) + L2·I] X = P K Rᵀ, solved here as X = B Rᵀ with
[P(KKᵀ + cache) + L2·I] B = P K, so ΔW = Xᵀ = R Bᵀ (V = R, U = Bᵀ). After all
layers the keys on the edited model go into ``LayerUpdate.keys``;
:meth:`AlphaEdit.after_apply` adds K Kᵀ to the carried cache (a resume replays
``after_apply`` over its stored updates).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch

from ..errors import BadRequestError
from .base import Update
from .family import FamilyMethod, LayerContext, Solved, moment
from .memit import accumulated, add_keys
from .registry import register

if TYPE_CHECKING:
    from ..editor import Editor


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


class AlphaEdit(FamilyMethod):
    """AlphaEdit: ``nullspace_threshold`` and ``alphaedit_l2`` from the preset or options."""

    name = "alphaedit"
    keeps_keys = True

    def settings(self, editor: Editor, options: dict[str, Any]) -> dict[str, Any]:
        hp = editor.hp
        return {
            "nullspace_threshold": float(
                options.get("nullspace_threshold", hp.nullspace_threshold)
            ),
            "alphaedit_l2": float(options.get("l2", hp.alphaedit_l2)),
        }

    def projector(self, editor: Editor, layer: int, threshold: float) -> tuple[torch.Tensor, int]:
        """P for ``layer`` (cached per editor); an error when it keeps no direction."""

        def make() -> tuple[torch.Tensor, int]:
            p, kept = null_space_projector(moment(editor, layer), threshold)
            if kept == 0:
                raise BadRequestError(
                    f"alphaedit: the null-space projector of layer {layer} keeps no direction: "
                    f"every singular value of C₀ is >= nullspace_threshold {threshold:g}; "
                    "raise the threshold (preset field nullspace_threshold)"
                )
            return p, kept

        return editor.cached(("alphaedit", "P", layer, threshold), make)  # type: ignore[no-any-return]

    def prepare(self, editor: Editor, layers: list[int], settings: dict[str, Any]) -> None:
        for layer in layers:
            self.projector(editor, layer, settings["nullspace_threshold"])

    def solve(self, editor: Editor, ctx: LayerContext, settings: dict[str, Any]) -> Solved:
        p, kept = self.projector(editor, ctx.layer, settings["nullspace_threshold"])
        cache = accumulated(editor, self.name, ctx.layer)
        u, v = alphaedit_solve(
            p, cache, ctx.keys.float(), ctx.resid.float(), settings["alphaedit_l2"]
        )
        return Solved(u, v, {"kept_directions": kept, "cache": cache is not None})

    def after_apply(self, editor: Editor, update: Update) -> None:
        add_keys(editor, self.name, update)


register(AlphaEdit())
