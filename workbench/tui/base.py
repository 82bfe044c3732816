"""What every part of the app shares: the session, the job runner, the panes, the error handler.

:class:`AppBase` is the root of the app's classes; ``actions/`` adds one
workflow per module on top of it and ``app.py`` puts them together. Every
model or evaluation call runs through :meth:`AppBase.start_job` (one at a
time); store reads through :meth:`AppBase.read`. Every error, from a worker or
a main-thread handler, reaches :meth:`AppBase.report_error`, which shows what
to do, never a traceback.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from functools import wraps
from pathlib import Path
from typing import Any, TypeVar

from textual import on
from textual.app import App, ScreenStackError
from textual.css.query import NoMatches
from textual.message import Message
from textual.screen import ModalScreen
from textual.widgets import TabbedContent, Tabs
from textual.worker import Worker, WorkerState

from workbench.core.errors import describe as describe_error
from workbench.core.method_compare import MethodCompare
from workbench.core.session import Session

from .job_kinds import JobEnd, JobId, ReadId
from .jobs import JobContext, JobRunner
from .logs import QuietTerminal
from .messages import JobFailed, JobFinished, Notice, Progress
from .panes.compare import ComparePane
from .panes.edit import EditPane
from .panes.generation import GenerationPane
from .panes.history import HistoryPane
from .panes.model import ModelPane
from .panes.replay import ReplayPane
from .panes.runs import RunsPane
from .panes.weights import WeightsPane
from .widgets.job_status import JobStatus
from .widgets.model_bar import ModelBar

log = logging.getLogger(__name__)

F = TypeVar("F", bound=Callable[..., Any])

TABS = ("model", "edit", "compare", "generate", "weights", "history", "replay", "runs")
TAB_TITLES = {
    "model": "Model",
    "edit": "Edit",
    "compare": "Compare",
    "generate": "Generate",
    "weights": "Weights",
    "history": "History",
    "replay": "Replay",
    "runs": "Runs",
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
END_TEXT = {
    JobEnd.DONE: "{label}: done in {seconds:.1f} s",
    JobEnd.CANCELLED: "{label}: cancelled",
    JobEnd.FAILED: "{label}: failed (see the message)",
}


def guarded(doing: str) -> Callable[[F], F]:
    """Route an exception in a main-thread handler to the app's error handler."""

    def wrap(fn: F) -> F:
        @wraps(fn)
        def inner(self: AppBase, *args: Any, **kwargs: Any) -> Any:
            try:
                return fn(self, *args, **kwargs)
            except Exception as exc:
                log.error("%s failed", doing, exc_info=exc)
                self.report_error(exc, doing)
                return None

        return inner  # type: ignore[return-value]

    return wrap


