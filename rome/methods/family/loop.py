"""The layer loop every method of the family shares (FAMILY.md, "Layer loop").

For edited layers ℓ₁ < … < ℓₘ and layer index i: keys K_i on the current
model (earlier layers already written), cur_z = block-ℓₘ output at the
subject's last token of the bare prompt, resid = (z − cur_z)/(m − i), the
method's solve, and the write (:func:`rome.update.add_delta` of
``LayerUpdate.delta()``, bit-identical to what ``Editor.apply_update`` later
does with the same factors) before the next layer's keys. The weights are
restored at the end: computing leaves the model as it was.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from ...context import EditContext, HasCaches
from ...errors import BadRequestError
from ...hparams import V_STOPS
from ...optimise import ZStop
from ...progress import Progress
from ...request import EditRequest
from ...scoring import probe_requests
from ...update import add_delta, restore, weight_out_in
from ..base import Capabilities, LayerUpdate, MethodBase, Update, setting, settings_dict
from .reprs import Located, group_average, locate, reprs_at
from .templates import family_templates
from .z import Z_LOOPS, ZResult, optimise_zs, z_key

log = logging.getLogger(__name__)


@dataclass
class Solved:
    """A method's solve for one layer: ``ΔW = V @ U`` (out × in) and what to record."""

    U: torch.Tensor  # (k, in)
    V: torch.Tensor  # (out, k)
    info: dict[str, Any] = field(default_factory=dict)


@dataclass
class LayerContext:
    """What a solve gets for one layer (the step's :class:`EditContext` comes beside it)."""

    layer: int
    index: int  # i: position among the edited layers
    n_layers: int  # m
    keys: torch.Tensor  # K (in, n) float32, on the current model
    resid: torch.Tensor  # R (out, n) float32, already divided by (m − i)


C0_KEY = "family", "C0"


def moment(where: HasCaches | EditContext, layer: int) -> torch.Tensor:
    """C₀ of ``layer`` (float32, count-normalised, the base model's), kept by the caches.

    ``covariance: identity`` gives I. A caller may inject its own with
    :func:`use_moment` before the first edit (a parity run).
    """

    def make() -> torch.Tensor:
        if where.hp.covariance == "identity":
            width = int(weight_out_in(where.module(layer)).shape[1])
            return torch.eye(width, dtype=torch.float32)
        return where.caches.stats(layer).matrix.float()

    return where.caches.cached((*C0_KEY, layer), make)  # type: ignore[no-any-return]


def use_moment(where: HasCaches | EditContext, layer: int, matrix: torch.Tensor) -> None:
    """Make the family use ``matrix`` as C₀ for ``layer`` with these caches."""
    m = matrix.float().cpu()
    got = where.caches.cached((*C0_KEY, layer), lambda: m)
    if got is not m and not torch.equal(got, m):
        raise BadRequestError(f"this editor already uses another C₀ for layer {layer}")


@dataclass(frozen=True)
class FamilySettings:
    """What every method of the family can set for one step (besides its own)."""

    z_loop: str = setting("batched", "how z is optimised: batched or reference", choices=Z_LOOPS)
    v_stop: str = setting(
        "", "the z loop's stopping rule (empty: the preset's v_stop)", choices=("", *V_STOPS)
    )


