"""The caller-owned editing session: one model, its caches, apply / undo / revert.

An :class:`Editor` wraps one loaded model. It owns what is worth computing
once per model and layer (:class:`~rome.caches.Caches`), the stack of applied
steps with each weight as it was before, and each method's carried state
(folded by the method on apply, put back by undo and revert). A step is
computed by its method (:mod:`rome.methods`) on an
:class:`~rome.context.EditContext`; :meth:`Editor.edit` is the one entry:
it validates the requests (the rules and the tokenizer's length limit) and
resolves the method's settings. Nothing here is global: two editors on two
models share nothing.

(Just over 500 lines: the one owner of applied steps, whose weights may span
several modules, with their base copies, undo entries and carried state; the
rest are one-line entries its callers keep: caches, ROME's key modes.)
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import math
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn
from transformers import PreTrainedTokenizerBase

from . import covariance as cov
from .caches import Caches
from .context import (
    EditContext,
    check_layer,
    targets,
    unsafe,
    update_unsafe_reason,
    weight_norm,
)
from .errors import BadRequestError, NothingToUndoError, UnsafeUpdateError
from .hparams import MODES, EditHparams
from .methods import get_method
from .methods.base import LayerUpdate, Method, Update
from .methods.rome import (
    Rome,
    anchor_cache_key,
    compute_modes,
    norm_anchor,
    score_applied,
    update_of,
)
from .nethook import get_module
from .paths import cache_dir as default_cache_dir
from .paths import slug
from .progress import Progress
from .request import MAX_REQUEST_TOKENS, EditRequest
from .result import EditResult
from .update import add_delta, restore, weight_of

log = logging.getLogger(__name__)


@dataclass
class AppliedEdit:
    """One applied step (one edit or one batch), with each weight as it was before it.

    ``layer``/``weight_name``/``u``/``v`` describe the first edited layer (the only
    one for ROME, whose ``u``/``v`` are its rank-one factors); ``update`` holds every
    layer's factors, ``saved`` the weights as they were, per layer, for undo, and
    ``state_before`` every method's carried state as the step found it.
    """

    layer: int
    weight_name: str
    u: torch.Tensor
    v: torch.Tensor
    # per layer (the preset's weight) or per module name (another weight a step named)
    saved: dict[int | str, torch.Tensor] | None
    result: EditResult | None = None
    update: Update | None = None
    state_before: dict[str, Any] = field(default_factory=dict, repr=False)


class Editor:
    """Edits one model in place. Compute leaves the model as it was; apply changes it."""

    def __init__(
        self,
        model: nn.Module,
        tok: PreTrainedTokenizerBase,
        hparams: EditHparams,
        *,
        cache_dir: Path | None | str = "default",
        templates: Sequence[str] | None = None,
        model_key: str | None = None,
        keep_undo: bool = True,
    ):
        self.model = model
        self.tok = tok
        self._hp = hparams.validate()
        cache = default_cache_dir() if cache_dir == "default" else cache_dir
        self.cache: Path | None = Path(cache) if cache is not None else None
        self.model_key = slug(model_key or hparams.model)
        self.keep_undo = keep_undo
        explicit = templates if templates is not None else hparams.context_templates
        self.caches = Caches(
            model, tok, lambda: self._hp, self.cache, self.model_key, self.base_weights, explicit,
            weights_print=self._weights_print,
        )  # fmt: skip
        self._base: dict[int, torch.Tensor] = {}
        # weights other than the preset's that a step named (LayerUpdate.weight_name), by
        # module name: (layer, unedited weight); UltraEdit's gate/up projections
        self._other_base: dict[str, tuple[int, torch.Tensor]] = {}
        self._state: dict[str, Any] = {}  # each method's carried state, by method name
        self._initial: dict[str, Any] = {}  # the state a run started from (a saved one)
        self.applied: list[AppliedEdit] = []

    @property
    def hp(self) -> EditHparams:
        return self._hp

    @hp.setter
    def hp(self, value: EditHparams) -> None:
        self._hp = value

    # ----------------------------------------------------------- setup
    @property
    def n_layers(self) -> int:
        return len(get_module(self.model, self.hp.layers_module))  # type: ignore[arg-type]

    def check_layer(self, layer: int) -> int:
        return check_layer(self.n_layers, layer)

    def module(self, layer: int) -> nn.Module:
        return get_module(self.model, self.hp.weight_module(layer))

    def targets(self, lu: LayerUpdate) -> list[tuple[str | None, nn.Module, int, int]]:
        """Where ``lu`` writes (see :func:`rome.context.targets`)."""
        return targets(self, lu)

    def weight_norm(self, lu: LayerUpdate) -> float:
        """‖W‖_F of the weight(s) ``lu`` writes, as they are now."""
        return weight_norm(self, lu)

    def cached(self, key: Any, make: Any) -> Any:
        """A value computed once per editor (see :meth:`Caches.cached`)."""
        return self.caches.cached(key, make)

    def templates(self) -> list[str]:
        """ROME's context templates, sampled (once, cached) from the unedited model."""
        return self.caches.templates()

    def set_covariance(
        self, layer: int, matrix: torch.Tensor | None, description: str = ""
    ) -> None:
        """Use this C (``None``: identity) for ``layer`` instead of collected statistics."""
        self.caches.set_covariance(layer, matrix, description)

    def stats_file(self, layer: int, corpus: str | None = None) -> Path | None:
        return self.caches.stats_file(layer, corpus)

    def stats(
        self, layer: int, progress: Progress | None = None, corpus: str | None = None
    ) -> cov.SecondMoment:
        """Second moment for ``layer`` (read or collected once per editor)."""
        return self.caches.stats(layer, progress, corpus)

    def factor(self, layer: int, progress: Progress | None = None) -> cov.CovFactor:
        """The ``C⁻¹`` solver for ``layer``, computed once."""
        return self.caches.factor(layer, progress)

    def stats_meta(self, layer: int) -> cov.StatsMeta | None:
        return self.caches.stats_meta(layer)

    def prepare(self, layer: int | None = None, progress: Progress | None = None) -> None:
        """Compute templates and the covariance factor ahead of the first edit."""
        layer = self.check_layer(self.hp.layer if layer is None else layer)
        if progress:
            progress("context templates", 0, 1)
        self.templates()
        if progress:
            progress("context templates", 1, 1)
        self.factor(layer, progress)

    def variant(self, hparams: EditHparams) -> Editor:
        """An editor with other settings (a method's own preset) on the same model and the
        same edits: it shares the applied steps, the base weights and every method's
        carried state (an undo or revert on either is one on both), and keeps caches of
        its own (templates, factors, a method's values for its preset) but for what the
        caches share (:class:`~rome.caches.Shared`: statistics read once, the family's z)."""
        other = Editor(
            self.model, self.tok, hparams, cache_dir=self.cache, keep_undo=self.keep_undo
        )
        other.caches.shared = self.caches.shared
        other._base, other._other_base = self._base, self._other_base
        other._state, other.applied = self._state, self.applied
        other._initial = self._initial
        return other

    def context(self, method: str | Method, layer: int | None = None) -> EditContext:
        """What ``method`` computes on: this model, its caches and the method's state."""
        name = method if isinstance(method, str) else method.name
        hp = self.hp if layer is None else self.hp.replace(layer=self.check_layer(layer))
        return EditContext(self.model, self.tok, hp, self.caches, self._state.get(name))

    # ----------------------------------------------------------- ROME's key modes
    def compute(
        self,
        req: EditRequest,
        mode: str | None = None,
        layer: int | None = None,
        progress: Progress | None = None,
        fast: bool = True,
        probe_after: bool = True,
    ) -> EditResult:
        """ROME's update in one key mode (rome/methods/rome.py). The model is unchanged."""
        mode = mode or self.hp.default_mode
        ctx = self.context(Rome.name, layer)
        self.check_request(req)
        return compute_modes(ctx, req, [mode], progress, fast, probe_after)[mode]

    def compare(
        self,
        req: EditRequest,
        layer: int | None = None,
        progress: Progress | None = None,
        modes: Sequence[str] = MODES,
        fast: bool = True,
        probe_after: bool = True,
    ) -> dict[str, EditResult]:
        """ROME's update in every key mode, sharing templates, keys and v*. Nothing applied."""
        ctx = self.context(Rome.name, layer)
        self.check_request(req)
        return compute_modes(ctx, req, list(modes), progress, fast, probe_after)

    def score_applied(self, result: EditResult) -> EditResult:
        """Fill a ROME result's after-edit probabilities from the model as it is."""
        return score_applied(self.context(Rome.name), result)

    def norm_anchor(self, layer: int, progress: Progress | None = None) -> float:
        """ρ of norm-anchor scaling for ``layer``, solved on the unedited weights, cached."""
        return norm_anchor(self.context(Rome.name), layer, progress)

    def use_norm_anchor(self, layer: int, rho: float) -> None:
        """Take ρ as given (a resumed replay keeps the value its earlier edits used)."""
        self.caches.put(anchor_cache_key(layer), float(rho))

    def base_weights(
        self, layers: Iterable[int] | None = None
    ) -> contextlib.AbstractContextManager[None]:
        """Inside, every edited layer (or each of ``layers``) holds its unedited weight;
        after, each holds again what it held before, bit for bit, whatever was written
        inside (a replay on the same model gives the session's weights back this way)."""
        if layers is None:
            return self._all_base_weights()
        return self._held([self.check_layer(x) for x in layers])

    @contextlib.contextmanager
    def _held(self, layers: Sequence[int]) -> Iterator[None]:
        with contextlib.ExitStack() as stack:
            for layer in sorted(set(layers)):
                stack.enter_context(self._base_weights(layer, always=True))
            for name in self._others_at(layers):
                stack.enter_context(self._other_base_weight(name))
            yield

    @contextlib.contextmanager
    def _all_base_weights(self) -> Iterator[None]:
        """Inside, every edited layer holds its unedited weight (templates and statistics
        describe the model before any edit, even when first needed after some)."""
        with contextlib.ExitStack() as stack:
            for layer in list(self._base):
                stack.enter_context(self._base_weights(layer))
            for name in list(self._other_base):
                stack.enter_context(self._other_base_weight(name))
            yield

    @contextlib.contextmanager
    def _other_base_weight(self, name: str) -> Iterator[None]:
        """Inside, the other weight ``name`` holds its unedited value; the edited one after."""
        module = get_module(self.model, name)
        edited = weight_of(module).detach().to("cpu", copy=True)
        restore(module, self._other_base[name][1])
        try:
            yield
        finally:
            restore(module, edited)

    @contextlib.contextmanager
    def _base_weights(self, layer: int, always: bool = False) -> Iterator[None]:
        """Inside, ``layer`` holds its unedited weight; the edited one comes back after
        (``always``: an unedited layer's weight is kept and put back too)."""
        if layer not in self._base and not always:
            yield
            return
        module = self.module(layer)
        edited = weight_of(module).detach().to("cpu", copy=True)
        if layer in self._base:
            restore(module, self._base[layer])
        try:
            yield
        finally:
            restore(module, edited)

    def drift(self, layer: int) -> tuple[float, float]:
        """(‖W_n − W_0‖_F, ‖W_n‖_F / ‖W_0‖_F) of ``layer``'s edited weight."""
        w = weight_of(self.module(layer)).detach().float()
        base = self._base.get(layer)
        others = self._others_at([layer])
        if others:  # the weights a step named instead of (or beside) the preset's, together
            pairs = [(get_module(self.model, n), self._other_base[n][1]) for n in others]
            if base is not None:
                pairs.append((self.module(layer), base))
            sq = [
                (
                    float((weight_of(m).detach().float() - b.to(w.device).float()).norm()) ** 2,
                    float(weight_of(m).detach().float().norm()) ** 2,
                    float(b.float().norm()) ** 2,
                )
                for m, b in pairs
            ]
            n0 = math.sqrt(sum(x[2] for x in sq))
            ratio = math.sqrt(sum(x[1] for x in sq)) / n0 if n0 else math.inf
            return math.sqrt(sum(x[0] for x in sq)), ratio
        if base is None:
            return 0.0, 1.0
        w0 = base.to(w.device).float()
        n0 = float(w0.norm())
        return float((w - w0).norm()), float(w.norm()) / n0 if n0 else math.inf

    # ----------------------------------------------------------- apply / undo
    def apply(self, result: EditResult, force: bool = False) -> AppliedEdit:
        """Add a computed ROME update to the model. Refuses an unsafe one unless ``force``."""
        return self.apply_step(update_of(result), force=force)

    def apply_factors(
        self,
        layer: int,
        u: torch.Tensor,
        v: torch.Tensor,
        force: bool = False,
        result: EditResult | None = None,
    ) -> AppliedEdit:
        """Add ``v uᵀ`` at ``layer`` (a stored rank-one update, e.g. when a replay resumes)."""
        if result is not None:
            return self.apply_step(update_of(result), force=force)
        lu = LayerUpdate(layer, self.hp.weight_module(layer), u[None, :], v[:, None])
        return self.apply_step(Update(Rome.name, [lu], []), force=force)

    def update_unsafe_reason(self, update: Update) -> str | None:
        """Why an update must not be applied (checked per layer): non-finite or too large."""
        return update_unsafe_reason(self, update)

    def unsafe_reason(self, u: torch.Tensor, v: torch.Tensor, weight_norm: float) -> str | None:
        """Why a rank-one update must not be applied: non-finite, or far larger than the weight."""
        finite = bool(torch.isfinite(u).all() and torch.isfinite(v).all())
        return unsafe(self.hp, finite, float(u.norm() * v.norm()), weight_norm)

    def start_state(self, method: str, state: Any) -> None:
        """Start ``method`` from a carried state of its own (a saved one), before any step;
        revert goes back to it."""
        if self.applied:
            raise BadRequestError("a method's starting state is set before any edit")
        self._state[method] = state
        self._initial[method] = state

    def check_request(self, req: EditRequest) -> EditRequest:
        """``req`` if it follows the request rules and fits the length limit
        (:data:`~rome.request.MAX_REQUEST_TOKENS` of this model's tokens)."""
        req.validate()
        problem = req.length_problem(self.tok, MAX_REQUEST_TOKENS)
        if problem is not None:
            raise BadRequestError(problem)
        return req

    @property
    def method_state(self) -> dict[str, Any]:
        """Each method's carried state as the applied steps left it (read-only: a copy)."""
        return dict(self._state)

    def edit(
        self,
        requests: Sequence[EditRequest],
        method: str | None = None,
        *,
        progress: Progress | None = None,
        layer: int | None = None,
        while_applied: Callable[[], None] | None = None,
        **options: Any,
    ) -> Update:
        """Compute one step of ``method`` (default: the preset's) for ``requests``.

        The one validation of a request: its rules and the tokenizer's length limit.
        ``options`` override the method's settings (its ``Settings`` fields); ``layer``
        the preset's ``layer`` (a method that edits one); ``while_applied``: see
        :attr:`EditContext.while_applied`. The model is unchanged after.
        """
        m = get_method(method or self.hp.method)
        reqs = list(requests)
        if not reqs:
            raise BadRequestError(f"{m.name} needs at least one request")
        if len(reqs) > 1 and not m.capabilities.batched:
            raise BadRequestError(
                f"{m.name} edits one request at a time, not {len(reqs)}: "
                "use --batch-size 1 or a batched method"
            )
        for r in reqs:
            self.check_request(r)
        settings = m.settings(self.hp, options)
        ctx = self.context(m, layer)
        ctx.while_applied = while_applied
        return m.compute(ctx, reqs, settings, progress)

    def apply_step(self, update: Update, force: bool = False) -> AppliedEdit:
        """Add every layer's ``V U`` in order and fold the step into its method's state;
        refuses an unsafe update unless ``force``. Nothing is changed when it refuses.
        The step is one undo entry: undo puts back its weights and the state it found."""
        if not update.layers:
            raise BadRequestError("the update edits no layer")
        method = get_method(update.method)
        if not force:
            reason = self.update_unsafe_reason(update)
            if reason:
                raise UnsafeUpdateError(f"refused to apply: {reason}; nothing was changed")
        saved: dict[int | str, torch.Tensor] = {}
        for lu in update.layers:
            self.check_layer(lu.layer)
            where = self.targets(lu)
            for name, module, r0, r1 in where:
                key: int | str = lu.layer if name is None else name
                if name is None and lu.layer not in self._base:
                    self._base[lu.layer] = weight_of(module).detach().to("cpu", copy=True)
                if name is not None and name not in self._other_base:
                    w0 = weight_of(module).detach().to("cpu", copy=True)
                    self._other_base[name] = (lu.layer, w0)
                delta = lu.delta() if len(where) == 1 else lu.V[r0:r1].float() @ lu.U.float()
                before = add_delta(module, delta)
                if self.keep_undo and key not in saved:
                    saved[key] = before.to("cpu")
        first = update.layers[0]
        result = update.results[0] if len(update.results) == 1 else None
        entry = AppliedEdit(
            layer=first.layer,
            weight_name=first.weight_name,
            u=first.U[0],
            v=first.V[:, 0],
            saved=saved if self.keep_undo else None,
            result=result if isinstance(result, EditResult) else None,
            update=update,
            state_before=dict(self._state),
        )
        folded = method.fold(self._state.get(method.name), update)
        if folded is not None:
            self._state[method.name] = folded
        self.applied.append(entry)
        return entry

    #: the older name of :meth:`apply_step`
    apply_update = apply_step

    def undo(self) -> AppliedEdit:
        """Remove the last applied step: every weight it changed is restored bit for bit
        and every method's carried state is what it was before the step."""
        if not self.applied:
            raise NothingToUndoError("no applied edit to undo")
        entry = self.applied[-1]
        if entry.saved is None:
            raise NothingToUndoError("this editor keeps no undo copies (keep_undo=False)")
        for key, weight in entry.saved.items():
            restore(self._saved_module(key), weight)
        self._state.clear()  # in place: a variant editor shares it
        self._state.update(entry.state_before)
        self.applied.pop()
        return entry

    def revert_all(self) -> int:
        """Put every edited weight back to its base value and drop every carried state;
        returns how many steps were undone."""
        n = len(self.applied)
        for layer, base in self._base.items():
            restore(self.module(layer), base)
        for name, (_, base) in self._other_base.items():
            restore(get_module(self.model, name), base)
        self.applied.clear()
        self._state.clear()
        self._state.update(self._initial)
        return n

    def _saved_module(self, key: int | str) -> nn.Module:
        return self.module(key) if isinstance(key, int) else get_module(self.model, key)

    def _others_at(self, layers: Iterable[int]) -> list[str]:
        """The other weights edited at ``layers``, by name, sorted."""
        chosen = set(layers)
        return sorted(n for n, (layer, _) in self._other_base.items() if layer in chosen)

    @property
    def edited_layers(self) -> list[int]:
        """Every layer an applied update has touched since the editor was made."""
        return sorted(set(self._base) | {layer for layer, _ in self._other_base.values()})

    def _weights_print(self, layers: Iterable[int]) -> str:
        """The fingerprint of the model as it is now, for what is kept per state of the
        weights: the layers the applied steps wrote and ``layers`` (every other layer
        holds its base weight: undo and revert put them back bit for bit)."""
        written = {lu.layer for e in self.applied if e.update for lu in e.update.layers}
        return self.fingerprint([*written, *(e.layer for e in self.applied), *layers])

    def fingerprint(self, layers: Iterable[int] | None = None) -> str:
        """SHA-256 of the editable weights of ``layers`` (default: the preset's and edited)."""
        if layers is None:
            chosen = sorted({self.hp.layer, *self.edited_layers})
        else:
            chosen = sorted(set(layers))
        h = hashlib.sha256()
        for layer in chosen:
            w = weight_of(self.module(layer)).detach().to("cpu").contiguous()
            h.update(f"{layer}:{w.dtype}:{tuple(w.shape)}".encode())
            h.update(w.view(torch.uint8).numpy().tobytes())
            for name in self._others_at([layer]):  # none unless a step named another weight
                w = weight_of(get_module(self.model, name)).detach().to("cpu").contiguous()
                h.update(f"{layer}:{name}:{w.dtype}:{tuple(w.shape)}".encode())
                h.update(w.view(torch.uint8).numpy().tobytes())
        return h.hexdigest()
