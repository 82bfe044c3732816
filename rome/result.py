"""The record of one computed edit (JSON-serialisable through ``to_dict``)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from .request import EditRequest


@dataclass
class EditResult:
    request: EditRequest
    mode: str
    layer: int
    weight_name: str
    u: torch.Tensor
    v: torch.Tensor
    update_norm: float
    weight_norm: float
    denominator: float
    k_star_norm: float
    k_s_norm: float
    cos_kstar_ks: float
    v_star_trace: list[dict[str, float]]
    v_init_norm: float
    v_star_norm: float
    p_new_before: float
    p_new_after: float
    p_true_before: float | None
    p_true_after: float | None
    p_new_before_templated: float
    p_new_after_templated: float
    key_averaging: str
    covariance: str
    n_templates: int
    timings: dict[str, float]
    model: str = ""
    unsafe_reason: str | None = None
    # v* settings recorded with the edit (preset fields; the defaults are the reference)
    v_stop: str = "loss"
    v_autocast: str | None = None
    v_prefix_reuse: bool = False  # v* steps ran from the subject's last token on (exact)
    v_batch: int = 1  # requests optimised together in the v* loop that made this edit
    v_length_buckets: bool = False  # its rows ran in groups of one suffix length (exact)
    norm_anchor: float | None = None  # ρ when norm-anchor scaling rescaled v*, else None
    v_star_norm_raw: float | None = None  # ‖v*‖ before the anchor rescaled it
    # tensors kept for checks and for callers; not serialised
    k_u: torch.Tensor | None = field(default=None, repr=False)
    k_v: torch.Tensor | None = field(default=None, repr=False)
    v_star: torch.Tensor | None = field(default=None, repr=False)

    @property
    def update_norm_ratio(self) -> float:
        return self.update_norm / self.weight_norm if self.weight_norm else float("inf")

    def to_dict(self, factors: bool = True) -> dict[str, Any]:
        out: dict[str, Any] = {
            "request": self.request.to_dict(),
            "model": self.model,
            "mode": self.mode,
            "layer": self.layer,
            "weight_name": self.weight_name,
            "update_norm": self.update_norm,
            "update_norm_ratio": self.update_norm_ratio,
            "weight_norm": self.weight_norm,
            "denominator": self.denominator,
            "k_star_norm": self.k_star_norm,
            "k_s_norm": self.k_s_norm,
            "cos_kstar_ks": self.cos_kstar_ks,
            "v_init_norm": self.v_init_norm,
            "v_star_norm": self.v_star_norm,
            "p_new_before": self.p_new_before,
            "p_new_after": self.p_new_after,
            "p_true_before": self.p_true_before,
            "p_true_after": self.p_true_after,
            "p_new_before_templated": self.p_new_before_templated,
            "p_new_after_templated": self.p_new_after_templated,
            "key_averaging": self.key_averaging,
            "covariance": self.covariance,
            "n_templates": self.n_templates,
            "unsafe_reason": self.unsafe_reason,
            "v_stop": self.v_stop,
            "v_autocast": self.v_autocast,
            "v_prefix_reuse": self.v_prefix_reuse,
            "v_batch": self.v_batch,
            "v_length_buckets": self.v_length_buckets,
            "v_steps": len(self.v_star_trace),
            "norm_anchor": self.norm_anchor,
            "v_star_norm_raw": self.v_star_norm_raw,
            "v_star_trace": self.v_star_trace,
            "timings": self.timings,
        }
        if factors:
            out["u"] = self.u.tolist()
            out["v"] = self.v.tolist()
        return out
