"""A computed step of any method as the app shows it: the form's probes, scored before
and after (in the method's own trial when it has one), the figures the verdict reads.
The trial and the probes after of a rank-one record are :mod:`evals.probe_after`'s.

No Textual and no rich here; nothing here holds the session's lock (its callers do).
"""

from __future__ import annotations

import math
from typing import Any

from evals.probe_after import PROBE_AFTER, declares_trial
from rome import Editor, LoadedModel
from rome.methods import Method, Update
from rome.scoring import score_targets

from .forms import EditForm
from .records import result_of
from .verdict import Figures, Judged, Probe


def score_probes(lm: LoadedModel, form: EditForm) -> list[Probe]:
    """p(target_new) (and p(target_true)) after each of the form's probes, as the model is."""
    probes = form.probes()
    prompts: list[str] = []
    targets: list[str] = []
    true = form.request().true_object if form.target_true else None  # not end of text
    for _, text in probes:
        prompts.append(text)
        targets.append(form.target_new)
        if true:
            prompts.append(text)
            targets.append(true)
    scores = iter(score_targets(lm.model, lm.tokenizer, prompts, targets))
    out = []
    for name, text in probes:
        p_new = next(scores).prob
        p_true = next(scores).prob if true else None
        out.append(Probe(name, text, p_new, p_true))
    return out


def form_options(method: Method, form: EditForm, trial: bool) -> dict[str, Any]:
    """The method's settings the form sets: the key mode (a method that has them), and
    whether it scores its own trial (a method that declares ``probe_after``)."""
    out: dict[str, Any] = {}
    if method.capabilities.key_modes:
        out["mode"] = form.mode
    if declares_trial(method):
        out[PROBE_AFTER] = trial
    return out


def update_ratio(ed: Editor, update: Update) -> float:
    """‖ΔW‖ / ‖W‖ over the weights ``update`` writes (a rank-one record's own figure)."""
    res = result_of(update)
    if res is not None:
        return float(res.update_norm_ratio)
    w = math.sqrt(sum(ed.weight_norm(lu) ** 2 for lu in update.layers))
    return update.norm / w if w else math.inf


def figures(ed: Editor, update: Update) -> Judged:
    """What the verdict reads of ``update``: its rank-one record, or its figures."""
    res = result_of(update)
    if res is not None:
        return res
    reason = update.unsafe_reason or ed.update_unsafe_reason(update)
    return Figures(update.method, update.norm, update_ratio(ed, update), reason)
