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

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch

from ...errors import BadRequestError
from ...optimise import ZStop
from ...request import EditRequest
from ...scoring import score_targets
from ...update import add_delta, restore
from ..base import LayerUpdate, Update
from .reprs import Located, group_average, locate, reprs_at
from .templates import family_templates
from .z import ZResult, optimise_zs

if TYPE_CHECKING:
    from ...editor import Editor


@dataclass
class Solved:
    """A method's solve for one layer: ``ΔW = V @ U`` (out × in) and what to record."""

    U: torch.Tensor  # (k, in)
    V: torch.Tensor  # (out, k)
    info: dict[str, Any] = field(default_factory=dict)


@dataclass
class LayerContext:
    """What a solve gets for one layer."""

    layer: int
    index: int  # i: position among the edited layers
    n_layers: int  # m
    keys: torch.Tensor  # K (in, n) float32, on the current model
    resid: torch.Tensor  # R (out, n) float32, already divided by (m − i)


def moment(editor: Editor, layer: int) -> torch.Tensor:
    """C₀ of ``layer`` (float32, count-normalised, the base model's), kept by the editor.

    ``covariance: identity`` gives I. A caller may inject its own with
    :func:`use_moment` before the first edit (a parity run).
    """

    def make() -> torch.Tensor:
        if editor.hp.covariance == "identity":
            return torch.eye(_in_features(editor, layer), dtype=torch.float32)
        return editor.stats(layer).matrix.float()

    return editor.cached(("family", "C0", layer), make)  # type: ignore[no-any-return]


def use_moment(editor: Editor, layer: int, matrix: torch.Tensor) -> None:
    """Make the family use ``matrix`` as C₀ for ``layer`` on this editor."""
    m = matrix.float().cpu()
    got = editor.cached(("family", "C0", layer), lambda: m)
    if got is not m and not torch.equal(got, m):
        raise BadRequestError(f"this editor already uses another C₀ for layer {layer}")


def _in_features(editor: Editor, layer: int) -> int:
    from ...update import weight_out_in

    return int(weight_out_in(editor.module(layer)).shape[1])