class FamilyMethod(MethodBase):
    """The shared compute of the locate-then-edit family; subclasses give the solve."""

    capabilities = Capabilities(batched=True, templates="family")
    Settings: type = FamilySettings

    def prepare(self, ctx: EditContext, layers: list[int], settings: Any) -> None:
        """Anything to compute on the base model before the first layer (projectors)."""

    def solve(self, ctx: EditContext, lc: LayerContext, settings: Any) -> Solved:
        raise NotImplementedError

    #: whether the layer loop's weights are the update it returns (False: :meth:`finish`
    #: changes its layers, RECT's rectified and PRUNE's restrained Δ), so that a caller's
    #: probes taken in the loop (``EditContext.while_applied``) hold for the update
    finish_keeps_layers = True

    #: which keys a method's state keeps: "edited" (on the edited model, after every layer's
    #: write: AlphaEdit, MEMIT_seq) or "loop" (each layer's K as its solve used it: ENCORE)
    keys_on = "edited"

    def z_stop(self, settings: Any) -> ZStop | None:
        """An extra stopping rule of the z optimisation (ENCORE's); None: the preset's."""
        return None

    def adjust_z(
        self, ctx: EditContext, zr: ZResult, reqs: list[EditRequest], settings: Any
    ) -> ZResult:
        """z as the solve should see it (NAS rescales it); the optimised z by default."""
        return zr

    def finish(self, ctx: EditContext, update: Update, settings: Any) -> None:
        """Change the computed update in place before it is returned (RECT, PRUNE);
        the model is the unedited one again when this runs."""

    def compute(
        self,
        ctx: EditContext,
        requests: Sequence[EditRequest],
        settings: Any,
        progress: Progress | None = None,
    ) -> Update:
        """The update for ``requests`` on the model as it is now (model unchanged after):
        z, then the layer loop (:meth:`_write_layers`; every weight it writes is restored
        here, also when it fails), then the records."""
        if not requests:
            raise BadRequestError(f"{self.name} needs at least one request")
        reqs = [r.validate() for r in requests]
        hp = ctx.hp
        if settings.v_stop:
            hp = hp.replace(v_stop=settings.v_stop).validate()
        layers = self.layers(ctx, settings)
        templates = family_templates(ctx)
        if self.capabilities.needs_c0:  # C₀ of the base model, before the loop writes
            for layer in layers:
                moment(ctx, layer)
        self.prepare(ctx, layers, settings)
        where = _Where.of(ctx, hp, reqs, templates, layers[-1])
        before = _probe(ctx, reqs)
        zr, z_loop = self._z(ctx, reqs, templates, layers[-1], hp, settings, progress)
        zr = self.adjust_z(ctx, zr, reqs, settings)
        saved: list[tuple[int, torch.Tensor]] = []
        try:
            out, infos, resid_norms = self._write_layers(
                ctx, hp, layers, zr, where, settings, saved, progress
            )
            final_err = (zr.z - where.cur_z(ctx, zr.z.device)).norm(dim=1)
            if self.keys_on == "edited" and self.stores_keys(settings):
                for lu in out:
                    lu.keys = _keys(ctx, where.key_items, lu.weight_name, len(templates)).cpu()
            after = _probe(ctx, reqs)
            if ctx.while_applied is not None and self.finish_keeps_layers:
                ctx.while_applied()  # the loop's weights are the update's
        finally:
            for layer, w in reversed(saved):
                restore(ctx.module(layer), w)
        records = [
            _record(j, r, zr, resid_norms, final_err, layers, before, after)
            for j, r in enumerate(reqs)
        ]
        opts = _options(hp, settings, layers, z_loop, len(reqs), templates, out, infos)
        results = [
            {"z": zr.z[j].cpu(), "target_init": zr.target_init[j].cpu()} for j in range(len(reqs))
        ]
        upd = Update(self.name, out, records, options=opts, results=results)
        self.finish(ctx, upd, settings)
        upd.unsafe_reason = ctx.unsafe_reason(upd)
        return upd

    def _write_layers(
        self,
        ctx: EditContext,
        hp: Any,
        layers: list[int],
        zr: ZResult,
        where: _Where,
        settings: Any,
        saved: list[tuple[int, torch.Tensor]],
        progress: Progress | None,
    ) -> tuple[list[LayerUpdate], list[dict[str, Any]], list[list[float]]]:
        """Each layer's keys, residual, solve and write, in order; each written layer's
        previous weight is appended to ``saved`` (the caller restores them). Returns the
        layers' updates, their solves' infos and the residual norms per layer."""
        out: list[LayerUpdate] = []
        infos: list[dict[str, Any]] = []
        resid_norms: list[list[float]] = []
        for i, layer in enumerate(layers):
            name = hp.weight_module(layer)
            keys = _keys(ctx, where.key_items, name, where.n_templates)
            err = zr.z - where.cur_z(ctx, zr.z.device)  # (n, d)
            resid_norms.append(err.norm(dim=1).tolist())
            resid = (err / (len(layers) - i)).T.to(keys.device)  # under a device map
            solved = self.solve(ctx, LayerContext(layer, i, len(layers), keys, resid), settings)
            lu = LayerUpdate(layer, name, solved.U.float(), solved.V.float())
            if self.keys_on == "loop" and self.stores_keys(settings):
                lu.keys = keys.cpu()
            saved.append((layer, add_delta(ctx.module(layer), lu.delta())))
            out.append(lu)
            infos.append(solved.info)
            if progress:
                progress("layers", i + 1, len(layers))
        return out, infos, resid_norms

    def _z(
        self,
        ctx: EditContext,
        reqs: list[EditRequest],
        templates: list[str],
        z_layer: int,
        hp: Any,
        settings: Any,
        progress: Progress | None,
    ) -> tuple[ZResult, str]:
        """z for ``reqs``, optimised once per state of the weights for every method of
        the family with the preset's stopping rule (:meth:`rome.caches.Caches.z`): the
        same requests, templates, block and z settings give the same z, bit for bit."""
        block = f"{hp.layers_module}.{z_layer}"
        stop = self.z_stop(settings)
        z_cb = (lambda d, t: progress("z", d, t)) if progress else None

        def make() -> tuple[ZResult, str]:
            return optimise_zs(
                ctx.model, ctx.tok, reqs, templates, z_layer, block, hp, z_cb, settings.z_loop,
                stop,
            )  # fmt: skip

        if stop is not None:  # a method's own rule (ENCORE's): not comparable, not kept
            return make()
        key = ("family", "z", z_key(reqs, templates, block, hp, settings.z_loop))
        (zr, loop), kept = ctx.caches.z([z_layer], key, make)
        if kept:
            log.debug("%s: z for %d request(s) kept from an earlier method", self.name, len(reqs))
            if progress:
                progress("z", 1, 1)
        copy = ZResult(zr.z.clone(), zr.target_init.clone(), list(zr.steps))
        copy.traces = [[dict(t) for t in trace] for trace in zr.traces]
        return copy, loop


