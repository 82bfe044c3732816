"""Compute (F5), compare (F6), apply (F7) an edit, and generate (F9) on the model as it is."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace

from textual import on

from rome.methods import METHODS
from rome.progress import Progress
from workbench.core.forms import EditForm, has_key_modes
from workbench.core.generation import GenerationPair
from workbench.core.records import EditOutcome

from ..base import AppBase, guarded
from ..jobs import JobContext, JobEnd, JobId
from ..messages import (
    CompareComputed,
    EditApplied,
    EditComputed,
    MethodsCompared,
    Notice,
    OwnGenerated,
)
from ..panes.compare import ComparePane
from ..panes.edit import EditPane


class EditActions(AppBase):
    """The Edit, Compare and Generate tabs' actions."""

    def _phase_text(self, phase: str) -> str:
        if phase == "covariance":
            lm = self.session.lm
            corpus = lm.hparams.mom2_dataset if lm else ""
            return f"covariance over {corpus} texts (first time for this layer; cached after)"
        if phase == "v*":
            return "optimising v*"
        if phase in METHODS:
            return f"computing the {phase} update"
        return ""

    @staticmethod
    def _what(form: EditForm) -> str:
        """The edit in words: ``rrome`` (ROME's key mode) or the method."""
        return form.mode if form.is_rome else form.method

    def _job_form(self) -> EditForm | None:
        """The form's values when a model job may start now (idle, loaded, valid form)."""
        if self.refuse_busy():
            return None
        form = self.edit_pane.read_form()
        if form is None:
            self.show_tab("edit")
            self.notify("Fix the marked field(s) in the Edit tab.", severity="warning", timeout=4)
            return None
        if not self.need_model():
            return None
        return form

    def ready_outcome(self, form: EditForm) -> EditOutcome | None:
        """An update already computed for ``form`` on the current weights, if one is on screen.

        The Edit tab's result counts when its request, layer and mode match; a
        comparison's result of the form's mode when the form is unchanged since.
        """
        version = self.session.version
        o = self.edit_pane.outcome
        if o is not None and self.edit_pane.applied is None and form.same_edit(o.form):
            if o.version == version:
                return o
        c = self.compare_pane.outcomes.get(form.mode) if form.is_rome else None
        if c is not None and c.form == form and c.version == version:
            return c
        return None

    # ----------------------------------------------------------- compute / compare
    def action_compute(self) -> None:
        form = self._job_form()
        if form is None:
            return

        def work(ctx: JobContext) -> None:
            cb = ctx.engine_callback(self._phase_text)
            ctx.post(EditComputed(self.session.compute(form, progress=cb)))

        def ended(end: JobEnd) -> None:
            if end is not JobEnd.DONE:
                self.edit_pane.show_computing(f"Computing {end.value}")

        label = f"Computing the {self._what(form)} edit"
        if self.start_job(JobId.COMPUTE, label, work, on_end=ended):
            self.edit_pane.show_computing(f"Computing the {self._what(form)} update")

    def action_compare(self) -> None:
        form = self._job_form()
        if form is None:
            return

        rome_form = replace(form, method="rome")  # the key modes are ROME's
        family = self.methods.family()

        def work(ctx: JobContext) -> None:
            cb = ctx.engine_callback(self._phase_text)
            outcomes = self.session.compare(rome_form, progress=cb)
            ctx.post(CompareComputed(outcomes))

            def check(method: str) -> None:
                ctx.progress(method, family.index(method), len(family), self._phase_text(method))

            rows = self.methods.compare(rome_form, outcomes, family, check=check)
            ctx.post(MethodsCompared(rows))

        def ended(end: JobEnd) -> None:
            if end is not JobEnd.DONE:
                self.compare_pane.show_computing(f"Comparing {end.value}")

        label = "Comparing key modes and methods"
        if self.start_job(JobId.COMPARE, label, work, on_end=ended):
            self.compare_pane.show_computing(
                f"Computing ROME's three key modes, then {', '.join(family)}"
            )
            self.show_tab("compare")

    def on_edit_computed(self, msg: EditComputed) -> None:
        self.edit_pane.show_outcome(msg.outcome)
        if msg.outcome.verdict.disabling:
            self.notify(
                f"{msg.outcome.mode}: {msg.outcome.verdict.summary}",
                title="This update looks disabling",
                severity="warning",
                timeout=8,
            )

    def on_compare_computed(self, msg: CompareComputed) -> None:
        self.compare_pane.show(msg.outcomes)

    def on_methods_compared(self, msg: MethodsCompared) -> None:
        self.compare_pane.show_methods(msg.rows)

    @on(EditPane.Submitted)
    def _form_submitted(self) -> None:
        self.action_compute()

    # ----------------------------------------------------------- apply
    def action_apply(self) -> None:
        form = self._job_form()
        if form is None:
            return
        ready = self.ready_outcome(form)
        if ready is not None:
            self.apply_outcome(ready)
            return

        def work(ctx: JobContext) -> None:
            cb = ctx.engine_callback(self._phase_text)
            # no trial of the session's: the update is written once, by the apply (the
            # probes after then, unless the method scored them in its own trial)
            outcome = self.session.compute(form, progress=cb, trial=False)
            if outcome.verdict.disabling:  # not applied: its probes after from a trial
                ctx.post(EditComputed(self.session.tried(outcome)))
                ctx.post(
                    Notice(
                        "Not applied. Review it in the Edit tab; F7 applies it anyway.",
                        "warning",
                        "Looks disabling",
                    )
                )
                return
            ctx.check()  # the outcome is shown once applied (EditApplied)
            self._apply_in_job(ctx, outcome, cb)

        what = self._what(form)
        label = f"Computing and applying the {what} edit"
        if self.start_job(JobId.APPLY, label, work):
            self.edit_pane.show_computing(f"Computing the {what} update, then applying it")

    def _apply_in_job(self, ctx: JobContext, o: EditOutcome, progress: Progress) -> None:
        """In a job: apply ``o`` through the session (every method)."""
        ctx.post(EditApplied(self.session.apply(o, progress=progress)))

    def apply_outcome(self, o: EditOutcome, confirmed: bool = False) -> None:
        if self.refuse_busy() or not self.need_model():
            return
        if o.version != self.session.version:
            self.notify(
                "The model changed since this update was computed: compute it again (F5 / F6).",
                severity="warning",
            )
            return
        if o.verdict.level == "refused":
            self.notify(o.verdict.summary, title="Refused", severity="error")
            return
        if o.verdict.disabling and not confirmed:
            self._confirm_disabling(o)
            return

        def work(ctx: JobContext) -> None:
            self._apply_in_job(ctx, o, ctx.engine_callback())

        self.start_job(JobId.APPLY, f"Applying the {o.mode} edit", work)

    def _confirm_disabling(self, o: EditOutcome) -> None:
        from ..screens.dialogs import ConfirmDialog

        def answer(yes: bool | None) -> None:
            if yes:
                self.apply_outcome(o, True)

        self.push_screen(
            ConfirmDialog(
                "Apply a disabling update?",
                f"{o.mode}: {o.verdict.summary}.\nIt will likely damage the model (F8 undoes it).",
                yes="Apply anyway",
                no="Cancel",
            ),
            answer,
        )

    @on(ComparePane.ApplyMode)
    def _compare_apply(self, msg: ComparePane.ApplyMode) -> None:
        o = self.compare_pane.outcomes.get(msg.mode)
        if o is not None:
            self.apply_outcome(o)

    @on(ComparePane.ApplyRow)
    def _compare_apply_row(self, msg: ComparePane.ApplyRow) -> None:
        self.apply_compare_row(msg.label)

    def apply_compare_row(self, label: str) -> None:
        """Apply the comparison's method row ``label`` as the Edit tab's F7 would, with the
        update the comparison computed (not recomputed): a ``rome/<mode>`` row is that key
        mode's outcome, a batch method's row its update (``MethodCompare.outcome_of``; its
        probes before are scored in the apply job). ``apply_outcome`` refuses a stale
        (``Session.version`` moved on) or REFUSED one with a notice, nothing applied, and
        asks before a DISABLING one."""
        pane = self.compare_pane
        row = next((r for r in pane.method_rows if r.label == label), None)
        o: EditOutcome | None = None
        if row is not None and has_key_modes(row.method):  # a key mode's row: rome/<mode>
            o = pane.outcomes.get(label.removeprefix(f"{row.method}/"))  # emptied once applied
        elif row is not None and len(row.updates) == 1 and pane.version is not None and pane.form:
            o = self.methods.outcome_of(pane.form, row, pane.version)
        if o is None:
            self.notify(
                f"{label}: this comparison is out of date (the model changed since it was "
                "computed): compare again (F6).",
                title="Not applied",
                severity="warning",
            )
            return
        self.apply_outcome(o)

    @guarded("Showing the applied edit")
    def on_edit_applied(self, msg: EditApplied) -> None:
        info = msg.info
        o = info.outcome
        req = o.form.request()
        self.edit_pane.show_outcome(o, info)
        self._show_applied(
            o.mode,
            info.number,
            f"{req.subject} → {req.target_new}",
            o.norm,
            info.generations,
            info.store_error,
        )

    def _show_applied(
        self,
        label: str,
        number: int,
        change: str,
        norm: float,
        generations: Sequence[GenerationPair],
        store_error: str | None,
    ) -> None:
        """What every applied edit shows, whichever method made it: the Compare row
        marked, the text before | after, the weights, bar and history refreshed."""
        self.compare_pane.mark_applied(label, number)
        self.generation_pane.show_pairs(
            generations, f"Edit #{number}: {change} ({label}), before | after"
        )
        self.refresh_weights()
        self.update_bar()
        self.refresh_history()
        title = f"Edit #{number} applied"
        self.notify(f"{change} ({label}, ‖ΔW‖ {norm:.3g}).", title=title, timeout=4)
        if store_error:
            self.notify(
                f"The edit is on the model but not in the history: {store_error}",
                title="Not saved",
                severity="warning",
                timeout=10,
            )

    # ----------------------------------------------------------- generation
    def action_generate(self) -> None:
        if self.refuse_busy() or not self.need_model():
            return
        pane = self.generation_pane
        prompt = pane.prompt()
        if not prompt:
            self.show_tab("generate")
            pane.focus_prompt()
            self.notify("Type a prompt in the Generate tab first.", severity="warning")
            return
        n = self.session.n_applied

        def work(ctx: JobContext) -> None:
            text = self.session.generate([prompt], 40)[0]
            note = f"greedy, on the model with {n} edit(s) applied"
            ctx.post(OwnGenerated(prompt, text, note))

        self.start_job(JobId.GENERATE, "Generating", work)

    def on_own_generated(self, msg: OwnGenerated) -> None:
        self.generation_pane.show_own(msg.prompt, msg.text, msg.note)
