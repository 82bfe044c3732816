"""The seam every editing method goes through: per-layer rank-k factors, one record per request.

A method turns a batch of requests into an :class:`Update`: for each edited
layer the factors ``U`` (k × in) and ``V`` (out × k) of ``ΔW = V U`` in the
(out, in) layout, whatever the module's storage; one JSON-ready record per
request; and the change to the method's own carried state (AlphaEdit's
accumulated ``K Kᵀ``), as tensors the store can keep and a resume can sum
again. Computing never changes the model; :meth:`rome.Editor.apply_update`
does, and undoes it bit for bit.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

import torch

from ..request import EditRequest

if TYPE_CHECKING:
    from ..editor import Editor


@dataclass
class LayerUpdate:
    """``ΔW = V @ U`` for one weight, in its (out, in) layout."""

    layer: int
    weight_name: str
    U: torch.Tensor  # (k, in)
    V: torch.Tensor  # (out, k)
    # keys the method's state is rebuilt from on resume (AlphaEdit: K on the edited
    # model, (in, n)); None for a method that carries no state
    keys: torch.Tensor | None = field(default=None, repr=False)

    @property
    def rank(self) -> int:
        return int(self.U.shape[0])

    @property
    def norm(self) -> float:
        """‖V U‖_F without forming the product: √Σ (VᵀV ∘ UUᵀ)."""
        v = self.V.double()
        u = self.U.double()
        return float(((v.T @ v) * (u @ u.T)).sum().clamp_min(0).sqrt())

    def delta(self) -> torch.Tensor:
        """ΔW (out, in), float32: for rank one an outer product (bit-identical to ROME's)."""
        if self.rank == 1:
            return torch.outer(self.V[:, 0], self.U[0])
        return self.V.float() @ self.U.float()

    def is_finite(self) -> bool:
        return bool(torch.isfinite(self.U).all() and torch.isfinite(self.V).all())


@dataclass
class Update:
    """What a method computed for one step (one request or one batch)."""

    method: str
    layers: list[LayerUpdate]  # ascending layer order, applied in that order
    records: list[dict[str, Any]]  # one per request, JSON-ready
    options: dict[str, Any] = field(default_factory=dict)  # the method's settings, stored
    results: list[Any] = field(default_factory=list, repr=False)  # rich per-request objects
    unsafe_reason: str | None = None

    @property
    def norm(self) -> float:
        """√Σ ‖ΔW_l‖²_F over the edited layers."""
        return float(sum(lu.norm**2 for lu in self.layers) ** 0.5)

    def layer_norms(self) -> dict[int, float]:
        return {lu.layer: lu.norm for lu in self.layers}


@runtime_checkable
class Method(Protocol):
    """An editing method: the registry in :mod:`rome.methods` holds one per name."""

    name: str
    batched: bool  # True: one update for many requests (MEMIT family); False: one at a time

    def layers(self, editor: Editor) -> list[int]:
        """The layers this method edits with the editor's settings."""
        ...

    def compute(
        self, editor: Editor, requests: Sequence[EditRequest], options: dict[str, Any]
    ) -> Update:
        """The update for ``requests`` on the model as it is now; the model is unchanged after."""
        ...

    def after_apply(self, editor: Editor, update: Update) -> None:
        """Fold an applied update into the method's carried state (no-op for stateless ones)."""
        ...
