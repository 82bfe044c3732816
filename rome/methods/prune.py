"""PRUNE (Ma et al. 2024; the ``MEMIT_prune`` branch of jianghoucheng/AlphaEdit,
``experiments/evaluate.py``, commit d04ed2c): sequential MEMIT whose accumulated
update has its singular values above W₀'s largest restrained.

For the accumulated update S (out × in) of a layer with SVD U diag(σ) Vᵀ and
σ_max the largest singular value of that layer's unedited W₀, each σ > σ_max
becomes log σ − log σ_max + σ_max (the rest are kept): adj(S).

- ``rule: paper`` (default), ``when: every_step`` (default): after every step
  the layer holds W₀ + adj(S), S the sum of the raw MEMIT updates so far (each
  computed on the restrained weights); the stored update of a step is
  adj(S_t) − adj(S_{t−1}). ``when: end``: the raw updates are applied as MEMIT's
  and the step numbered ``end_step`` (1-based) leaves W₀ + adj(S).
- ``rule: published`` (only with ``when: end``): what the branch runs: MEMIT
  applied batch after batch; after the last batch S = W − W₀ is read from the
  weights and adj(S) is **added to the edited weight**, W₀ + S + adj(S), so the
  directions below σ_max count twice. Kept for parity.

The default is the paper's rule at every step: it is what the paper states
(the perturbation W − W₀ bounded), and a replay scores the model at every
checkpoint, which an end-only adjustment would leave unrestrained until the last.

Updates are dense (stored as factors with one side the identity, as RECT's).
The carried state per layer is S and the count of applied steps; each stored
layer keeps the step's raw MEMIT factors in ``keys`` (n × (in + out): U, then
Vᵀ), so a resume rebuilds S exactly.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

import torch

from ..context import EditContext
from ..errors import BadRequestError
from ..update import weight_out_in
from .base import LayerUpdate, Update, setting
from .memit import Memit, MemitSettings
from .rect import _reprobe, dense_factors


@dataclass(frozen=True)
class PruneSettings(MemitSettings):
    rule: str = setting(
        "paper", "paper: W₀ + adj(S); published: W + adj(W − W₀)", choices=("paper", "published")
    )
    when: str = setting(
        "every_step", "adjust after every step, or once at end_step", choices=("every_step", "end")
    )
    end_step: int = setting(10, "with when=end: the step (1-based) after which to adjust", low=1)


def restrain(s: torch.Tensor, sigma_max: float) -> torch.Tensor:
    """adj(S): singular values above ``sigma_max`` to log σ − log σ_max + σ_max (float64)."""
    u, sig, vh = torch.linalg.svd(s.double(), full_matrices=False)
    big = sig > sigma_max
    adj = torch.where(big, torch.log(sig) - torch.log(torch.tensor(sigma_max)) + sigma_max, sig)
    return (u * adj) @ vh


def _check(values: Any) -> Any:
    if values.rule == "published" and values.when != "end":
        raise BadRequestError(
            "prune: setting rule published adjusts once, after the last step: use when end"
        )
    return values


class Prune(Memit):
    """PRUNE: MEMIT's steps with the accumulated update restrained (``rule``, ``when``)."""

    name = "prune"
    finish_keeps_layers = False  # the loop's Δ is restrained after it (then reprobed)
    summary = "memit with the accumulated update's large singular values restrained"
    Settings = PruneSettings

    def settings(self, hp: Any, overrides: Any = None) -> Any:
        return _check(dataclasses.replace(super().settings(hp, overrides), accumulate=False))

    def sigma_max(self, editor: EditContext, layer: int) -> float:
        """The largest singular value of the unedited weight of ``layer`` (cached)."""

        def make() -> float:
            with editor.base_weights([layer]):
                w = weight_out_in(editor.module(layer)).detach().double().cpu()
            return float(torch.linalg.matrix_norm(w, ord=2))

        return float(editor.caches.cached((self.name, "sigma_max", layer), make))

    def finish(self, editor: EditContext, update: Update, settings: Any) -> None:
        state: dict[Any, Any] = editor.state or {}
        step = int(state.get("steps", 0)) + 1
        adjust_now = settings.when == "every_step" or step == settings.end_step
        out: list[LayerUpdate] = []
        for lu, info in zip(update.layers, update.options["per_layer"], strict=True):
            raw = lu.delta()
            keys = torch.cat([lu.U.float(), lu.V.float().T], dim=1).cpu()
            info["memit_norm"] = lu.norm
            info["adjusted"] = adjust_now
            if not adjust_now:
                u, v = dense_factors(raw.cpu())
            else:
                delta = self._adjusted(editor, lu.layer, raw, state, settings)
                u, v = dense_factors(delta.float().cpu())
            out.append(LayerUpdate(lu.layer, lu.weight_name, u, v, keys))
        update.layers[:] = out
        update.options["prune_step"] = step
        _reprobe(editor, update)

    def _adjusted(
        self,
        editor: EditContext,
        layer: int,
        raw: torch.Tensor,
        state: dict[Any, Any],
        settings: Any,
    ) -> torch.Tensor:
        """The step's update that leaves the layer as the rule says (out × in, float64)."""
        sig = self.sigma_max(editor, layer)
        w = weight_out_in(editor.module(layer)).detach().float().cpu().clone()
        if settings.rule == "published":  # S read from the weights, as the branch does
            with editor.base_weights([layer]):
                w0 = weight_out_in(editor.module(layer)).detach().float().cpu().clone()
            after = w + raw.cpu()
            return (after - w).double() + restrain(after - w0, sig)
        prev = state.get(layer)
        total = raw.cpu().double() if prev is None else prev.double() + raw.cpu().double()
        now = restrain(total, sig)
        if settings.when == "every_step" and prev is not None:
            return now - restrain(prev, sig)
        # the first adjustment: the layer holds W₀ + S_prev (raw) before this step
        return now - (prev.double() if prev is not None else 0.0)

    def fold(self, state: Any, update: Update) -> Any:
        out: dict[Any, Any] = dict(state or {})
        for lu in update.layers:
            if lu.keys is None:
                continue
            width = lu.U.shape[1]
            raw = lu.keys[:, width:].T.float() @ lu.keys[:, :width].float()
            out[lu.layer] = raw if lu.layer not in out else out[lu.layer] + raw
        out["steps"] = int(out.get("steps", 0)) + 1
        return out
