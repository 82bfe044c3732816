"""ROME / r-ROME (kmeng01/rome): one request, one layer, a rank-one update per key mode.

Keys k(s) at the subject's last token of each templated prompt, k* their
average; v* by gradient steps (rome/vstar.py, rome/optimise.py), optionally
rescaled to the norm anchor ρ; the update ``(v* − W k_v) (C⁻¹k_u)ᵀ / (k_vᵀ C⁻¹ k_u)``
(rome/update.py) with (k_u, k_v) = (k*, k(s)) "original", (k*, k*) "rrome",
(k(s), k(s)) "prompt". The key modes share templates, keys, v* and the
factor: :func:`compute_modes` computes several at once (a Compare).
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from .. import anchor
from ..context import EditContext
from ..errors import BadRequestError
from ..hparams import MODES
from ..keys import average_keys, keys_at_subject
from ..optimise import optimise_targets
from ..progress import Progress
from ..request import EditRequest
from ..result import EditResult
from ..scoring import score_targets
from ..update import add_update, rank_one, restore, weight_out_in
from ..vstar import compute_v_star, resolve_autocast
from .base import Capabilities, LayerUpdate, MethodBase, Update, setting


@dataclass(frozen=True)
class RomeSettings:
    mode: str = setting(
        "rrome", "key mode: rrome, original or prompt", choices=MODES, legacy="default_mode"
    )
    fast: bool = setting(True, "the exact speed-ups (off: the reference computation)")
    probe_after: bool = setting(True, "score the edit with its update added for a moment")


class Rome(MethodBase):
    """The reference ROME / r-ROME update, one request per step."""

    name = "rome"
    summary = "one layer, rank one (key mode below)"
    capabilities = Capabilities(batched=False, key_modes=MODES, templates="rome")
    Settings = RomeSettings

    def layers(self, ctx: EditContext, settings: Any = None) -> list[int]:
        return [ctx.check_layer(ctx.hp.layer)]

    def compute(
        self,
        ctx: EditContext,
        requests: Sequence[EditRequest],
        settings: Any,
        progress: Progress | None = None,
    ) -> Update:
        if len(requests) != 1:
            raise BadRequestError(
                f"rome edits one request at a time, not {len(requests)}: "
                "use --batch-size 1 or a batched method"
            )
        s: RomeSettings = settings
        res = compute_modes(ctx, requests[0], [s.mode], progress, s.fast, s.probe_after)[s.mode]
        return update_of(res)


def update_of(res: EditResult) -> Update:
    """An :class:`Update` holding one ROME :class:`~rome.result.EditResult`."""
    lu = LayerUpdate(res.layer, res.weight_name, res.u[None, :], res.v[:, None])
    return Update(
        method=Rome.name,
        layers=[lu],
        records=[res.to_dict(factors=False)],
        options={"mode": res.mode},
        results=[res],
        unsafe_reason=res.unsafe_reason,
        mode=res.mode,
    )


@dataclass
class Probe:
    p_new: float
    p_true: float | None
    p_new_templated: float


def probe(
    ctx: EditContext,
    req: EditRequest,
    templates: Sequence[str],
    first: torch.Tensor | None = None,
) -> Probe:
    """p(target_new), p(target_true) on the bare prompt; mean p(new) over prefixed ones.
    ``first``: log p(target_new) per template row, already computed (v*'s step 0)."""
    bare = req.text
    if first is not None:
        p = first.double().exp().tolist()
        p_true = None
        if req.true_object is not None:  # none for an end-of-text target_true (zsRE)
            p_true = score_targets(ctx.model, ctx.tok, [bare], [req.true_object])[0].prob
        return Probe(p[0], p_true, sum(p[1:]) / (len(p) - 1) if len(p) > 1 else p[0])
    prefixed = [t.format(req.prompt).replace("{}", req.subject, 1) for t in templates[1:]]
    prompts = [bare, *prefixed]
    targets = [req.target_new] * len(prompts)
    true = req.true_object  # None for an end-of-text target_true (zsRE): no p(true)
    if true is not None:
        prompts.append(bare)
        targets.append(true)
    scores = score_targets(ctx.model, ctx.tok, prompts, targets)
    p_true = scores[-1].prob if true is not None else None
    templ = [s.prob for s in scores[1 : 1 + len(prefixed)]]
    return Probe(scores[0].prob, p_true, sum(templ) / len(templ) if templ else scores[0].prob)


def score_applied(ctx: EditContext, result: EditResult) -> EditResult:
    """Fill ``result``'s after-edit probabilities from the model as it is (its update
    applied): what compute's trial measures, on the same weights, without the trial."""
    after = probe(ctx, result.request, ctx.caches.templates())
    result.p_new_after = after.p_new
    result.p_true_after = after.p_true
    result.p_new_after_templated = after.p_new_templated
    return result


@dataclass
class _Shared:
    """What the key modes of one request share."""

    layer: int
    name: str
    templates: list[str]
    k_s: torch.Tensor
    k_star: torch.Tensor
    before: Probe
    vs: Any
    v_target: torch.Tensor
    rho: float | None
    reuse: bool
    weight_norm: float
    covariance: str


def compute_modes(
    ctx: EditContext,
    req: EditRequest,
    modes: Sequence[str],
    progress: Progress | None = None,
    fast: bool = True,
    probe_after: bool = True,
) -> dict[str, EditResult]:
    """The update in each of ``modes``, sharing templates, keys and v*. Nothing applied.

    ``fast=False`` switches off the speed-ups (stop-at-layer keys, upper-layer
    v* steps, logits only where read, frozen parameters): for benchmarks.
    ``probe_after=False`` skips the trial that scores the edit with the update
    added for a moment (the ``*_after`` fields are NaN until :func:`score_applied`
    fills them once the update is applied for real).
    """
    for m in modes:
        if m not in MODES:
            raise BadRequestError(f"unknown key mode {m!r}: use one of {', '.join(MODES)}")
    req.validate()  # returns at once for a request validated at the caller's boundary
    timings: dict[str, float] = {}
    clock = [time.perf_counter()]

    def lap(name: str, into: dict[str, float] = timings) -> None:
        now = time.perf_counter()
        into[name] = into.get(name, 0.0) + now - clock[0]
        clock[0] = now

    sh = _shared(ctx, req, progress, fast, lap)
    module = ctx.module(sh.layer)
    factor = ctx.caches.factor(sh.layer)
    results: dict[str, EditResult] = {}
    for mode in modes:
        k_u, k_v = {
            "original": (sh.k_star, sh.k_s),
            "rrome": (sh.k_star, sh.k_star),
            "prompt": (sh.k_s, sh.k_s),
        }[mode]
        own = dict(timings)  # shared phases, then this mode's own update and scoring
        r1 = rank_one(module, factor, k_u, k_v, sh.v_target)
        lap("update", own)
        finite = bool(torch.isfinite(r1.u).all() and torch.isfinite(r1.v).all())
        if finite and probe_after:
            saved = add_update(module, r1.u, r1.v)
            try:
                after = probe(ctx, req, sh.templates)
                if ctx.while_applied is not None:
                    ctx.while_applied()
            finally:
                restore(module, saved)
        else:
            after = Probe(math.nan, math.nan, math.nan)
        lap("scoring", own)
        res = _result(ctx, req, mode, sh, r1, k_u, k_v, after, own)
        res.unsafe_reason = _rank_one_unsafe(ctx, res.u, res.v, sh.weight_norm)
        results[mode] = res
    return results


def _shared(
    ctx: EditContext, req: EditRequest, progress: Progress | None, fast: bool, lap: Any
) -> _Shared:
    """Templates, factor, keys, the before-probe and v* (with its anchor), timed."""
    hp, caches = ctx.hp, ctx.caches
    layer = ctx.check_layer(hp.layer)
    if progress and not caches.has_templates:
        progress("context templates", 0, 1)
    templates = caches.templates()
    lap("templates")
    factor = caches.factor(layer, progress)
    lap("covariance")
    name = hp.weight_module(layer)
    step_cb = (lambda d, t: progress("v*", d, t)) if progress else None
    reuse = fast and hp.v_prefix_reuse
    keys = first = None  # with reuse: the keys and p(target) before, from v*'s step 0
    if reuse:
        vs = optimise_targets(ctx.model, ctx.tok, hp, [req], [templates], layer, on_step=step_cb)[0]
        lap("v_star")
        if vs.keys is not None:  # None under bf16 autocast: the float32 passes below
            keys, first = vs.keys.float(), vs.row_logprob
    if keys is None:
        prompts = [t.format(req.prompt) for t in templates]
        keys = keys_at_subject(ctx.model, ctx.tok, name, prompts, req.subject, stop=fast)
    k_s = keys[0]
    k_star = average_keys(keys, hp.key_averaging)
    lap("keys")
    before = probe(ctx, req, templates, first)
    lap("scoring")
    if not reuse:
        vs = compute_v_star(ctx.model, ctx.tok, hp, req, templates, layer, step_cb, fast)
    lap("v_star")
    rho = norm_anchor(ctx, layer, progress) if hp.v_norm_anchor else None
    v_target = vs.v_star if rho is None else anchor.anchored(vs.v_star, rho)
    lap("norm_anchor")
    weight_norm = float(weight_out_in(ctx.module(layer)).detach().float().norm())
    return _Shared(
        layer, name, templates, k_s, k_star, before, vs, v_target, rho, reuse, weight_norm,
        factor.description,
    )  # fmt: skip


def _result(
    ctx: EditContext,
    req: EditRequest,
    mode: str,
    sh: _Shared,
    r1: Any,
    k_u: torch.Tensor,
    k_v: torch.Tensor,
    after: Probe,
    timings: dict[str, float],
) -> EditResult:
    hp, vs = ctx.hp, sh.vs
    return EditResult(
        request=req,
        mode=mode,
        layer=sh.layer,
        weight_name=sh.name,
        u=r1.u.cpu(),
        v=r1.v.cpu(),
        update_norm=r1.norm,
        weight_norm=sh.weight_norm,
        denominator=r1.denominator,
        k_star_norm=float(sh.k_star.norm()),
        k_s_norm=float(sh.k_s.norm()),
        cos_kstar_ks=float(torch.nn.functional.cosine_similarity(sh.k_star, sh.k_s, dim=0)),
        v_star_trace=vs.trace,
        v_init_norm=float(vs.v_init.norm()),
        v_star_norm=float(sh.v_target.norm()),
        p_new_before=sh.before.p_new,
        p_new_after=after.p_new,
        p_true_before=sh.before.p_true,
        p_true_after=after.p_true,
        p_new_before_templated=sh.before.p_new_templated,
        p_new_after_templated=after.p_new_templated,
        key_averaging=hp.key_averaging,
        covariance=sh.covariance,
        n_templates=len(sh.templates),
        timings=timings,
        model=hp.name,
        k_u=k_u.cpu(),
        k_v=k_v.cpu(),
        v_star=sh.v_target.cpu(),
        v_stop=hp.v_stop,
        v_prefix_reuse=sh.reuse,
        v_batch=1,
        v_length_buckets=sh.reuse and hp.v_length_buckets,
        v_autocast=resolve_autocast(hp.v_autocast, vs.v_star.device),
        norm_anchor=sh.rho,
        v_star_norm_raw=float(vs.v_star.norm()) if sh.rho is not None else None,
    )


def _rank_one_unsafe(
    ctx: EditContext, u: torch.Tensor, v: torch.Tensor, weight_norm: float
) -> str | None:
    from ..context import unsafe

    finite = bool(torch.isfinite(u).all() and torch.isfinite(v).all())
    return unsafe(ctx.hp, finite, float(u.norm() * v.norm()), weight_norm)


# ---------------------------------------------------------------- norm anchor (NAS)


def anchor_cache_key(layer: int) -> tuple[str, str, int]:
    return (Rome.name, "norm_anchor", layer)


def norm_anchor(ctx: EditContext, layer: int, progress: Progress | None = None) -> float:
    """ρ of norm-anchor scaling for ``layer``, solved on the unedited weights, cached."""
    caches = ctx.caches

    def make() -> float:
        templates = caches.templates()
        hp = ctx.hp.replace(v_norm_anchor=False)
        requests = anchor.calibration_requests(hp.v_norm_anchor_samples)
        fields = {
            k: v
            for k, v in hp.to_dict().items()
            # the exact speed-ups are not part of the key
            if (k.startswith("v_") and k not in ("v_prefix_reuse", "v_length_buckets"))
            or k in ("kl_factor", "clamp_norm_factor", "fact_token")
        }
        fields.update(layer=layer, templates=templates, requests=[r.to_dict() for r in requests])
        path: Path | None = None
        if caches.cache is not None:
            name = f"{hp.weight_module(layer)}_{anchor.anchor_key(fields)}.json"
            path = caches.cache / "anchors" / caches.model_key / name

        def solve(req: EditRequest) -> torch.Tensor:
            return compute_v_star(ctx.model, ctx.tok, hp, req, templates, layer).v_star

        prog = (lambda d, t: progress("norm anchor", d, t)) if progress else None
        with caches.base_weights():
            return anchor.reference_norm(solve, requests, path, prog)

    return float(caches.cached(anchor_cache_key(layer), make))
