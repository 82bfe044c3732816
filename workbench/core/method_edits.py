"""The session's edits by MEMIT, EMMET and AlphaEdit, and every method beside ROME's key modes.

:class:`~workbench.core.session.Session` computes, applies and records ROME
edits (an :class:`~rome.EditResult`). The batch methods go through the public
:class:`~rome.Editor` API here instead (``Editor.edit`` for the update,
``Editor.apply_update`` on the session's editor, so F8 undo and revert restore
their weights bit for bit, and the method's carried state with them),
and are stored as one step (``Store.add_step``) in the session's run. Each
method edits with its shipped ``<preset>-<method>`` variant when there is one
(:func:`rome.hparams.method_preset`), through an editor kept per method whose
templates and statistics come from the base weights.

No Textual and no rich here.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from rome import MODES, Editor, EditRequest
from rome.hparams import method_preset
from rome.methods import Update, get_method, method_names
from rome.methods.family.templates import family_templates
from rome.progress import Progress

from .forms import EditForm
from .generation import GenerationPair
from .methods import MethodOutcome, judge_outcomes, run_method
from .records import EditOutcome, ProbedOutcome
from .verdict import Probe, Verdict

if TYPE_CHECKING:
    from workbench.store import Store

    from .session import Session

log = logging.getLogger(__name__)

#: a comparison's verdict word -> the Edit tab's verdict level
VERDICT_LEVELS = {"ok": "ok", "check": "warn", "DISABLING": "bad", "REFUSED": "refused"}


@dataclass
class MethodEditOutcome(ProbedOutcome):
    """A batch method's computed (not yet applied) update on the form's request."""

    form: EditForm
    update: Update
    row: MethodOutcome  # per-layer norms, ‖ΔW‖ / ‖W‖, p(target) on the bare prompt
    before: list[Probe]
    after: list[Probe] | None
    verdict: Verdict
    seconds: float = 0.0
    version: int = 0  # Session.version when computed

    @property
    def method(self) -> str:
        return self.update.method

    @property
    def mode(self) -> str:
        """What the status lines name the edit by (ROME's outcomes: the key mode)."""
        return self.update.method


@dataclass
class MethodApplied:
    """A batch method's edit on the model: what :class:`~.records.AppliedInfo` is to ROME's."""

    number: int  # this session's edit number (1-based)
    outcome: MethodEditOutcome
    generations: list[GenerationPair]
    fingerprint: str
    run_id: str | None
    seq: int | None
    store_error: str | None = None


def rome_row(mode: str, outcome: EditOutcome, preset: str = "") -> MethodOutcome:
    """A ROME key mode's computed edit as a row of the method comparison (no recompute)."""
    r = outcome.result
    row = MethodOutcome("rome", label=f"rome/{mode}", preset=preset)
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


class MethodEdits:
    """The batch methods of one :class:`Session`: compute, apply, compare."""

    def __init__(self, session: Session) -> None:
        self.session = session
        self._for: Editor | None = None  # the session editor the caches below belong to
        self._editors: dict[str, Editor] = {}

    # ----------------------------------------------------------- editors
    def _fresh(self) -> Editor:
        _, ed = self.session.require()
        if self._for is not ed:  # a model was (re)loaded: nothing of ours is on it
            self._for, self._editors = ed, {}
        return ed

    def preset(self, method: str) -> str:
        """The preset ``method`` edits the loaded model with."""
        lm, _ = self.session.require()
        return method_preset(lm.hparams, method).name

    @staticmethod
    def family() -> list[str]:
        """The batch methods, in the order the app shows them."""
        return _family_methods()

    def layers(self) -> dict[str, tuple[str, list[int]]]:
        """Each batch method's preset and edited layers on the loaded model."""
        lm, _ = self.session.require()
        out = {}
        for m in _family_methods():
            hp = method_preset(lm.hparams, m)
            out[m] = (hp.name, hp.edited_layers())
        return out

    def editor_for(self, method: str, progress: Progress | None = None) -> Editor:
        """The editor that computes ``method``'s updates (its templates and second moments
        taken on the base weights, once)."""
        lm, ed = self.session.require()
        self._fresh()
        hp = method_preset(lm.hparams, method)
        if hp is ed.hp:
            return ed
        med = self._editors.get(method)
        if med is None:
            med = ed.variant(hp)  # the same edits and carried state, its own caches
            uses = get_method(method).capabilities
            with ed.base_weights():  # the session's edits out of the way for a moment
                if uses.templates == "family":
                    family_templates(med)
                if uses.needs_c0:  # C₀ read once (no Cholesky: the family solves with C₀)
                    for layer in hp.edited_layers():
                        med.stats(layer, progress)
            self._editors[method] = med
        return med

    # ----------------------------------------------------------- compute
    def _row(self, ed: Editor, form: EditForm, upd: Update, before: list[Probe]) -> MethodOutcome:
        lm, _ = self.session.require()
        row = MethodOutcome(upd.method, preset=method_preset(lm.hparams, upd.method).name)
        row.layer_norms = upd.layer_norms()
        row.norm = upd.norm
        w = math.sqrt(sum(ed.weight_norm(lu) ** 2 for lu in upd.layers))
        row.ratio = row.norm / w if w else math.inf
        b = next(p for p in before if p.name == "prompt")
        row.p_new_before, row.p_true_before = [b.p_new], [b.p_true]
        return row

    def compute(self, form: EditForm, progress: Progress | None = None) -> MethodEditOutcome:
        """``form.method``'s update on the form's request, with probes before and after."""
        with self.session.locked() as ed:  # the session's one lock on the weights
            t0 = time.perf_counter()
            med = self.editor_for(form.method, progress)
            before = self.session.score_probes(form)
            upd = med.edit([form.request()], form.method)
            row = self._row(ed, form, upd, before)
            reason = upd.unsafe_reason or ed.update_unsafe_reason(upd)
            after: list[Probe] | None = None
            if reason:
                row.error = f"not applied: {reason}"
                row.p_new_after, row.p_true_after = row.p_new_before, row.p_true_before
            else:
                ed.apply_step(upd, force=True)  # for a moment: undo puts the state back
                try:
                    after = self.session.score_probes(form)
                finally:
                    ed.undo()
                a = next(p for p in after if p.name == "prompt")
                row.p_new_after, row.p_true_after = [a.p_new], [a.p_true]
            judge_outcomes([row], med.hp.max_update_ratio)
            level = VERDICT_LEVELS[row.verdict]
            if level == "ok" and after is not None:
                level = self._probe_level(before, after, row)
            verdict = Verdict(level, tuple(row.reasons))
            secs = time.perf_counter() - t0
            version = self.session.version
            return MethodEditOutcome(form, upd, row, before, after, verdict, secs, version)

    @staticmethod
    def _probe_level(before: list[Probe], after: list[Probe], row: MethodOutcome) -> str:
        """As a ROME edit's verdict: the neighbour's true answer should not collapse."""
        b = {p.name: p for p in before}
        for p in after:
            q = b.get(p.name)
            if p.name == "neighbour" and q and q.p_true is not None and p.p_true is not None:
                if q.p_true > 0.05 and p.p_true < 0.5 * q.p_true:
                    row.reasons.append(f"neighbour p(true) fell {q.p_true:.2f}→{p.p_true:.2f}")
                    return "warn"
        return "ok"

    # ----------------------------------------------------------- apply
    def outcome_of(self, form: EditForm, row: MethodOutcome, version: int) -> MethodEditOutcome:
        """A comparison row's update (:meth:`compare`, on the weights of Session.version
        ``version``) as an outcome to apply, not recomputed: the row's verdict; its probes
        before are scored by :meth:`apply` (the row has the bare prompt's only)."""
        if len(row.updates) != 1:
            raise ValueError(f"the {row.label} row holds {len(row.updates)} updates, not one")
        form = dataclasses.replace(form, method=row.method)
        verdict = Verdict(VERDICT_LEVELS[row.verdict], tuple(row.reasons))
        return MethodEditOutcome(form, row.updates[0], row, [], None, verdict, version=version)

    def apply(
        self, outcome: MethodEditOutcome, progress: Progress | None = None, generate: bool = True
    ) -> MethodApplied:
        """Apply a computed update through :meth:`Session.apply_step`: generations before /
        after, one stored step, an undo entry, the method's carried state folded in.

        An outcome without probes before (:meth:`outcome_of`) is scored first, on the
        weights it is applied to. ``progress`` may raise to cancel only before the
        weights change.
        """
        s = self.session
        upd = outcome.update
        with s.locked():
            self._fresh()
            med = self.editor_for(outcome.method)
            if not outcome.before:
                outcome.before = s.score_probes(outcome.form)

            def settle() -> Verdict:
                if outcome.after is None:
                    outcome.after = s.score_probes(outcome.form)
                return outcome.verdict

            def write(store: Store, run_id: str, seq: int, fp: str) -> None:
                store.add_step(run_id, seq, [self._row_of(outcome, seq, fp)], upd.layers)

            step = s.apply_step(
                outcome.form, upd, settle, write,
                mode=upd.method, norm=upd.norm, ratio=outcome.row.ratio, carrier=med,
                progress=progress, generate=generate,
            )  # fmt: skip
            return MethodApplied(
                step.number, outcome, step.generations, step.fingerprint, step.run_id, step.seq,
                step.store_error,
            )  # fmt: skip

    @staticmethod
    def _row_of(outcome: MethodEditOutcome, seq: int, fp: str) -> dict[str, Any]:
        """The stored edit row of a one-request step (``Store.add_step``)."""
        upd = outcome.update
        last = upd.layers[-1]
        record = dict(upd.records[0]) if upd.records else {}
        record.update(
            method=upd.method,
            preset=outcome.row.preset,
            method_options={k: v for k, v in upd.options.items() if _jsonable(v)},
            layer_norms={str(k): v for k, v in upd.layer_norms().items()},
            batch_size=1,
        )
        return dict(
            seq=seq,
            request=outcome.form.request().to_dict(),
            mode="",
            layer=last.layer,
            weight_name=last.weight_name,
            update_norm=upd.norm,
            update_norm_ratio=outcome.row.ratio,
            record=record,
            metrics=outcome.metrics(),
            flagged=outcome.verdict.disabling,
            flag_reason=outcome.verdict.summary or None,
            fingerprint=fp,
            method=upd.method,
        )

    # ----------------------------------------------------------- compare
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
        lm, ed = self.session.require()
        family = list(methods) or _family_methods()
        rows = [rome_row(m, modes[m], lm.hparams.name) for m in MODES if m in modes]
        reqs: list[EditRequest] = [form.request()]
        with self.session.locked():
            for m in family:
                if check:
                    check(m)
                med = self.editor_for(m)
                why = cannot_edit(m, med)
                if why is not None:  # not this architecture (UltraEdit on GPT-2): no row
                    log.info("compare leaves out %s: %s", m, why)
                    continue
                rows.append(run_method(lm, med, reqs, m, None))
        return judge_outcomes(rows, ed.hp.max_update_ratio)


def cannot_edit(method: str, editor: Editor) -> str | None:
    """Why ``method`` cannot edit ``editor``'s model with its settings (None: it can)."""
    m = get_method(method)
    return m.cannot_edit(editor.context(m), m.settings(editor.hp))


def _family_methods() -> list[str]:
    """The methods Compare sets beside ROME's key modes: the locate-then-edit family's
    (batched, on the family's templates), in the registry's order."""
    return [
        m
        for m in method_names()
        if get_method(m).capabilities.batched and get_method(m).capabilities.templates == "family"
    ]


def _jsonable(v: Any) -> bool:
    return isinstance(v, (str, int, float, bool, type(None), list, dict))
