"""NAS on the batch methods (SasyaTitech/NAS: ``NAS/NAS_main.py``, ``NAS/compute_z.py``,
``util/vstar_stats.py``, ``hparams/NAS``): each solved z has the MLP part of it
rescaled to the layer's anchor norm before the solve.

Registered twice: ``nas`` is AlphaEdit with NAS (the published ``NAS_main``, its
``hparams/NAS/*.json``); ``memit-nas`` is MEMIT with ``use_nas`` (the published
``baselines/memit/compute_z.py``). For each request, after z is optimised (z =
h + δ, h the block output at the subject's last token of the bare prompt), with
v₀ the MLP output there on the current model: v* = v₀ + δ; when ‖v*‖ >
``skip_multiple`` · ρ the request's δ is dropped (v* = v₀), else v* is rescaled to
ρ (v*·ρ/(‖v*‖ + 1e-10)); z = (h − v₀) + v*.

The anchor ρ of a layer is measured once on the unedited model: the norms
‖v₀ + δ‖ of calibration edits, their mean without the largest 5 %. As
published: bare prompts (no context templates), δ on the block output, the
requests optimised ``anchor_batch`` at a time with one joint loss (mean NLL over
the batch, batch-mean KL, mean weight decay; the batch stops together when that
loss is below 0.05), each δ clamped on its own. The published code samples 1,000
MultiCounterFact requests (seed 0); here the calibration requests shipped in
:mod:`rome.anchor` (20; ``anchor_samples``), so ρ needs no dataset.

ROME's norm anchor (``v_norm_anchor``, :mod:`rome.anchor`) is the same idea for
ROME's v*, which *is* an MLP-output vector: it scales v* to ρ (trimmed mean of
ROME's own v* norms over the same 20 requests, each solved with ROME's
templates), with no skip rule. Here the vector scaled is the MLP part of the
batch methods' z (v₀ + δ), the residual before the MLP is kept, ρ comes from
the published bare-prompt calibration, and a too-large v* drops the edit.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

import torch

from .. import anchor
from ..batching import pad_id_of, pad_right, target_ids
from ..context import EditContext
from ..devices import module_device
from ..request import EditRequest
from ..vstar import KL_PROMPT, frozen
from .alphaedit import AlphaEdit, AlphaEditSettings
from .base import Update, setting
from .family import ZResult, locate, reprs_at
from .memit import Memit, MemitSettings


@dataclass(frozen=True)
class NasFields:
    skip_multiple: float = setting(
        2.0, "drop a δ whose ‖v*‖ exceeds this many ρ", low=0.0, inclusive=False
    )
    anchor_samples: int = setting(
        len(anchor.CALIBRATION_REQUESTS),
        "calibration requests of rome/anchor.py measuring ρ (the first N)",
        low=1,
        high=len(anchor.CALIBRATION_REQUESTS),
    )
    anchor_batch: int = setting(16, "calibration requests optimised together", low=1)


@dataclass(frozen=True)
class NasSettings(AlphaEditSettings, NasFields):
    pass


@dataclass(frozen=True)
class MemitNasSettings(MemitSettings, NasFields):
    pass


EPS = 1e-10  # published: the rescale's denominator and the clamp's


ANCHOR_KEY = "nas", "anchor"


def use_anchor(editor: Any, layer: int, rho: float) -> None:
    """Take ρ of ``layer`` as given (a parity run injects the same on both sides)."""
    editor.caches.cached((*ANCHOR_KEY, layer), lambda: float(rho))


def anchor_of(editor: EditContext, layer: int, settings: Any) -> float:
    """ρ of ``layer``: measured on the unedited weights once per editor."""

    def make() -> float:
        reqs = list(anchor.calibration_requests(settings.anchor_samples))
        with editor.base_weights():
            norms = calibration_norms(editor, layer, reqs, settings.anchor_batch)
        return anchor.trimmed_mean(norms)

    return float(editor.caches.cached((*ANCHOR_KEY, layer), make))


def calibration_norms(
    editor: EditContext, layer: int, reqs: list[EditRequest], batch: int
) -> list[float]:
    """‖v₀ + δ‖ per request, δ optimised ``batch`` requests at a time with one loss."""
    out: list[float] = []
    for start in range(0, len(reqs), batch):
        out += _batch_norms(editor, layer, reqs[start : start + batch])
    return out


def _batch_norms(editor: EditContext, layer: int, reqs: list[EditRequest]) -> list[float]:
    """One published calibration batch (long: one loop read step for step against it)."""
    hp, model, tok = editor.hp, editor.model, editor.tok
    block = f"{hp.layers_module}.{layer}"
    device = module_device(model, block)
    tgts = [target_ids(tok, r.target_new) for r in reqs]
    rw = [locate(tok, r.prompt, r.subject, hp.subject_index) for r in reqs]
    kl = [locate(tok, KL_PROMPT, r.subject, hp.subject_index) for r in reqs]
    seqs = [loc.ids + t[:-1] for loc, t in zip(rw, tgts, strict=True)] + [x.ids for x in kl]
    ids, mask = pad_right(seqs, pad_id_of(tok), device)
    n = len(reqs)
    rows = torch.arange(2 * n, device=device)
    cols = torch.tensor([x.index for x in rw + kl], device=device)
    lab_r, lab_c, lab = [], [], []
    for j, (loc, t) in enumerate(zip(rw, tgts, strict=True)):
        for i, tid in enumerate(t):
            lab_r.append(j)
            lab_c.append(len(loc.ids) - 1 + i)
            lab.append(tid)
    lr_, lc_, lb_ = (torch.tensor(x, device=device) for x in (lab_r, lab_c, lab))
    tlen = torch.tensor([float(len(t)) for t in tgts], device=device)
    width = int(model.get_output_embeddings().weight.shape[1])  # type: ignore[operator]
    delta = torch.zeros(n, width, device=device)
    delta.requires_grad_(True)
    opt = torch.optim.Adam([delta], lr=hp.v_lr)
    state: dict[str, Any] = {"init": None}

    def add(_m: Any, _a: Any, out: Any) -> Any:
        h = out[0] if isinstance(out, tuple) else out
        if state["init"] is None:
            state["init"] = h[rows[:n], cols[:n]].detach().float().clone()
        h = h.clone()
        h[rows, cols] = h[rows, cols] + delta.repeat(2, 1).to(h.dtype)
        return (h, *out[1:]) if isinstance(out, tuple) else h

    kl_init = None
    handle = model.get_submodule(block).register_forward_hook(add)
    try:
        with frozen(model):
            for step in range(hp.v_num_grad_steps):
                opt.zero_grad()
                logits = model(input_ids=ids, attention_mask=mask, use_cache=False).logits.float()
                kl_lp = logits[rows[n:], cols[n:]].log_softmax(-1)
                if kl_init is None:
                    kl_init = kl_lp.detach().clone()
                tok_lp = logits[lr_, lc_].log_softmax(-1)[torch.arange(len(lab)), lb_]
                nll = (-torch.zeros(n, device=device).index_add(0, lr_, tok_lp) / tlen).mean()
                kl_loss = hp.kl_factor * torch.nn.functional.kl_div(
                    kl_init, kl_lp, log_target=True, reduction="batchmean"
                )
                init = state["init"]
                wd = hp.v_weight_decay * (delta.norm(dim=1) / init.norm(dim=1) ** 2).mean()
                loss = nll + kl_loss + wd
                if loss < hp.v_early_stop_loss or step == hp.v_num_grad_steps - 1:
                    break
                loss.backward()
                opt.step()
                with torch.no_grad():
                    cap = hp.clamp_norm_factor * init.norm(dim=1)
                    scale = torch.minimum(torch.ones_like(cap), cap / (delta.norm(dim=1) + EPS))
                    delta.mul_(scale[:, None])
    finally:
        handle.remove()
    v0 = reprs_at(model, tok, rw, hp.weight_module(layer), "out").to(device)
    return (v0 + delta.detach()).norm(dim=1).tolist()


class NasMixin:
    """The z rescaling (its settings: :class:`NasFields`)."""

    name: str

    def adjust_z(
        self, editor: EditContext, zr: ZResult, reqs: list[EditRequest], settings: Any
    ) -> ZResult:
        hp = editor.hp
        layer = editor.hp.edited_layers()[-1]
        rho = anchor_of(editor, layer, settings)
        bare = [locate(editor.tok, r.prompt, r.subject, hp.subject_index) for r in reqs]
        v0 = reprs_at(editor.model, editor.tok, bare, hp.weight_module(layer), "out")
        v0 = v0.to(zr.z.device)
        z = zr.z.clone()
        anchored: list[dict[str, Any]] = []
        for j in range(z.shape[0]):
            delta = zr.z[j] - zr.target_init[j]
            v_star = delta + v0[j]
            norm = float(v_star.norm())
            skipped = rho > 0 and norm > settings.skip_multiple * rho
            if skipped:
                v_star = v0[j]
            elif rho > 0 and float(v_star.norm() + EPS) > EPS:
                v_star = v_star * (rho / (v_star.norm() + EPS))
            z[j] = (zr.target_init[j] - v0[j]) + v_star
            anchored.append({"v_star_norm": norm, "skipped": skipped})
        editor.scratch["anchored"], editor.scratch["anchor_norm"] = anchored, rho
        return ZResult(z, zr.target_init, zr.steps, zr.traces)

    def finish(self, editor: EditContext, update: Update, settings: Any) -> None:
        """Each record says the v* norm before anchoring and whether its δ was dropped."""
        for rec, info in zip(update.records, editor.scratch["anchored"], strict=True):
            rec["nas_v_star_norm"] = info["v_star_norm"]
            rec["nas_skipped"] = info["skipped"]
        update.options["anchor_norm"] = editor.scratch["anchor_norm"]


class Nas(NasMixin, AlphaEdit):
    """NAS as published: AlphaEdit's solve and state with the anchored z."""

    name = "nas"
    summary = "alphaedit with z's MLP part rescaled to an anchor norm"
    Settings = NasSettings


class MemitNas(NasMixin, Memit):
    """MEMIT with ``use_nas`` (stateless like MEMIT)."""

    name = "memit-nas"
    summary = "memit with z's MLP part rescaled to an anchor norm"
    Settings = MemitNasSettings

    def settings(self, hp: Any, overrides: Any = None) -> Any:
        return dataclasses.replace(super().settings(hp, overrides), accumulate=False)
