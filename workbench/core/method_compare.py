"""Compare in the app: ROME's key modes and each batch method on the Edit tab's request,
judged together as ``edit --method all`` judges them; a row's update applied as it is.

Computing and applying an edit of any method is :class:`~workbench.core.session.Session`'s
(one path); this module only lays the methods side by side on the one editor, and turns
a comparison row into the session's :class:`~.records.EditOutcome` to apply.

No Textual and no rich here.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

from rome import MODES, Editor, EditRequest
from rome.methods import get_method, method_names

from .forms import EditForm
from .methods import MethodOutcome, judge_outcomes, run_method
from .records import EditOutcome
from .verdict import Verdict

if TYPE_CHECKING:
    from .session import Session

log = logging.getLogger(__name__)

#: a comparison's verdict word -> the Edit tab's verdict level
VERDICT_LEVELS = {"ok": "ok", "check": "warn", "DISABLING": "bad", "REFUSED": "refused"}


def rome_row(mode: str, outcome: EditOutcome, preset: str = "") -> MethodOutcome:
    """A ROME key mode's computed edit as a row of the method comparison (no recompute)."""
    r = outcome.result
    assert r is not None, "a key mode's outcome keeps its rank-one record"
    row = MethodOutcome(outcome.method, label=f"{outcome.method}/{mode}", preset=preset)
    row.layer_norms = {r.layer: float(r.update_norm)}
    row.norm = float(r.update_norm)
    row.ratio = float(r.update_norm_ratio)
    b, a = outcome.probe("prompt", after=False), outcome.probe("prompt", after=True)
    if b is not None:
        row.p_new_before, row.p_true_before = [b.p_new], [b.p_true]
    if a is not None:
        row.p_new_after, row.p_true_after = [a.p_new], [a.p_true]
    if r.unsafe_reason or a is None:
        row.error = f"not applied: {r.unsafe_reason or 'a non-finite update'}"
        row.p_new_after, row.p_true_after = list(row.p_new_before), list(row.p_true_before)
    return row


class MethodCompare:
    """The comparison of one :class:`Session`'s methods on a request."""

    def __init__(self, session: Session) -> None:
        self.session = session

    @staticmethod
    def family() -> list[str]:
        """The batch methods, in the order the app shows them."""
        return family_methods()

    def compare(
        self,
        form: EditForm,
        modes: dict[str, EditOutcome],
        methods: Sequence[str] = (),
        check: Callable[[str], None] | None = None,
    ) -> list[MethodOutcome]:
        """ROME's key modes (already computed, in ``modes``) and each batch method on the
        form's request, judged together as ``edit --method all`` judges them.

        ``check(method)`` is called before each method (it may raise to stop there).
        """
        s = self.session
        lm, ed = s.require()
        family = list(methods) or family_methods()
        rows = [rome_row(m, modes[m], lm.hparams.name) for m in MODES if m in modes]
        reqs: list[EditRequest] = [form.request()]
        with s.locked():
            for m in family:
                if check:
                    check(m)
                med = s.editor_for(m)
                why = cannot_edit(m, med)
                if why is not None:  # not this architecture (UltraEdit on GPT-2): no row
                    log.info("compare leaves out %s: %s", m, why)
                    continue
                rows.append(run_method(lm, med, reqs, m, None))
        return judge_outcomes(rows, ed.hp.max_update_ratio)

    @staticmethod
    def outcome_of(form: EditForm, row: MethodOutcome, version: int) -> EditOutcome:
        """A comparison row's update (:meth:`compare`, on the weights of Session.version
        ``version``) as an outcome to apply, not recomputed: the row's verdict; its probes
        before are scored by :meth:`Session.apply` (the row has the bare prompt's only)."""
        if len(row.updates) != 1:
            raise ValueError(f"the {row.label} row holds {len(row.updates)} updates, not one")
        form = dataclasses.replace(form, method=row.method)
        verdict = Verdict(VERDICT_LEVELS[row.verdict], tuple(row.reasons))
        upd = row.updates[0]
        return EditOutcome(
            form, upd, [], None, verdict, version=version, ratio=row.ratio, preset=row.preset
        )


def cannot_edit(method: str, editor: Editor) -> str | None:
    """Why ``method`` cannot edit ``editor``'s model with its settings (None: it can)."""
    m = get_method(method)
    return m.cannot_edit(editor.context(m), m.settings(editor.hp))


def family_methods() -> list[str]:
    """The methods Compare sets beside ROME's key modes: the locate-then-edit family's
    (batched, on the family's templates), in the registry's order."""
    return [
        m
        for m in method_names()
        if get_method(m).capabilities.batched and get_method(m).capabilities.templates == "family"
    ]
