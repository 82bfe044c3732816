"""The Textual workbench app: a tabbed main screen over a :class:`Session`.

Every model or evaluation call runs in a thread worker started by
:meth:`WorkbenchApp.start_job` (one at a time); workers report back with the
messages of ``messages.py``. Worker errors reach one handler,
:meth:`WorkbenchApp.report_error`, which shows what to do, never a traceback.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable
from functools import partial, wraps
from pathlib import Path
from typing import Any, TypeVar

from textual import on
from textual.app import App, ComposeResult, SystemCommand
from textual.binding import Binding
from textual.screen import ModalScreen, Screen
from textual.widgets import Footer, TabbedContent, TabPane, Tabs
from textual.worker import Worker, WorkerState

from .errors import describe_error
from .examples import EXAMPLES
from .forms import EditForm
from .jobs import JobCancelled, JobContext
from .messages import (
    CompareComputed,
    CovarianceReady,
    EditApplied,
    EditComputed,
    HistoryLoaded,
    JobFailed,
    JobFinished,
    ModelChanged,
    ModelLoaded,
    Notice,
    OwnGenerated,
    Progress,
    ReplayEvent,
    ReplayRunsLoaded,
)
from .screens.compare import ComparePane
from .screens.dialogs import ConfirmDialog, ErrorDialog
from .screens.edit import EditPane
from .screens.generation import GenerationPane
from .screens.help import HelpScreen
from .screens.history import HistoryPane
from .screens.model import ModelPane
from .screens.replay import ReplayPane
from .screens.weights import WeightsPane
from .session import EditOutcome, Session
from .widgets.job_status import JobStatus
from .widgets.model_bar import ModelBar

log = logging.getLogger(__name__)

F = TypeVar("F", bound=Callable[..., Any])


def guarded(doing: str) -> Callable[[F], F]:
    """Route an exception in a main-thread handler to the app's error handler."""

    def wrap(fn: F) -> F:
        @wraps(fn)
        def inner(self: WorkbenchApp, *args: Any, **kwargs: Any) -> Any:
            try:
                return fn(self, *args, **kwargs)
            except Exception as exc:
                log.error("%s failed", doing, exc_info=exc)
                self.report_error(exc, doing)
                return None

        return inner  # type: ignore[return-value]

    return wrap


TABS = ("model", "edit", "compare", "generate", "weights", "history", "replay")
TAB_TITLES = {
    "model": "Model",
    "edit": "Edit",
    "compare": "Compare",
    "generate": "Generate",
    "weights": "Weights",
    "history": "History",
    "replay": "Replay",
}
#: actions that need the model to themselves (dimmed in the footer while a job runs)
MODEL_ACTIONS = frozenset(
    {
        "load_model",
        "compute",
        "compare",
        "apply",
        "undo",
        "revert_all",
        "generate",
        "prepare_covariance",
        "start_replay",
    }
)


