"""A step's probes after: what a method's own trial scores (ROME's ``p_new_after`` ...),
filled in on the applied weights or in a trial of the update, for a replay's step and
the app's Compute / Apply alike (the one implementation: ``workbench.core`` imports it).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any, TypeVar

from rome import Editor, EditResult
from rome.methods import Method, Update, options_of

#: the setting of a method whose compute scores its update in a trial of its own (ROME's)
PROBE_AFTER = "probe_after"
#: what that trial fills in a rank-one result
AFTER_KEYS = ("p_new_after", "p_true_after", "p_new_after_templated")

T = TypeVar("T")


def declares_trial(method: Method) -> bool:
    """Whether ``method`` scores its update in a trial of its own (it declares
    ``probe_after``)."""
    return any(o.name == PROBE_AFTER for o in options_of(method.Settings))


def without_trial(method: Method, options: dict[str, Any]) -> tuple[dict[str, Any], bool]:
    """The run's options for ``method``'s compute, with its own trial off where it has
    one (it declares ``probe_after``) and the run did not set it: the step scores its
    probes after once it is applied (:func:`score_applied`) instead of adding and
    restoring the update first. Also whether it did."""
    if not declares_trial(method) or PROBE_AFTER in options:
        return dict(options), False
    return {**options, PROBE_AFTER: False}, True


def score_applied(ed: Editor, upd: Update) -> None:
    """Fill the probes after of each rank-one result of ``upd`` computed without a trial,
    and its record, from the model as it is (``upd`` applied): what the trial measures,
    on the same weights."""
    for i, res in enumerate(upd.results):
        if isinstance(res, EditResult) and math.isnan(res.p_new_after):
            ed.score_applied(res)
            if i < len(upd.records):
                upd.records[i].update({k: getattr(res, k) for k in AFTER_KEYS})


def trial(ed: Editor, upd: Update, score: Callable[[], T]) -> T | None:
    """``score()`` with ``upd`` added for a moment (then undone bit for bit, with the
    carried state; an editor that keeps no undo copies, a replay's, keeps them for it);
    the rank-one results' probes after are filled in the same trial. None for a
    non-finite update (nothing added)."""
    if not all(lu.is_finite() for lu in upd.layers):
        return None
    keep, ed.keep_undo = ed.keep_undo, True
    try:
        ed.apply_step(upd, force=True)
        try:
            score_applied(ed, upd)
            return score()
        finally:
            ed.undo()
    finally:
        ed.keep_undo = keep