@dataclass
class _Where:
    """Where the layer loop reads: each request's subject in its bare prompt (cur_z, at
    the output of the last edited layer's block) and in every template (the keys)."""

    bare: list[Located]
    key_items: list[Located]  # per request, its templates in order
    n_templates: int
    block: str

    @classmethod
    def of(
        cls, ctx: EditContext, hp: Any, reqs: list[EditRequest], templates: list[str], z_layer: int
    ) -> _Where:
        tok = ctx.tok
        bare = [locate(tok, r.prompt, r.subject, hp.subject_index) for r in reqs]
        key_items = [
            locate(tok, t.format(r.prompt), r.subject, hp.subject_index)
            for r in reqs
            for t in templates
        ]
        return cls(bare, key_items, len(templates), f"{hp.layers_module}.{z_layer}")

    def cur_z(self, ctx: EditContext, device: torch.device) -> torch.Tensor:
        """The block's output at each bare prompt's subject on the model as it is now."""
        return reprs_at(ctx.model, ctx.tok, self.bare, self.block, "out").to(device)


def _options(
    hp: Any,
    settings: Any,
    layers: list[int],
    z_loop: str,
    n_requests: int,
    templates: list[str],
    out: list[LayerUpdate],
    infos: list[dict[str, Any]],
) -> dict[str, Any]:
    """What an update records of how it was computed (``Update.options``)."""
    batched = z_loop == "batched"
    return {
        "layers": layers,
        "subject_index": hp.subject_index,
        "v_stop": hp.v_stop,
        "z_loop": z_loop,
        "v_prefix_reuse": hp.v_prefix_reuse if batched else False,
        "v_max_requests": hp.v_max_requests if batched else 1,
        "v_length_buckets": hp.v_length_buckets if batched else False,
        "n_requests": n_requests,
        "templates": templates,
        **{k: v for k, v in settings_dict(settings).items() if k not in ("z_loop", "v_stop")},
        "per_layer": [{"layer": lu.layer, **inf} for lu, inf in zip(out, infos, strict=True)],
    }


def _keys(ctx: EditContext, items: list[Located], name: str, n_templates: int) -> torch.Tensor:
    """K (in, n): per request ½ the bare key + ½ the mean of the prefixed ones."""
    raw = reprs_at(ctx.model, ctx.tok, items, name, "in")
    return group_average(raw, n_templates).T.contiguous()


def _probe(ctx: EditContext, reqs: list[EditRequest]) -> list[tuple[float, float | None]]:
    """(p(target_new), p(true object)) on each bare prompt."""
    return probe_requests(ctx.model, ctx.tok, reqs)


def _record(
    j: int,
    req: EditRequest,
    zr: Any,
    resid_norms: list[list[float]],
    final_err: torch.Tensor,
    layers: list[int],
    before: list[tuple[float, float | None]],
    after: list[tuple[float, float | None]],
) -> dict[str, Any]:
    z, init = zr.z[j], zr.target_init[j]
    trace = zr.traces[j]
    return {
        "request": req.to_dict(),
        "z_norm": float(z.norm()),
        "target_init_norm": float(init.norm()),
        "delta_norm": float((z - init).norm()),
        "z_steps": zr.steps[j],
        "z_final_loss": trace[-1]["loss"] if trace else math.nan,
        "z_p_target": trace[-1]["p_target"] if trace else math.nan,
        "z_trace": trace,
        "residual_norms": {str(layer): resid_norms[i][j] for i, layer in enumerate(layers)},
        "residual_after": float(final_err[j]),
        "p_new_before": before[j][0],
        "p_new_after": after[j][0],
        "p_true_before": before[j][1],
        "p_true_after": after[j][1],
    }