class FamilyMethod:
    """The shared compute of MEMIT, EMMET and AlphaEdit; subclasses give the solve."""

    name = "family"
    batched = True
    #: whether the keys on the edited model are kept in LayerUpdate.keys
    keeps_keys = False

    def layers(self, editor: Editor) -> list[int]:
        return [editor.check_layer(x) for x in editor.hp.edited_layers()]

    def settings(self, editor: Editor, options: dict[str, Any]) -> dict[str, Any]:
        """This method's settings for one step (preset values, overridden by options)."""
        return {}

    def prepare(self, editor: Editor, layers: list[int], settings: dict[str, Any]) -> None:
        """Anything to compute on the base model before the first layer (projectors)."""

    def solve(self, editor: Editor, ctx: LayerContext, settings: dict[str, Any]) -> Solved:
        raise NotImplementedError

    def wants_keys(self, settings: dict[str, Any]) -> bool:
        return self.keeps_keys

    #: which keys a method's state keeps: "edited" (on the edited model, after every layer's
    #: write: AlphaEdit, MEMIT_seq) or "loop" (each layer's K as its solve used it: ENCORE)
    keys_on = "edited"

    def z_stop(self, settings: dict[str, Any]) -> ZStop | None:
        """An extra stopping rule of the z optimisation (ENCORE's); None: the preset's."""
        return None

    def adjust_z(
        self, editor: Editor, zr: ZResult, reqs: list[EditRequest], settings: dict[str, Any]
    ) -> ZResult:
        """z as the solve should see it (NAS rescales it); the optimised z by default."""
        return zr

    def finish(self, editor: Editor, update: Update, settings: dict[str, Any]) -> None:
        """Change the computed update in place before it is returned (RECT, PRUNE);
        the model is the unedited one again when this runs."""

    def after_apply(self, editor: Editor, update: Update) -> None:
        return None

    def compute(
        self, editor: Editor, requests: Sequence[EditRequest], options: dict[str, Any]
    ) -> Update:
        """The update for ``requests`` on the model as it is now (model unchanged after).

        The first ~60 lines are one sequence (z, then the layer loop, then the
        records); splitting it would scatter the saved weights' restore.
        """
        if not requests:
            raise BadRequestError(f"{self.name} needs at least one request")
        reqs = [r.validate() for r in requests]
        hp = editor.hp
        v_stop = options.get("v_stop")
        if v_stop is not None:
            hp = hp.replace(v_stop=v_stop).validate()
        settings = self.settings(editor, options)
        progress = options.get("progress")
        layers = self.layers(editor)
        templates = family_templates(editor)
        self.prepare(editor, layers, settings)
        z_layer = layers[-1]
        block = f"{hp.layers_module}.{z_layer}"
        model, tok = editor.model, editor.tok
        bare = [locate(tok, r.prompt, r.subject, hp.subject_index) for r in reqs]
        key_items = [
            locate(tok, t.format(r.prompt), r.subject, hp.subject_index)
            for r in reqs
            for t in templates
        ]
        before = _probe(editor, reqs)
        z_cb = (lambda d, t: progress("z", d, t)) if progress else None
        zr, z_loop = optimise_zs(
            model,
            tok,
            reqs,
            templates,
            z_layer,
            block,
            hp,
            z_cb,
            options.get("z_loop", "batched"),
            self.z_stop(settings),
        )
        zr = self.adjust_z(editor, zr, reqs, settings)
        saved: list[tuple[int, torch.Tensor]] = []
        out: list[LayerUpdate] = []
        infos: list[dict[str, Any]] = []
        resid_norms: list[list[float]] = []
        try:
            for i, layer in enumerate(layers):
                name = hp.weight_module(layer)
                keys = _keys(editor, key_items, name, len(templates))
                cur_z = reprs_at(model, tok, bare, block, "out").to(zr.z.device)
                err = zr.z - cur_z  # (n, d)
                resid_norms.append(err.norm(dim=1).tolist())
                resid = (err / (len(layers) - i)).T.to(keys.device)  # under a device map
                ctx = LayerContext(layer, i, len(layers), keys, resid)
                solved = self.solve(editor, ctx, settings)
                lu = LayerUpdate(layer, name, solved.U.float(), solved.V.float())
                if self.keys_on == "loop" and self.wants_keys(settings):
                    lu.keys = keys.cpu()
                saved.append((layer, add_delta(editor.module(layer), lu.delta())))
                out.append(lu)
                infos.append(solved.info)
                if progress:
                    progress("layers", i + 1, len(layers))
            final_err = (zr.z - reprs_at(model, tok, bare, block, "out").to(zr.z.device)).norm(
                dim=1
            )
            if self.keys_on == "edited" and self.wants_keys(settings):
                for lu in out:
                    lu.keys = _keys(editor, key_items, lu.weight_name, len(templates)).cpu()
            after = _probe(editor, reqs)
        finally:
            for layer, w in reversed(saved):
                restore(editor.module(layer), w)
        records = [
            _record(j, r, zr, resid_norms, final_err, layers, before, after)
            for j, r in enumerate(reqs)
        ]
        opts = {
            "layers": layers,
            "subject_index": hp.subject_index,
            "v_stop": hp.v_stop,
            "z_loop": z_loop,
            "v_prefix_reuse": hp.v_prefix_reuse if z_loop == "batched" else False,
            "v_max_requests": hp.v_max_requests if z_loop == "batched" else 1,
            "v_length_buckets": hp.v_length_buckets if z_loop == "batched" else False,
            "n_requests": len(reqs),
            "templates": templates,
            **{k: v for k, v in settings.items() if not k.startswith("_")},
            "per_layer": [{"layer": lu.layer, **inf} for lu, inf in zip(out, infos, strict=True)],
        }
        results = [
            {"z": zr.z[j].cpu(), "target_init": zr.target_init[j].cpu()} for j in range(len(reqs))
        ]
        upd = Update(self.name, out, records, options=opts, results=results)
        self.finish(editor, upd, settings)
        upd.unsafe_reason = editor.update_unsafe_reason(upd)
        return upd


def _keys(editor: Editor, items: list[Located], name: str, n_templates: int) -> torch.Tensor:
    """K (in, n): per request ½ the bare key + ½ the mean of the prefixed ones."""
    raw = reprs_at(editor.model, editor.tok, items, name, "in")
    return group_average(raw, n_templates).T.contiguous()


def _probe(editor: Editor, reqs: list[EditRequest]) -> list[tuple[float, float | None]]:
    """(p(target_new), p(target_true)) on each bare prompt."""
    prompts = [r.text for r in reqs] + [r.text for r in reqs if r.true_object is not None]
    targets = [r.target_new for r in reqs] + [
        r.true_object for r in reqs if r.true_object is not None
    ]
    scores = score_targets(editor.model, editor.tok, prompts, targets)
    out: list[tuple[float, float | None]] = []
    k = len(reqs)
    for j, r in enumerate(reqs):
        p_true = None
        if r.true_object is not None:
            p_true = scores[k].prob
            k += 1
        out.append((scores[j].prob, p_true))
    return out


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