class WorkbenchApp(App[None]):
    """ROME / r-ROME rank-one model editing workbench."""

    CSS_PATH = "workbench.tcss"
    TITLE = "rome-workbench"
    HORIZONTAL_BREAKPOINTS = [(0, "-narrow"), (110, "-wide")]
    BINDINGS = [
        Binding("f1", "help", "Help", id="help", tooltip="Keys, tabs and the workflow"),
        Binding("f2", "load_model", "Load", id="load_model", tooltip="Load the Model tab's model"),
        Binding(
            "f5", "compute", "Compute", id="compute", tooltip="Compute the edit; model unchanged"
        ),
        Binding("f6", "compare", "Compare", id="compare", tooltip="Compute the three key modes"),
        Binding("f7", "apply", "Apply", id="apply", tooltip="Apply the edit to the model"),
        Binding("f8", "undo", "Undo", id="undo", tooltip="Undo the last applied edit"),
        Binding(
            "f9",
            "generate",
            "Generate",
            id="generate",
            show=False,
            tooltip="Generate from the Generate tab's prompt",
        ),
        Binding(
            "escape",
            "cancel",
            "Cancel",
            id="cancel",
            tooltip="Cancel the running job between two steps",
        ),
        Binding("q", "quit", "Quit", id="quit", tooltip="Quit (asks first while a job runs)"),
        *[
            Binding(
                str(i + 1),
                f"show_tab('{tab}')",
                TAB_TITLES[tab],
                show=False,
                id=f"tab.{tab}",
                tooltip=f"Show the {TAB_TITLES[tab]} tab",
            )
            for i, tab in enumerate(TABS)
        ],
    ]

    def __init__(
        self,
        model: str = "smollm2-135m",
        db_path: str | Path | None = None,
        device: str = "auto",
        dtype: str | None = None,
        *,
        autoload: bool = True,
        store: Any = None,
    ) -> None:
        super().__init__()
        self.model_name = model
        self.db_path = db_path
        self.device = device
        self.dtype = dtype
        self.autoload = autoload
        self._given_store = store
        self._own_store = False
        self.session = Session()
        self._job: JobContext | None = None
        self._quit_pending = False
        self._first_load = True
        self._offered_resume: set[str] = set()

    # ----------------------------------------------------------- layout
    def compose(self) -> ComposeResult:
        yield ModelBar(id="model-bar")
        with TabbedContent(initial="tab-model", id="tabs"):
            with TabPane("Model", id="tab-model"):
                yield ModelPane(self.model_name, self.device, self.dtype)
            with TabPane("Edit", id="tab-edit"):
                yield EditPane()
            with TabPane("Compare", id="tab-compare"):
                yield ComparePane()
            with TabPane("Generate", id="tab-generate"):
                yield GenerationPane()
            with TabPane("Weights", id="tab-weights"):
                yield WeightsPane()
            with TabPane("History", id="tab-history"):
                yield HistoryPane()
            with TabPane("Replay", id="tab-replay"):
                yield ReplayPane()
        yield JobStatus(id="job-status")
        yield Footer(compact=True)

    def on_mount(self) -> None:
        self._open_store()
        self._update_bar()
        self.refresh_history()
        self.refresh_replay_runs()
        if self.autoload:
            self.action_load_model()

    def on_unmount(self) -> None:
        self.close_session()

    def close_session(self) -> None:
        """End the session run and close the store we opened (not while a job runs)."""
        if self._job is not None:
            return
        self.session.finish()
        if self._own_store and self.session.store is not None:
            self.session.store.close()
            self.session.store = None

    def _open_store(self) -> None:
        from workbench.store import Store, StoreError

        if self._given_store is not None:
            self.session.store = self._given_store
        else:
            try:
                self.session.store = Store.open(self.db_path)
                self._own_store = True
            except StoreError as exc:
                self.session.store_error = str(exc)
                self.report_error(exc, "Opening the database")
                return
        try:
            stale = self.session.store.recover_stale_runs()
        except StoreError as exc:
            self.report_error(exc, "Checking for interrupted runs")
            return
        if stale:
            log.info("interrupted runs: %s", stale)

    # ----------------------------------------------------------- panes
    @property
    def edit_pane(self) -> EditPane:
        return self.query_one(EditPane)

    @property
    def compare_pane(self) -> ComparePane:
        return self.query_one(ComparePane)

    @property
    def replay_pane(self) -> ReplayPane:
        return self.query_one(ReplayPane)

    @property
    def job_status(self) -> JobStatus:
        return self.query_one(JobStatus)

    def show_tab(self, tab: str) -> None:
        """Switch tab; focus moves to the tab bar when it was on the hidden pane."""
        tabs = self.query_one(TabbedContent)
        tabs.active = f"tab-{tab}"
        pane = tabs.get_pane(f"tab-{tab}")
        focused = self.focused
        if focused is not None and not isinstance(self.screen, ModalScreen):
            if pane not in focused.ancestors:
                tabs.query_one(Tabs).focus()

    def _update_bar(self, state: str = "") -> None:
        bar = self.query_one(ModelBar)
        lm = self.session.lm
        if lm is None:
            bar.show(None, state=state)
            return
        bar.show(
            lm.name,
            device=str(lm.device),
            dtype=str(lm.dtype).replace("torch.", ""),
            layer=lm.hparams.layer,
            n_layers=lm.n_layers,
            applied=self.session.n_applied,
            state=state,
        )

    # ----------------------------------------------------------- jobs
    @property
    def busy(self) -> bool:
        return self._job is not None

    def _refuse_busy(self) -> bool:
        if self._job is None:
            return False
        self.notify(
            f"{self._job.label} is running; wait for it or press Esc to cancel it.",
            title="Busy",
            severity="warning",
        )
        return True

    def _need_model(self) -> bool:
        if self.session.loaded:
            return True
        self.notify(
            "Load a model first: F2, or the Model tab.", title="No model", severity="warning"
        )
        return False

    def start_job(self, job: str, label: str, fn: Callable[[JobContext], None]) -> bool:
        """Run ``fn`` in a thread worker; one job at a time. False if another runs."""
        if self._refuse_busy():
            return False
        ctx = JobContext(job, label, self.post_message)
        self._job = ctx
        self.job_status.start(label)
        self.refresh_bindings()
        self.run_worker(
            partial(self._job_body, ctx, fn),
            name=job,
            group="model",
            thread=True,
            exit_on_error=False,
        )
        return True

    def _job_body(self, ctx: JobContext, fn: Callable[[JobContext], None]) -> None:
        t0 = time.monotonic()
        status = "done"
        try:
            fn(ctx)
        except JobCancelled:
            status = "cancelled"
        except Exception as exc:  # every job error goes to the one handler
            status = "failed"
            log.error("job %s failed", ctx.job, exc_info=exc)
            self.post_message(JobFailed(ctx.job, ctx.label, exc))
        finally:
            self.post_message(JobFinished(ctx.job, ctx.label, status, time.monotonic() - t0))

    def run_background(self, name: str, label: str, fn: Callable[[], None]) -> None:
        """Store reads that may run beside a model job (history, runs)."""

        def body() -> None:
            try:
                fn()
            except Exception as exc:
                log.error("%s failed", name, exc_info=exc)
                self.post_message(JobFailed(name, label, exc))

        self.run_worker(
            body, name=name, group=name, thread=True, exclusive=True, exit_on_error=False
        )

    def on_progress(self, msg: Progress) -> None:
        if self._job is not None and msg.job == self._job.job and not self._job.cancelled:
            self.job_status.progress(msg.phase, msg.done, msg.total, msg.detail)

    def on_job_finished(self, msg: JobFinished) -> None:
        if self._job is not None and self._job.job == msg.job:
            self._job = None
        text = {
            "done": f"{msg.label}: done in {msg.seconds:.1f} s",
            "cancelled": f"{msg.label}: cancelled",
            "failed": f"{msg.label}: failed (see the message)",
        }[msg.status]
        self.job_status.finish(text)
        self.refresh_bindings()
        if msg.job == "load":
            self._after_load_job(msg.status)
        elif msg.job == "replay":
            self.replay_pane.stopped()
            self.refresh_replay_runs()
            self.refresh_history()
            self._update_bar()
        elif msg.job in ("compute", "compare") and msg.status != "done":
            if msg.job == "compute":
                self.edit_pane.show_computing(f"Computing {msg.status}")
            else:
                self.compare_pane.show_computing(f"Comparing {msg.status}")
        if msg.status == "cancelled":
            self.notify(f"{msg.label} was cancelled.", severity="warning", timeout=4)
        if self._quit_pending:
            self.exit()

    @on(JobFailed)
    def _job_failed(self, msg: JobFailed) -> None:
        self.report_error(msg.error, msg.label)

    def on_worker_state_changed(self, event: Worker.StateChanged) -> None:
        """Fallback: a worker that raised past its job wrapper."""
        if event.state == WorkerState.ERROR and event.worker.error is not None:
            self.report_error(event.worker.error, event.worker.name or "A background task")

    def report_error(self, exc: BaseException, doing: str = "") -> None:
        """The one error handler: a notification, or a dialog for serious errors."""
        info = describe_error(exc, doing)
        if info.dialog:
            log.error("%s: %s", info.title, info.message)
            self.push_screen(ErrorDialog(info.title, info.message, info.hint))
        else:
            self.notify(info.text, title=info.title, severity=info.severity, timeout=10)  # type: ignore[arg-type]

    @on(Notice)
    def _notice(self, msg: Notice) -> None:
        self.notify(msg.text, title=msg.title, severity=msg.severity, timeout=8)  # type: ignore[arg-type]

    def check_action(self, action: str, parameters: tuple[object, ...]) -> bool | None:
        if action == "cancel":
            return self._job is not None
        if action in MODEL_ACTIONS and self._job is not None:
            return None
        if isinstance(self.screen, ModalScreen) and action in MODEL_ACTIONS:
            return None
        return True

    # ----------------------------------------------------------- model
    def action_load_model(self) -> None:
        if self._refuse_busy():
            return
        pane = self.query_one(ModelPane)
        name, device, dtype = pane.values()
        if not name:
            pane.set_error("is empty: a preset name, a hub id or a local folder")
            self.show_tab("model")
            return
        pane.set_error(None)
        if self.session.n_applied:

            def answer(yes: bool | None) -> None:
                if yes:
                    self._load(name, device, dtype)

            self.push_screen(
                ConfirmDialog(
                    "Load another model?",
                    f"{self.session.n_applied} edit(s) are applied to the loaded model. "
                    "Loading replaces it; the edits stay in the history and can be re-applied.",
                    yes="Load",
                    no="Keep",
                ),
                answer,
            )
            return
        self._load(name, device, dtype)

    def _load(self, name: str, device: str, dtype: str | None) -> None:
        def work(ctx: JobContext) -> None:
            ctx.progress("loading", 0, None, name)
            info = self.session.load(name, device, dtype)
            ctx.post(ModelLoaded(info))
            t0 = time.monotonic()
            corpus = info.covariance
            desc = self.session.prepare(
                progress=ctx.engine_callback(lambda phase: f"{phase}: {corpus}")
            )
            ctx.post(CovarianceReady(info.layer, desc, time.monotonic() - t0))

        if self.start_job("load", f"Loading {name}", work):
            self.query_one(ModelPane).set_loading(True, f"Loading {name} ({device})…")
            self._update_bar(f"loading {name}…")

    @guarded("Showing the model")
    def _after_load_job(self, status: str) -> None:
        pane = self.query_one(ModelPane)
        if not self.session.loaded:
            pane.set_loading(False)
            pane.query_one("#model-info").update("No model loaded.")  # type: ignore[attr-defined]
            self._update_bar()
            return
        pane.show_info(self.session.info())
        if status == "cancelled":
            self.notify(
                "The covariance will be computed at the first edit.",
                title="Covariance not ready",
                severity="warning",
            )

    @guarded("Showing the model")
    def on_model_loaded(self, msg: ModelLoaded) -> None:
        info = msg.info
        self.query_one(ModelPane).show_info(info)
        self.edit_pane.set_model(info.n_layers, info.layer, info.default_mode)
        self._update_bar()
        self.query_one(WeightsPane).show([], None)
        self.refresh_history()
        self.refresh_replay_runs()
        self.notify(
            f"{info.name} on {info.device} ({info.n_layers} layers, edit layer {info.layer}) "
            f"in {info.seconds:.1f} s.",
            title="Model loaded",
            timeout=4,
        )
        if self._first_load and self.query_one(TabbedContent).active == "tab-model":
            self.show_tab("edit")
        self._first_load = False

    @guarded("Showing the model")
    def on_covariance_ready(self, msg: CovarianceReady) -> None:
        if self.session.loaded:
            self.query_one(ModelPane).show_info(self.session.info())
        if msg.seconds > 2:
            self.notify(
                f"Layer {msg.layer}: {msg.description} "
                f"({msg.seconds:.0f} s; cached for next time).",
                title="Covariance ready",
                timeout=5,
            )

    def action_prepare_covariance(self) -> None:
        if self._refuse_busy() or not self._need_model():
            return
        layer_text = self.edit_pane.raw_values().get("layer", "").strip()
        layer = int(layer_text) if layer_text.isdigit() else None

        def work(ctx: JobContext) -> None:
            t0 = time.monotonic()
            desc = self.session.prepare(layer, progress=ctx.engine_callback())
            lm, _ = self.session.require()
            ctx.post(
                CovarianceReady(
                    lm.hparams.layer if layer is None else layer, desc, time.monotonic() - t0
                )
            )

        self.start_job("prepare", "Preparing covariance", work)

    # ----------------------------------------------------------- edit
    def _phase_text(self, phase: str) -> str:
        if phase == "covariance":
            lm = self.session.lm
            corpus = lm.hparams.mom2_dataset if lm else ""
            return f"covariance over {corpus} texts (first time for this layer; cached after)"
        if phase == "v*":
            return "optimising v*"
        return ""

    def _read_form(self) -> EditForm | None:
        form = self.edit_pane.read_form()
        if form is None:
            self.show_tab("edit")
            self.notify("Fix the marked field(s) in the Edit tab.", severity="warning", timeout=4)
        return form

    def _job_form(self) -> EditForm | None:
        """The form's values when a model job may start now (idle, loaded, valid form)."""
        if self._refuse_busy():
            return None
        form = self._read_form()
        if form is None or not self._need_model():
            return None
        return form

    def action_compute(self) -> None:
        form = self._job_form()
        if form is None:
            return

        def work(ctx: JobContext) -> None:
            outcome = self.session.compute(form, progress=ctx.engine_callback(self._phase_text))
            ctx.post(EditComputed(outcome))

        if self.start_job("compute", f"Computing the {form.mode} edit", work):
            self.edit_pane.show_computing(f"Computing the {form.mode} update")

    def action_compare(self) -> None:
        form = self._job_form()
        if form is None:
            return

        def work(ctx: JobContext) -> None:
            outcomes = self.session.compare(form, progress=ctx.engine_callback(self._phase_text))
            ctx.post(CompareComputed(outcomes))

        if self.start_job("compare", "Comparing key modes", work):
            self.compare_pane.show_computing("Computing the update in the three key modes")
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

    def action_apply(self) -> None:
        form = self._job_form()
        if form is None:
            return
        pane = self.edit_pane
        o = pane.outcome
        if (
            o is not None
            and pane.applied is None
            and form.same_edit(o.form)
            and o.version == self.session.version
        ):
            self.apply_outcome(o)
            return

        def work(ctx: JobContext) -> None:
            cb = ctx.engine_callback(self._phase_text)
            outcome = self.session.compute(form, progress=cb)
            ctx.post(EditComputed(outcome))
            if outcome.verdict.disabling:
                ctx.post(
                    Notice(
                        "Not applied. Review it in the Edit tab; F7 applies it anyway.",
                        "warning",
                        "Looks disabling",
                    )
                )
                return
            ctx.check()
            ctx.post(EditApplied(self.session.apply(outcome, progress=cb)))

        if self.start_job("apply", f"Computing and applying the {form.mode} edit", work):
            pane.show_computing(f"Computing the {form.mode} update, then applying it")

    def apply_outcome(self, o: EditOutcome, confirmed: bool = False) -> None:
        if self._refuse_busy() or not self._need_model():
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

            def answer(yes: bool | None) -> None:
                if yes:
                    self.apply_outcome(o, True)

            self.push_screen(
                ConfirmDialog(
                    "Apply a disabling update?",
                    f"{o.mode}: {o.verdict.summary}.\nIt will likely damage the model "
                    "(F8 undoes it).",
                    yes="Apply anyway",
                    no="Cancel",
                ),
                answer,
            )
            return

        def work(ctx: JobContext) -> None:
            ctx.post(EditApplied(self.session.apply(o, progress=ctx.engine_callback())))

        self.start_job("apply", f"Applying the {o.mode} edit", work)

    @on(ComparePane.ApplyMode)
    def _compare_apply(self, msg: ComparePane.ApplyMode) -> None:
        o = self.compare_pane.outcomes.get(msg.mode)
        if o is not None:
            self.apply_outcome(o)

    @on(EditPane.Submitted)
    def _form_submitted(self) -> None:
        self.action_compute()

    @guarded("Showing the applied edit")
    def on_edit_applied(self, msg: EditApplied) -> None:
        info = msg.info
        o = info.outcome
        r = o.result
        self.edit_pane.show_outcome(o, info)
        self.compare_pane.mark_applied(r.mode, info.number)
        self.query_one(GenerationPane).show_pairs(
            info.generations,
            f"Edit #{info.number}: {r.request.subject} → {r.request.target_new} ({r.mode}), "
            "before | after",
        )
        self._refresh_weights()
        self._update_bar()
        self.refresh_history()
        self.notify(
            f"{r.request.subject} → {r.request.target_new} ({r.mode}, ‖ΔW‖ {r.update_norm:.3g}).",
            title=f"Edit #{info.number} applied",
            timeout=4,
        )
        if info.store_error:
            self.notify(
                f"The edit is on the model but not in the history: {info.store_error}",
                title="Not saved",
                severity="warning",
                timeout=10,
            )

    def _refresh_weights(self) -> None:
        self.query_one(WeightsPane).show(self.session.timeline, None)

    # ----------------------------------------------------------- undo / revert / re-apply
    def action_undo(self) -> None:
        if self._refuse_busy() or not self._need_model():
            return
        if self.session.n_applied == 0:
            self.notify("No applied edit to undo.", title="Nothing to undo", severity="warning")
            return

        def work(ctx: JobContext) -> None:
            ctx.post(ModelChanged(self.session.undo()))

        self.start_job("undo", "Undoing the last edit", work)

    def action_revert_all(self) -> None:
        if self._refuse_busy() or not self._need_model():
            return
        n = self.session.n_applied
        if n == 0:
            self.notify("The model has its base weights already.", title="Nothing to revert")
            return

        def work(ctx: JobContext) -> None:
            k = self.session.revert_all()
            ctx.post(ModelChanged(f"reverted {k} edit(s): base weights restored"))

        def answer(yes: bool | None) -> None:
            if yes:
                self.start_job("revert", "Reverting to the base weights", work)

        self.push_screen(
            ConfirmDialog(
                "Revert to the base weights?",
                f"Undo all {n} applied edit(s)? They stay in the history and can be re-applied.",
                yes="Revert",
                no="Keep",
            ),
            answer,
        )

    @on(HistoryPane.Reapply)
    def _reapply(self, msg: HistoryPane.Reapply) -> None:
        if self._refuse_busy() or not self._need_model():
            return
        row = msg.row
        if msg.whole_run:
            keys = self.query_one(HistoryPane).run_keys(row.run_id)
            if row.in_session:
                self.notify(
                    "That is this session's own run: undo / re-apply its edits one by one.",
                    severity="warning",
                )
                return
        else:
            if row.in_session and row.applied:
                self.notify("That edit is on the model already.", severity="warning")
                return
            if row.refused:
                self.notify("That edit was refused when it was made.", severity="warning")
                return
            keys = [(row.run_id, row.seq)]
        if not keys:
            self.notify("No applied edits in that run.", severity="warning")
            return

        def work(ctx: JobContext) -> None:
            before = self.session.n_applied
            try:
                self.session.reapply(keys, progress=ctx.engine_callback())
            finally:  # also after a cancel or an error part way: show what is on the model
                n = self.session.n_applied - before
                ctx.post(ModelChanged(f"re-applied {n} of {len(keys)} stored edit(s)"))

        self.start_job("reapply", f"Re-applying {len(keys)} edit(s)", work)

    @guarded("Showing the model")
    def on_model_changed(self, msg: ModelChanged) -> None:
        self._update_bar()
        self._refresh_weights()
        self.refresh_history()
        self.edit_pane.clear_applied()
        self.notify(msg.what[0].upper() + msg.what[1:] + ".", timeout=4)

    # ----------------------------------------------------------- generation
    def action_generate(self) -> None:
        if self._refuse_busy() or not self._need_model():
            return
        pane = self.query_one(GenerationPane)
        prompt = pane.prompt()
        if not prompt:
            self.show_tab("generate")
            pane.query_one("#gen-prompt").focus()
            self.notify("Type a prompt in the Generate tab first.", severity="warning")
            return
        n = self.session.n_applied

        def work(ctx: JobContext) -> None:
            text = self.session.generate([prompt], 40)[0]
            note = f"greedy, on the model with {n} edit(s) applied"
            ctx.post(OwnGenerated(prompt, text, note))

        self.start_job("generate", "Generating", work)

    def on_own_generated(self, msg: OwnGenerated) -> None:
        self.query_one(GenerationPane).show_own(msg.prompt, msg.text, msg.note)

    # ----------------------------------------------------------- history
    def action_refresh_history(self) -> None:
        self.refresh_history()

    def refresh_history(self) -> None:
        if self.session.store is None:
            self.query_one(HistoryPane).show(
                [], f"no database: {self.session.store_error or 'not open'}"
            )
            return
        note = "" if self.session.loaded else "(all models; load one to see only its edits)"

        def work() -> None:
            self.post_message(HistoryLoaded(self.session.history(), note))

        self.run_background("history", "Reading the history", work)

    @guarded("Showing the history")
    def on_history_loaded(self, msg: HistoryLoaded) -> None:
        self.query_one(HistoryPane).show(msg.rows, msg.note)

    # ----------------------------------------------------------- replay
    def refresh_replay_runs(self) -> None:
        if self.session.store is None:
            return

        def work() -> None:
            self.post_message(ReplayRunsLoaded(self.session.replay_runs(), []))

        self.run_background("replay-runs", "Reading the replay runs", work)

    @guarded("Showing the replay runs")
    def on_replay_runs_loaded(self, msg: ReplayRunsLoaded) -> None:
        self.replay_pane.show_runs(msg.runs)
        from .replay_data import resumable

        for run in resumable(msg.runs):
            if run.status == "interrupted" and run.id not in self._offered_resume:
                self._offered_resume.add(run.id)
                self.notify(
                    f"Replay {run.id} ({run.mode}) stopped at {run.n_edits}/"
                    f"{run.n_edits_planned} edits. Replay tab → select it → Resume.",
                    title="Interrupted replay",
                    severity="warning",
                    timeout=10,
                )

    def action_start_replay(self) -> None:
        if self._refuse_busy():
            return
        vals = self.replay_pane.check()
        if vals is None:
            self.show_tab("replay")
            self.notify("Fix the replay settings.", severity="warning", timeout=4)
            return
        if not self._need_model():
            return
        if self.session.store is None:
            self.notify("A replay needs the database, which is not open.", severity="error")
            return
        from .replay_data import make_config

        self._start_replay(make_config(vals), None)

    def _start_replay(self, cfg: Any, resume: str | None) -> None:
        n = self.session.n_applied

        def work(ctx: JobContext) -> None:
            if n:
                k = self.session.revert_all()
                ctx.post(ModelChanged(f"reverted {k} edit(s) for the replay"))
            self.session.run_replay(
                cfg, ctx.cancel_event, lambda ev: ctx.post(ReplayEvent(ev)), resume=resume
            )

        label = (
            f"Resuming replay {resume}" if resume else f"Replay ({cfg.mode}, {cfg.n_edits} edits)"
        )

        def go() -> None:
            if self.start_job("replay", label, work):
                self.show_tab("replay")
                self.replay_pane.query_one("#replay-status").update(  # type: ignore[attr-defined]
                    "Starting: loading data, baseline GLUE checkpoint…"
                )

        if n:
            self.push_screen(
                ConfirmDialog(
                    "Revert the session's edits?",
                    f"A replay starts from the base weights; {n} edit(s) are applied now. "
                    "Revert them (they stay in the history) and start?",
                    yes="Revert and start",
                    no="Cancel",
                ),
                lambda yes: go() if yes else None,
            )
        else:
            go()

    @guarded("Showing the replay")
    def on_replay_event(self, msg: ReplayEvent) -> None:
        ev = msg.event
        kind = type(ev).__name__
        pane = self.replay_pane
        if kind == "ReplayStarted":
            existing = None
            mode = ""
            store = self.session.store
            if store is not None:
                from .replay_data import series_from_store

                run = store.get_run(ev.run_id)
                mode = run.mode or ""
                if ev.start_seq:
                    existing = series_from_store(store, run)
            pane.start_live(ev.run_id, ev.total, ev.start_seq, mode, existing)
            self.job_status.progress("edits", ev.start_seq, ev.total, "baseline checkpoint")
            self.refresh_replay_runs()
            return
        pane.handle(ev)
        if kind == "EditDone":
            self.job_status.progress(
                "edits", ev.seq + 1, ev.total, f"{ev.subject} → {ev.target_new}"
            )
        elif kind == "CheckpointDone":
            self.job_status.progress("checkpoint", ev.step, pane.total or None, "GLUE done")
        elif kind == "ReplayFinished":
            self.notify(
                f"Run {ev.run_id}: {ev.status}. Its edits are in the history; "
                "the model's weights were restored.",
                title="Replay " + ev.status,
                timeout=6,
            )
            self.refresh_replay_runs()

    @on(ReplayPane.RunAction)
    @guarded("Opening the run")
    def _run_action(self, msg: ReplayPane.RunAction) -> None:
        store = self.session.store
        if store is None:
            return
        from .replay_data import series_from_store

        run = store.get_run(msg.run_id)
        if msg.action in ("open", "overlay"):
            self.replay_pane.open_series(series_from_store(store, run), msg.action == "overlay")
            return
        if run.status not in ("interrupted", "cancelled", "failed"):
            self.notify(f"Run {run.id} is {run.status}: nothing to resume.", severity="warning")
            return
        if self._refuse_busy() or not self._need_model():
            return
        self._start_replay(None, run.id)

    # ----------------------------------------------------------- misc actions
    def action_cancel(self) -> None:
        if self._job is None:
            return
        self._job.cancel()
        what = "the current edit" if self._job.job == "replay" else "the current step"
        self.job_status.progress("cancelling", 0, None, f"stops after {what}")
        self.notify(f"Cancelling {self._job.label}: it stops after {what}.", timeout=4)

    def action_help(self) -> None:
        if not isinstance(self.screen, HelpScreen):
            self.push_screen(HelpScreen())

    def action_show_tab(self, tab: str) -> None:
        if tab in TABS:
            self.show_tab(tab)

    def action_example(self, key: str) -> None:
        self.show_tab("edit")
        self.edit_pane.choose_example(key)

    async def action_quit(self) -> None:
        if self._job is None or self._quit_pending:
            self.exit()
            return
        job = self._job

        def answer(yes: bool | None) -> None:
            if yes and self._job is job:
                self._quit_pending = True
                job.cancel()
                self.notify(
                    f"Stopping {job.label} after the current step, then quitting "
                    "(q again quits at once).",
                    timeout=10,
                )
            elif yes:
                self.exit()

        self.push_screen(
            ConfirmDialog(
                "Quit?",
                f"{job.label} is running. Quit anyway? It stops after the current step; "
                "finished edits are kept in the history.",
                yes="Quit",
                no="Keep working",
            ),
            answer,
        )

    # ----------------------------------------------------------- command palette
    def get_system_commands(self, screen: Screen) -> Iterable[SystemCommand]:
        yield from super().get_system_commands(screen)
        commands = [
            ("Load model", "Load the model named in the Model tab (F2)", self.action_load_model),
            (
                "Prepare covariance",
                "Compute the covariance statistics for the edit layer now",
                self.action_prepare_covariance,
            ),
            (
                "Compute edit",
                "Compute the Edit tab's update; model unchanged (F5)",
                self.action_compute,
            ),
            (
                "Compare key modes",
                "original vs rrome vs prompt side by side (F6)",
                self.action_compare,
            ),
            ("Apply edit", "Apply the Edit tab's edit to the model (F7)", self.action_apply),
            ("Undo last edit", "Restore the weights before the last edit (F8)", self.action_undo),
            ("Revert to base weights", "Undo every applied edit", self.action_revert_all),
            (
                "Generate",
                "Greedy continuation of the Generate tab's prompt (F9)",
                self.action_generate,
            ),
            ("Start replay", "Run the Replay tab's CounterFact sequence", self.action_start_replay),
            ("Cancel job", "Stop the running job between two steps (Esc)", self.action_cancel),
            ("Refresh history", "Reload the stored edits", self.action_refresh_history),
            ("Help", "Keys, tabs and the workflow (F1)", self.action_help),
        ]
        for title, help_text, cb in commands:
            yield SystemCommand(title, help_text, cb)
        for i, tab in enumerate(TABS):
            yield SystemCommand(
                f"Go to {TAB_TITLES[tab]}",
                f"Show the {TAB_TITLES[tab]} tab ({i + 1})",
                partial(self.show_tab, tab),
            )
        for e in EXAMPLES:
            yield SystemCommand(
                f"Example: {e.title}",
                f"Fill the edit form: {e.note or e.prompt}",
                partial(self.action_example, e.key),
            )


def run_app(
    model: str = "smollm2-135m",
    db_path: str | Path | None = None,
    device: str = "auto",
    dtype: str | None = None,
    *,
    autoload: bool = True,
    log_file: str | Path | None = None,
) -> None:
    """Open the workbench (the CLI's default command). Logs go to a file, not the screen."""
    _setup_logging(log_file)
    WorkbenchApp(model=model, db_path=db_path, device=device, dtype=dtype, autoload=autoload).run()


def _setup_logging(log_file: str | Path | None) -> None:
    if log_file is None:
        from rome.paths import cache_dir

        log_file = cache_dir() / "logs" / "tui.log"
    path = Path(log_file)
    path.parent.mkdir(parents=True, exist_ok=True)
    handler = logging.FileHandler(path, encoding="utf-8")
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger()
    root.addHandler(handler)
    if root.level > logging.INFO or root.level == logging.NOTSET:
        root.setLevel(logging.INFO)
    for noisy in ("httpx", "urllib3", "filelock"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
