"""The caller-owned editing session: caches, compute / compare / apply / undo.

An :class:`Editor` wraps one loaded model. It holds what is worth computing
once per model and layer (context templates, the covariance factor) and the
stack of applied edits. Nothing here is global: two editors on two models
share nothing.

Over 500 lines on purpose: the one owner of edits (caches, compute, apply /
undo / revert of multi-layer rank-k steps, drift, fingerprints) keeps them
in one class; ROME's own arithmetic lives in update.py, keys.py and vstar.py,
the other methods in rome/methods/.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import math
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn
from transformers import PreTrainedTokenizerBase

from . import anchor, bundle
from . import covariance as cov
from .errors import BadRequestError, LayerOutOfRangeError, NothingToUndoError, UnsafeUpdateError
from .hparams import MODES, EditHparams
from .keys import average_keys, keys_at_subject
from .methods.base import LayerUpdate, Update
from .nethook import get_module
from .optimise import optimise_targets
from .paths import cache_dir as default_cache_dir
from .paths import slug
from .progress import Progress
from .request import EditRequest
from .result import EditResult
from .scoring import score_targets
from .templates import cached_templates, normalise_templates
from .update import add_delta, add_update, rank_one, restore, weight_of, weight_out_in
from .vstar import compute_v_star, resolve_autocast

log = logging.getLogger(__name__)


@dataclass
class AppliedEdit:
    """One applied step (one edit or one batch), with each weight as it was before it.

    ``layer``/``weight_name``/``u``/``v`` describe the first edited layer (the only
    one for ROME, whose ``u``/``v`` are its rank-one factors); ``update`` holds every
    layer's factors and ``saved`` the weights as they were, per layer, for undo.
    """

    layer: int
    weight_name: str
    u: torch.Tensor
    v: torch.Tensor
    # per layer (the preset's weight) or per module name (another weight a step named)
    saved: dict[int | str, torch.Tensor] | None
    result: EditResult | None = None
    update: Update | None = None


@dataclass
class _Probe:
    p_new: float
    p_true: float | None
    p_new_templated: float


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
        self.hp = hparams.validate()
        self.cache = default_cache_dir() if cache_dir == "default" else cache_dir
        self.model_key = slug(model_key or hparams.model)
        self.keep_undo = keep_undo
        explicit = templates if templates is not None else hparams.context_templates
        self._templates = normalise_templates(explicit) if explicit is not None else None
        self._factors: dict[int, cov.CovFactor] = {}
        self._stats_meta: dict[int, cov.StatsMeta | None] = {}
        self._base: dict[int, torch.Tensor] = {}
        # weights other than the preset's that a step named (LayerUpdate.weight_name), by
        # module name: (layer, unedited weight); UltraEdit's gate/up projections
        self._other_base: dict[str, tuple[int, torch.Tensor]] = {}
        self._anchors: dict[int, float] = {}
        self._cached: dict[Any, Any] = {}
        self.method_state: dict[str, Any] = {}  # each method's carried state, by method name
        self.applied: list[AppliedEdit] = []

    # ----------------------------------------------------------- setup
    @property
    def n_layers(self) -> int:
        return len(get_module(self.model, self.hp.layers_module))  # type: ignore[arg-type]

    def check_layer(self, layer: int) -> int:
        if not 0 <= layer < self.n_layers:
            raise LayerOutOfRangeError(
                f"layer {layer} is out of range: the model has layers 0..{self.n_layers - 1}"
            )
        return layer

    def module(self, layer: int) -> nn.Module:
        return get_module(self.model, self.hp.weight_module(layer))

    def weight_norm(self, lu: LayerUpdate) -> float:
        """‖W‖_F of the weight(s) ``lu`` writes, as they are now."""
        parts = [float(weight_out_in(m).detach().float().norm()) for _, m, _, _ in self.targets(lu)]
        return math.sqrt(sum(x * x for x in parts))

    def targets(self, lu: LayerUpdate) -> list[tuple[str | None, nn.Module, int, int]]:
        """Where ``lu`` writes: (module name, or None for the preset's weight; module;
        its rows of ``V``). ``weight_name`` may join several modules that read the same
        input with ``+`` (their (out, in) weights stacked by rows, in that order)."""
        names = [n.removesuffix(".weight") for n in lu.weight_name.split("+")]
        if names == [self.hp.weight_module(lu.layer)]:
            return [(None, self.module(lu.layer), 0, int(lu.V.shape[0]))]
        out: list[tuple[str | None, nn.Module, int, int]] = []
        row = 0
        for name in names:
            try:
                module = get_module(self.model, name)
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

    def cached(self, key: Any, make: Callable[[], Any]) -> Any:
        """A value computed once per editor (a method's templates, projectors...)."""
        if key not in self._cached:
            self._cached[key] = make()
        return self._cached[key]

    def templates(self) -> list[str]:
        """The context templates, sampled (once, cached) from the unedited model."""
        if self._templates is None:
            with self._all_base_weights():
                self._templates = cached_templates(
                    self.model,
                    self.tok,
                    self.model_key,
                    self.hp.context_template_length_params,
                    self.hp.template_seed,
                    self.cache / "templates" if isinstance(self.cache, Path) else None,
                    shipped=bundle.bundled_templates(
                        self.model_key,
                        "rome",
                        bundle.rome_template_settings(
                            self.hp.context_template_length_params, self.hp.template_seed
                        ),
                    ),
                )
        return self._templates

    def set_covariance(
        self, layer: int, matrix: torch.Tensor | None, description: str = ""
    ) -> None:
        """Use this C (``None``: identity) for ``layer`` instead of collected statistics."""
        self._factors[layer] = cov.CovFactor(matrix, self.hp.mom2_ridge, description)
        self._stats_meta[layer] = None

    def stats_file(self, layer: int, corpus: str | None = None) -> Path | None:
        if not isinstance(self.cache, Path):
            return None
        return cov.stats_path(
            self.cache,
            self.model_key,
            corpus or self.hp.mom2_dataset,
            self.hp.weight_module(layer),
            self.hp.mom2_dtype,
            self.hp.mom2_n_samples,
        )

    def stats(
        self, layer: int, progress: Progress | None = None, corpus: str | None = None
    ) -> cov.SecondMoment:
        """Second moment for ``layer``: from the disk cache, else collected (on the
        unedited weights, whatever has been applied since) and cached."""
        path = self.stats_file(layer, corpus)
        width = cov.expected_width(self.model, self.hp.weight_module(layer))
        if path is not None and path.is_file():
            return cov.load_stats(path, expected_dim=width)
        shipped = self._bundled_stats(layer, width) if corpus is None else None
        if shipped is not None:
            if progress:
                progress("statistics (shipped with the package)", 1, 1)
            return shipped
        prog = (lambda d, t: progress("covariance", d, t)) if progress else None
        with self._all_base_weights():
            stats = self._collect_stats(layer, prog, corpus)
        if path is not None:
            cov.save_stats(path, stats)
        return stats

    def _bundled_stats(self, layer: int, width: int) -> cov.SecondMoment | None:
        """The package's statistics for this model and layer, made with this preset's
        corpus settings (rome/bundled), else ``None``."""
        hp = self.hp
        settings = bundle.stats_settings(
            hp.mom2_dataset, hp.mom2_n_samples, hp.mom2_max_len, hp.mom2_dtype, hp.template_seed
        )
        return bundle.load_bundled_stats(self.model_key, hp.weight_module(layer), settings, width)

    def _collect_stats(
        self, layer: int, prog: Callable[[int, int], None] | None, corpus: str | None
    ) -> cov.SecondMoment:
        return cov.compute_stats(
            self.model,
            self.tok,
            self.model_key,
            layer,
            self.hp.weight_module(layer),
            corpus or self.hp.mom2_dataset,
            self.hp.mom2_n_samples,
            self.hp.mom2_max_len,
            self.hp.mom2_dtype,
            self.hp.template_seed,
            prog,
            self.cache / "stats" / self.model_key if isinstance(self.cache, Path) else None,
        )

    def factor(self, layer: int, progress: Progress | None = None) -> cov.CovFactor:
        """The ``C⁻¹`` solver for ``layer``, computed once."""
        if layer not in self._factors:
            if self.hp.covariance == "identity":
                self.set_covariance(layer, None, "identity")
            else:
                stats = self.stats(layer, progress)
                m = stats.meta
                desc = f"{m.corpus}: {m.n_texts} texts, {m.n_tokens} tokens"
                self._factors[layer] = cov.CovFactor(stats.matrix, self.hp.mom2_ridge, desc)
                self._stats_meta[layer] = m
        return self._factors[layer]

    def prepare(self, layer: int | None = None, progress: Progress | None = None) -> None:
        """Compute templates and the covariance factor ahead of the first edit."""
        layer = self.check_layer(self.hp.layer if layer is None else layer)
        if progress:
            progress("context templates", 0, 1)
        self.templates()
        if progress:
            progress("context templates", 1, 1)
        self.factor(layer, progress)

    # ----------------------------------------------------------- compute
    def compute(
        self,
        req: EditRequest,
        mode: str | None = None,
        layer: int | None = None,
        progress: Progress | None = None,
        fast: bool = True,
        probe_after: bool = True,
    ) -> EditResult:
        """The update for one key mode. The model is unchanged afterwards.

        ``fast=False`` switches off the speed-ups (stop-at-layer keys, upper-layer
        v* steps, logits only where read, frozen parameters): for benchmarks.
        ``probe_after=False`` skips the trial that scores the edit with the update
        added for a moment (the ``*_after`` fields are NaN until
        :meth:`score_applied` fills them once the update is applied for real).
        """
        mode = mode or self.hp.default_mode
        return self._compute(req, [mode], layer, progress, fast, probe_after)[mode]

    def compare(
        self,
        req: EditRequest,
        layer: int | None = None,
        progress: Progress | None = None,
        modes: Sequence[str] = MODES,
        fast: bool = True,
        probe_after: bool = True,
    ) -> dict[str, EditResult]:
        """The update in every key mode, sharing templates, keys and v*. Nothing applied."""
        return self._compute(req, list(modes), layer, progress, fast, probe_after)

    def _compute(
        self,
        req: EditRequest,
        modes: list[str],
        layer: int | None,
        progress: Progress | None,
        fast: bool = True,
        probe_after: bool = True,
    ) -> dict[str, EditResult]:
        for m in modes:
            if m not in MODES:
                raise BadRequestError(f"unknown key mode {m!r}: use one of {', '.join(MODES)}")
        req.validate()  # returns at once for a request validated at the caller's boundary
        layer = self.check_layer(self.hp.layer if layer is None else layer)
        timings: dict[str, float] = {}
        clock = time.perf_counter()

        def lap(name: str, into: dict[str, float] = timings) -> None:
            nonlocal clock
            now = time.perf_counter()
            into[name] = into.get(name, 0.0) + now - clock
            clock = now

        if progress and self._templates is None:
            progress("context templates", 0, 1)
        templates = self.templates()
        lap("templates")
        factor = self.factor(layer, progress)
        lap("covariance")
        name = self.hp.weight_module(layer)
        step_cb = (lambda d, t: progress("v*", d, t)) if progress else None
        reuse = fast and self.hp.v_prefix_reuse
        keys = first = None  # with reuse: the keys and p(target) before, from v*'s step 0
        if reuse:
            vs = optimise_targets(
                self.model, self.tok, self.hp, [req], [templates], layer, on_step=step_cb
            )[0]
            lap("v_star")
            if vs.keys is not None:  # None under bf16 autocast: the float32 passes below
                keys, first = vs.keys.float(), vs.row_logprob
        if keys is None:
            prompts = [t.format(req.prompt) for t in templates]
            keys = keys_at_subject(self.model, self.tok, name, prompts, req.subject, stop=fast)
        k_s = keys[0]
        k_star = average_keys(keys, self.hp.key_averaging)
        lap("keys")
        before = self._probe(req, templates, first)
        lap("scoring")
        if not reuse:
            vs = compute_v_star(self.model, self.tok, self.hp, req, templates, layer, step_cb, fast)
        lap("v_star")
        rho = self.norm_anchor(layer, progress) if self.hp.v_norm_anchor else None
        v_target = vs.v_star if rho is None else anchor.anchored(vs.v_star, rho)
        lap("norm_anchor")
        module = self.module(layer)
        weight_norm = float(weight_out_in(module).detach().float().norm())
        results: dict[str, EditResult] = {}
        for mode in modes:
            k_u, k_v = {"original": (k_star, k_s), "rrome": (k_star, k_star), "prompt": (k_s, k_s)}[
                mode
            ]
            own = dict(timings)  # shared phases, then this mode's own update and scoring
            r1 = rank_one(module, factor, k_u, k_v, v_target)
            lap("update", own)
            finite = bool(torch.isfinite(r1.u).all() and torch.isfinite(r1.v).all())
            if finite and probe_after:
                saved = add_update(module, r1.u, r1.v)
                try:
                    after = self._probe(req, templates)
                finally:
                    restore(module, saved)
            else:
                after = _Probe(math.nan, math.nan, math.nan)
            lap("scoring", own)
            res = EditResult(
                request=req,
                mode=mode,
                layer=layer,
                weight_name=name,
                u=r1.u.cpu(),
                v=r1.v.cpu(),
                update_norm=r1.norm,
                weight_norm=weight_norm,
                denominator=r1.denominator,
                k_star_norm=float(k_star.norm()),
                k_s_norm=float(k_s.norm()),
                cos_kstar_ks=float(torch.nn.functional.cosine_similarity(k_star, k_s, dim=0)),
                v_star_trace=vs.trace,
                v_init_norm=float(vs.v_init.norm()),
                v_star_norm=float(v_target.norm()),
                p_new_before=before.p_new,
                p_new_after=after.p_new,
                p_true_before=before.p_true,
                p_true_after=after.p_true,
                p_new_before_templated=before.p_new_templated,
                p_new_after_templated=after.p_new_templated,
                key_averaging=self.hp.key_averaging,
                covariance=factor.description,
                n_templates=len(templates),
                timings=own,
                model=self.hp.name,
                k_u=k_u.cpu(),
                k_v=k_v.cpu(),
                v_star=v_target.cpu(),
                v_stop=self.hp.v_stop,
                v_prefix_reuse=reuse,
                v_batch=1,
                v_length_buckets=reuse and self.hp.v_length_buckets,
                v_autocast=resolve_autocast(self.hp.v_autocast, vs.v_star.device),
                norm_anchor=rho,
                v_star_norm_raw=float(vs.v_star.norm()) if rho is not None else None,
            )
            res.unsafe_reason = self.unsafe_reason(res.u, res.v, weight_norm)
            results[mode] = res
        return results

    # ----------------------------------------------------------- norm anchor, drift
    def norm_anchor(self, layer: int, progress: Progress | None = None) -> float:
        """ρ of norm-anchor scaling for ``layer``, solved on the unedited weights, cached."""
        if layer not in self._anchors:
            templates = self.templates()
            hp = self.hp.replace(v_norm_anchor=False)
            requests = anchor.calibration_requests(hp.v_norm_anchor_samples)
            fields = {
                k: v
                for k, v in hp.to_dict().items()
                # the exact speed-ups are not part of the key
                if (k.startswith("v_") and k not in ("v_prefix_reuse", "v_length_buckets"))
                or k in ("kl_factor", "clamp_norm_factor", "fact_token")
            }
            fields.update(
                layer=layer,
                templates=templates,
                requests=[r.to_dict() for r in requests],
            )
            path = None
            if isinstance(self.cache, Path):
                name = f"{hp.weight_module(layer)}_{anchor.anchor_key(fields)}.json"
                path = self.cache / "anchors" / self.model_key / name

            def solve(req: EditRequest) -> torch.Tensor:
                return compute_v_star(self.model, self.tok, hp, req, templates, layer).v_star

            prog = (lambda d, t: progress("norm anchor", d, t)) if progress else None
            with self._base_weights(layer):
                self._anchors[layer] = anchor.reference_norm(solve, requests, path, prog)
        return self._anchors[layer]

    def use_norm_anchor(self, layer: int, rho: float) -> None:
        """Take ρ as given (a resumed replay keeps the value its earlier edits used)."""
        self._anchors[layer] = float(rho)

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

    def _probe(
        self, req: EditRequest, templates: Sequence[str], first: torch.Tensor | None = None
    ) -> _Probe:
        """p(target_new), p(target_true) on the bare prompt; mean p(new) over prefixed ones.
        ``first``: log p(target_new) per template row, already computed (v*'s step 0)."""
        bare = req.text
        if first is not None:
            p = first.double().exp().tolist()
            p_true = None
            if req.true_object is not None:  # none for an end-of-text target_true (zsRE)
                p_true = score_targets(self.model, self.tok, [bare], [req.true_object])[0].prob
            return _Probe(p[0], p_true, sum(p[1:]) / (len(p) - 1) if len(p) > 1 else p[0])
        prefixed = [t.format(req.prompt).replace("{}", req.subject, 1) for t in templates[1:]]
        prompts = [bare, *prefixed]
        targets = [req.target_new] * len(prompts)
        true = req.true_object  # None for an end-of-text target_true (zsRE): no p(true)
        if true is not None:
            prompts.append(bare)
            targets.append(true)
        scores = score_targets(self.model, self.tok, prompts, targets)
        p_true = scores[-1].prob if true is not None else None
        templ = [s.prob for s in scores[1 : 1 + len(prefixed)]]
        return _Probe(scores[0].prob, p_true, sum(templ) / len(templ) if templ else scores[0].prob)

    def score_applied(self, result: EditResult) -> EditResult:
        """Fill ``result``'s after-edit probabilities from the model as it is (its update
        applied): what compute's trial measures, on the same weights, without the trial."""
        after = self._probe(result.request, self.templates())
        result.p_new_after = after.p_new
        result.p_true_after = after.p_true
        result.p_new_after_templated = after.p_new_templated
        return result

    def unsafe_reason(self, u: torch.Tensor, v: torch.Tensor, weight_norm: float) -> str | None:
        """Why a rank-one update must not be applied: non-finite, or far larger than the weight."""
        finite = bool(torch.isfinite(u).all() and torch.isfinite(v).all())
        return self._unsafe(finite, float(u.norm() * v.norm()), weight_norm)

    def _unsafe(self, finite: bool, norm: float, weight_norm: float) -> str | None:
        if not finite:
            return "the update has NaN or infinite entries"
        ratio = norm / weight_norm if weight_norm else math.inf
        if ratio > self.hp.max_update_ratio:
            return (
                f"the update norm is {ratio:.1f}x the weight's norm "
                f"(limit {self.hp.max_update_ratio:g}, preset field max_update_ratio)"
            )
        return None

    # ----------------------------------------------------------- apply / undo
    def apply(self, result: EditResult, force: bool = False) -> AppliedEdit:
        """Add a computed update to the model. Refuses an unsafe one unless ``force``."""
        return self.apply_factors(result.layer, result.u, result.v, force=force, result=result)

    def apply_factors(
        self,
        layer: int,
        u: torch.Tensor,
        v: torch.Tensor,
        force: bool = False,
        result: EditResult | None = None,
    ) -> AppliedEdit:
        """Add ``v uᵀ`` at ``layer`` (a stored update, e.g. when a replay resumes)."""
        lu = LayerUpdate(layer, self.hp.weight_module(layer), u[None, :], v[:, None])
        records = [result.to_dict(factors=False)] if result is not None else []
        upd = Update("rome", [lu], records, results=[result] if result is not None else [])
        return self.apply_update(upd, force=force)

    def update_unsafe_reason(self, update: Update) -> str | None:
        """Why an update must not be applied (checked per layer): non-finite or too large."""
        for lu in update.layers:
            self.check_layer(lu.layer)
            reason = self._unsafe(lu.is_finite(), lu.norm, self.weight_norm(lu))
            if reason:
                return reason if len(update.layers) == 1 else f"layer {lu.layer}: {reason}"
        return None

    def apply_update(self, update: Update, force: bool = False) -> AppliedEdit:
        """Add every layer's ``V U`` in order; refuses an unsafe update unless ``force``.

        Nothing is changed when it refuses. The step is one undo entry.
        """
        if not update.layers:
            raise BadRequestError("the update edits no layer")
        if not force:
            reason = self.update_unsafe_reason(update)
            if reason:
                raise UnsafeUpdateError(f"refused to apply: {reason}; nothing was changed")
        saved: dict[int | str, torch.Tensor] = {}
        for lu in update.layers:
            self.check_layer(lu.layer)
            targets = self.targets(lu)
            for name, module, r0, r1 in targets:
                key: int | str = lu.layer if name is None else name
                if name is None and lu.layer not in self._base:
                    self._base[lu.layer] = weight_of(module).detach().to("cpu", copy=True)
                if name is not None and name not in self._other_base:
                    w0 = weight_of(module).detach().to("cpu", copy=True)
                    self._other_base[name] = (lu.layer, w0)
                delta = lu.delta() if len(targets) == 1 else lu.V[r0:r1].float() @ lu.U.float()
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
        )
        self.applied.append(entry)
        return entry

    def undo(self) -> AppliedEdit:
        """Remove the last applied step; every weight it changed is restored bit for bit."""
        if not self.applied:
            raise NothingToUndoError("no applied edit to undo")
        entry = self.applied[-1]
        if entry.saved is None:
            raise NothingToUndoError("this editor keeps no undo copies (keep_undo=False)")
        for key, weight in entry.saved.items():
            restore(self._saved_module(key), weight)
        self.applied.pop()
        return entry

    def revert_all(self) -> int:
        """Put every edited weight back to its base value; returns how many edits were undone."""
        n = len(self.applied)
        for layer, base in self._base.items():
            restore(self.module(layer), base)
        for name, (_, base) in self._other_base.items():
            restore(get_module(self.model, name), base)
        self.applied.clear()
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

    def stats_meta(self, layer: int) -> cov.StatsMeta | None:
        return self._stats_meta.get(layer)

    # ----------------------------------------------------------- methods
    def edit(self, requests: Sequence[EditRequest], method: str = "rome", **options: Any) -> Update:
        """Compute one step of ``method`` for ``requests``; the model is unchanged after."""
        from .methods import get_method

        for r in requests:
            r.validate()
        return get_method(method).compute(self, list(requests), options)

    def apply_step(self, update: Update, force: bool = False) -> AppliedEdit:
        """Apply ``update`` and fold it into its method's carried state."""
        from .methods import get_method

        entry = self.apply_update(update, force=force)
        get_method(update.method).after_apply(self, update)
        return entry
