"""The rank-one update ``W_hat = W + Λ (C⁻¹ k_u)ᵀ`` and applying / undoing it.

Factors are kept as ROME returns them: ``u = C⁻¹k_u / ‖C⁻¹k_u‖`` and
``v = (v* − W k_v − b) / (u · k_v)``, so ``ΔW = v uᵀ`` (out × in) and, after
the update, the layer maps ``k_v`` to ``v*`` exactly.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from .covariance import CovFactor


def is_transposed(module: nn.Module) -> bool:
    """GPT-2's Conv1D stores its weight as (in, out)."""
    return module.__class__.__name__ == "Conv1D"


def weight_of(module: nn.Module) -> torch.Tensor:
    """The module's weight parameter, as stored."""
    w = module.weight
    assert isinstance(w, torch.Tensor)
    return w


def weight_out_in(module: nn.Module) -> torch.Tensor:
    """The weight as an (out, in) view, whatever the storage layout."""
    w = weight_of(module)
    return w.T if is_transposed(module) else w


def bias_of(module: nn.Module) -> torch.Tensor | None:
    b = getattr(module, "bias", None)
    return b if isinstance(b, torch.Tensor) else None


@dataclass
class RankOne:
    u: torch.Tensor  # (in,) unit vector along C⁻¹ k_u
    v: torch.Tensor  # (out,)
    denominator: float  # (C⁻¹ k_u)ᵀ k_v, unnormalised

    @property
    def norm(self) -> float:
        """Frobenius norm of ΔW = ‖u‖·‖v‖."""
        return float(self.u.norm() * self.v.norm())


@torch.no_grad()
def rank_one(
    module: nn.Module, factor: CovFactor, k_u: torch.Tensor, k_v: torch.Tensor, v_star: torch.Tensor
) -> RankOne:
    """Factors of the update that makes ``module`` map ``k_v`` to ``v_star``."""
    w = weight_out_in(module).float()
    b = bias_of(module)
    c_inv_k = factor.solve(k_u.float())
    denom = float(c_inv_k @ k_v.float())
    u = c_inv_k / c_inv_k.norm()
    current = w @ k_v.float() + (b.float() if b is not None else 0.0)
    v = (v_star.float() - current) / (u @ k_v.float())
    return RankOne(u=u, v=v, denominator=denom)


def delta_weight(module: nn.Module, u: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """ΔW in the module's own storage layout and dtype."""
    w = weight_of(module)
    outer = torch.outer(u, v) if is_transposed(module) else torch.outer(v, u)
    return outer.to(device=w.device, dtype=w.dtype)


@torch.no_grad()
def add_update(module: nn.Module, u: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Add ``v uᵀ`` to the weight in place; returns a copy of the weight as it was."""
    w = weight_of(module)
    saved = w.detach().clone()
    w.add_(delta_weight(module, u, v))
    return saved


@torch.no_grad()
def add_delta(module: nn.Module, delta_out_in: torch.Tensor) -> torch.Tensor:
    """Add ΔW, given (out, in), in the module's layout and dtype; returns the weight as it was."""
    w = weight_of(module)
    saved = w.detach().clone()
    d = delta_out_in.T if is_transposed(module) else delta_out_in
    w.add_(d.to(device=w.device, dtype=w.dtype))
    return saved


@torch.no_grad()
def restore(module: nn.Module, saved: torch.Tensor) -> None:
    """Put back a saved weight, bit for bit."""
    weight_of(module).copy_(saved)
