"""What a method computes on: the model, its tokenizer, the preset, the caches, its state.

A :class:`~rome.methods.base.Method` gets an :class:`EditContext` from the
:class:`~rome.Editor` for each step, never the Editor itself: it cannot apply,
undo or reach another method's state. ``state`` is the method's carried state
as the applied steps left it (read it; :meth:`Method.fold` makes the next).
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

from torch import nn
from transformers import PreTrainedTokenizerBase

from .caches import Caches
from .errors import BadRequestError, LayerOutOfRangeError
from .hparams import EditHparams
from .nethook import get_module
from .update import weight_out_in


class HasCaches(Protocol):
    """An Editor or an EditContext: what the family's helpers read."""

    model: nn.Module
    tok: PreTrainedTokenizerBase
    caches: Caches

    @property
    def hp(self) -> EditHparams: ...

    def module(self, layer: int) -> nn.Module: ...


@dataclass
class EditContext:
    """One step's view of an editor (see the module's docstring)."""

    model: nn.Module
    tok: PreTrainedTokenizerBase
    hp: EditHparams
    caches: Caches
    state: Any = None
    # what a step notes for its own records while it computes (NAS's anchored norms)
    scratch: dict[str, Any] = field(default_factory=dict)
    # a caller's probes, called once while the step's whole update is on the model inside
    # the method's own trial (ROME's probe trial, the family's layer loop), so the caller
    # needs no trial of its own; a method without such a trial never calls it
    while_applied: Callable[[], None] | None = None

    @property
    def n_layers(self) -> int:
        return len(get_module(self.model, self.hp.layers_module))  # type: ignore[arg-type]

    def check_layer(self, layer: int) -> int:
        return check_layer(self.n_layers, layer)

    def module(self, layer: int) -> nn.Module:
        return get_module(self.model, self.hp.weight_module(layer))

    def base_weights(
        self, layers: list[int] | None = None
    ) -> contextlib.AbstractContextManager[None]:
        """Inside, every edited layer (or each of ``layers``) holds its unedited weight."""
        return self.caches.base_weights(layers)

    def targets(self, lu: Any) -> list[tuple[str | None, nn.Module, int, int]]:
        """Where ``lu`` writes (see :func:`targets`)."""
        return targets(self, lu)

    def unsafe_reason(self, update: Any) -> str | None:
        """Why ``update`` must not be applied (checked per layer): non-finite or too large."""
        return update_unsafe_reason(self, update)


def check_layer(n_layers: int, layer: int) -> int:
    if not 0 <= layer < n_layers:
        raise LayerOutOfRangeError(
            f"layer {layer} is out of range: the model has layers 0..{n_layers - 1}"
        )
    return layer


def unsafe(hp: EditHparams, finite: bool, norm: float, weight_norm: float) -> str | None:
    """Non-finite, or ``norm`` over ``max_update_ratio`` times the weight's: the reason."""
    if not finite:
        return "the update has NaN or infinite entries"
    ratio = norm / weight_norm if weight_norm else math.inf
    if ratio > hp.max_update_ratio:
        return (
            f"the update norm is {ratio:.1f}x the weight's norm "
            f"(limit {hp.max_update_ratio:g}, preset field max_update_ratio)"
        )
    return None


def targets(
    where: HasCaches | EditContext, lu: Any
) -> list[tuple[str | None, nn.Module, int, int]]:
    """Where ``lu`` writes: (module name, or None for the preset's weight; module; its
    rows of ``V``). ``weight_name`` may join several modules that read the same input
    with ``+`` (their (out, in) weights stacked by rows, in that order)."""
    names = [n.removesuffix(".weight") for n in lu.weight_name.split("+")]
    if names == [where.hp.weight_module(lu.layer)]:
        return [(None, where.module(lu.layer), 0, int(lu.V.shape[0]))]
    out: list[tuple[str | None, nn.Module, int, int]] = []
    row = 0
    for name in names:
        try:
            module = get_module(where.model, name)
        except LookupError as exc:
            raise BadRequestError(f"the update names a missing weight: {exc}") from None
        rows, width = weight_out_in(module).shape
        if width != lu.U.shape[1]:
            raise BadRequestError(f"{name} reads {width} inputs, the update {lu.U.shape[1]}")
        out.append((name, module, row, row + int(rows)))
        row += int(rows)
    if row != lu.V.shape[0]:
        raise BadRequestError(f"{lu.weight_name} has {row} rows, the update {lu.V.shape[0]}")
    return out


def weight_norm(where: HasCaches | EditContext, lu: Any) -> float:
    """‖W‖_F of the weight(s) ``lu`` writes, as they are now."""
    parts = [float(weight_out_in(m).detach().float().norm()) for _, m, _, _ in targets(where, lu)]
    return math.sqrt(sum(x * x for x in parts))


def update_unsafe_reason(where: HasCaches | EditContext, update: Any) -> str | None:
    """Why an update must not be applied (checked per layer): non-finite or too large."""
    n = len(get_module(where.model, where.hp.layers_module))  # type: ignore[arg-type]
    for lu in update.layers:
        check_layer(n, lu.layer)
        reason = unsafe(where.hp, lu.is_finite(), lu.norm, weight_norm(where, lu))
        if reason:
            return reason if len(update.layers) == 1 else f"layer {lu.layer}: {reason}"
    return None