class AppBase(App[None]):
    """State and helpers shared by the app's workflows (see ``actions/``)."""

    def __init__(
        self,
        model: str = "smollm2-135m",
        db_path: str | Path | None = None,
        device: str = "auto",
        dtype: str | None = None,
        *,
        device_map: str | None = None,
        autoload: bool = True,
        store: Any = None,
        log_file: str | Path | None = None,
    ) -> None:
        super().__init__()
        self.model_name = model
        self.db_path = db_path
        self.device = device
        self.dtype = dtype
        self.device_map = device_map
        self.autoload = autoload
        self._given_store = store
        self._own_store = False
        self.session = Session()
        self.methods = MethodCompare(self.session)  # Compare: key modes beside the family
        self.jobs = JobRunner(self)
        self.quiet = QuietTerminal(log_file)
        self._on_end: dict[JobId, Callable[[JobEnd], None]] = {}
        self._quit_pending = False
        self._store_opening = True  # until the database is open (or failed to open)
        self._first_load = True
        self._offered_resume: set[str] = set()
        self._listed: tuple[Any, ...] = ()  # the run list last shown (unchanged: not redrawn)

    # ----------------------------------------------------------- panes
    @property
    def model_pane(self) -> ModelPane:
        return self.query_one(ModelPane)

    @property
    def edit_pane(self) -> EditPane:
        return self.query_one(EditPane)

    @property
    def compare_pane(self) -> ComparePane:
        return self.query_one(ComparePane)

    @property
    def generation_pane(self) -> GenerationPane:
        return self.query_one(GenerationPane)

    @property
    def weights_pane(self) -> WeightsPane:
        return self.query_one(WeightsPane)

    @property
    def history_pane(self) -> HistoryPane:
        return self.query_one(HistoryPane)

    @property
    def replay_pane(self) -> ReplayPane:
        return self.query_one(ReplayPane)

    @property
    def runs_pane(self) -> RunsPane:
        return self.query_one(RunsPane)

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

    @property
    def active_tab(self) -> str:
        return (self.query_one(TabbedContent).active or "").removeprefix("tab-")

    def update_bar(self, state: str = "") -> None:
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
        return self.jobs.busy

    def refuse_busy(self) -> bool:
        job = self.jobs.current
        if job is None:
            return False
        self.notify(
            f"{job.label} is running; wait for it or press Esc to cancel it.",
            title="Busy",
            severity="warning",
        )
        return True

    def need_model(self) -> bool:
        if self.session.loaded:
            return True
        self.notify(
            "Load a model first: F2, or the Model tab.", title="No model", severity="warning"
        )
        return False

    def start_job(
        self,
        job: JobId,
        label: str,
        fn: Callable[[JobContext], None],
        on_end: Callable[[JobEnd], None] | None = None,
    ) -> bool:
        """Run ``fn`` in a thread worker; one job at a time. False if another runs.

        ``on_end`` is called on the main thread once the job is over, however it ended.
        """
        if self.refuse_busy():
            return False
        if self.jobs.start(job, label, fn) is None:
            return False
        if on_end is not None:
            self._on_end[job] = on_end
        self.job_status.start(label)
        self.refresh_bindings()
        return True

    def read(self, read: ReadId, label: str, fn: Callable[[], Message | None]) -> None:
        """A store read in a worker, beside any job; ``fn`` returns the message to post."""
        self.jobs.read(read, label, fn)

    def _status_line(self) -> JobStatus | None:
        """The status line; None while the app closes (a late message from a worker)."""
        try:
            return self.query_one(JobStatus)
        except (NoMatches, ScreenStackError):
            return None

    def on_progress(self, msg: Progress) -> None:
        job = self.jobs.current
        status = self._status_line()
        if status is not None and job is not None and msg.job is job.job and not job.cancelled:
            status.progress(msg.phase, msg.done, msg.total, msg.detail)

    def on_job_finished(self, msg: JobFinished) -> None:
        self.jobs.finished(msg)
        status = self._status_line()
        if status is None:
            return
        status.finish(END_TEXT[msg.end].format(label=msg.label, seconds=msg.seconds))
        self.refresh_bindings()
        after = self._on_end.pop(msg.job, None)
        if after is not None:
            self._after_job(after, msg.end)
        if msg.end is JobEnd.CANCELLED:
            self.notify(f"{msg.label} was cancelled.", severity="warning", timeout=4)
        if self._quit_pending:
            self.exit()

    @guarded("Finishing the job")
    def _after_job(self, after: Callable[[JobEnd], None], end: JobEnd) -> None:
        after(end)

    @on(JobFailed)
    def _job_failed(self, msg: JobFailed) -> None:
        self.report_error(msg.error, msg.label)

    def on_worker_state_changed(self, event: Worker.StateChanged) -> None:
        """Fallback: a worker that raised past its job wrapper."""
        if event.state == WorkerState.ERROR and event.worker.error is not None:
            self.report_error(event.worker.error, event.worker.name or "A background task")

    def report_error(self, exc: BaseException, doing: str = "") -> None:
        """The one error handler: a notification, or a dialog for serious errors."""
        from .screens.dialogs import ErrorDialog

        info = describe_error(exc, doing)
        if info.dialog:
            log.error("%s: %s", info.title, info.message)
            self.push_screen(ErrorDialog(info.title, info.message, info.hint))
        else:
            self.notify(info.text, title=info.title, severity=info.severity, timeout=10)  # type: ignore[arg-type]

    @on(Notice)
    def _notice(self, msg: Notice) -> None:
        self.notify(msg.text, title=msg.title, severity=msg.severity, timeout=8)  # type: ignore[arg-type]

    # ----------------------------------------------------------- from the workflows
    def refresh_history(self) -> None:
        """Re-read the History tab (``actions/history.py``)."""
        raise NotImplementedError

    def refresh_replay_runs(self) -> None:
        """Re-read the stored replay runs (``actions/replay.py``)."""
        raise NotImplementedError

    def open_store(self) -> None:
        """Open the database at ``db_path`` in a worker (``actions/model.py``)."""
        raise NotImplementedError

    def close_session(self) -> None:
        """End the session's run and close the database (``actions/model.py``)."""
        raise NotImplementedError

    def refresh_changed_series(self, runs: Any) -> None:
        """Re-read the shown runs another process changed (``actions/runs.py``)."""
        raise NotImplementedError

    def refresh_weights(self) -> None:
        """Redraw the Weights tab from the session's timeline."""
        self.weights_pane.show(self.session.timeline, None)

    def check_action(self, action: str, parameters: tuple[object, ...]) -> bool | None:
        if action == "cancel":
            return self.jobs.busy
        if action in MODEL_ACTIONS and self.jobs.busy:
            return None
        if isinstance(self.screen, ModalScreen) and action in MODEL_ACTIONS:
            return None
        return True
