"""Messages the workers post to the app, one class per thing that happened.

Progress messages of one job replace each other in the queue.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from textual.message import Message

if TYPE_CHECKING:
    from evals.replay import CheckpointDone, EditDone, ReplayFinished, ReplayWarning
    from workbench.core.methods import MethodOutcome
    from workbench.core.records import AppliedInfo, EditOutcome, HistoryRow, ModelInfo

    from .job_kinds import JobEnd, JobId, ReadId
    from .replay_data import ReplaySeries


class Progress(Message):
    """One step of a job; a newer one of the same job supersedes an unprocessed older one."""

    def __init__(
        self, job: JobId, phase: str, done: int, total: int | None, detail: str = ""
    ) -> None:
        super().__init__()
        self.job = job
        self.phase = phase
        self.done = done
        self.total = total
        self.detail = detail

    def can_replace(self, message: Message) -> bool:
        return isinstance(message, Progress) and message.job is self.job


class JobFinished(Message):
    """A job ended: done, cancelled or failed."""

    def __init__(self, job: JobId, label: str, end: JobEnd, seconds: float) -> None:
        super().__init__()
        self.job = job
        self.label = label
        self.end = end
        self.seconds = seconds


class JobFailed(Message):
    """A job or a read raised: the app's one error handler turns it into a notice or dialog."""

    def __init__(self, job: JobId | ReadId, label: str, error: BaseException) -> None:
        super().__init__()
        self.job = job
        self.label = label
        self.error = error


class StoreOpened(Message):
    """The history database is open (``store`` None: it is not, ``error`` says why).

    ``stale`` are the runs found interrupted; ``doing`` what failed when ``error`` is set.
    """

    def __init__(
        self,
        store: Any,
        stale: list[str],
        error: BaseException | None = None,
        doing: str = "",
    ) -> None:
        super().__init__()
        self.store = store
        self.stale = stale
        self.error = error
        self.doing = doing


class ModelLoaded(Message):
    def __init__(self, info: ModelInfo) -> None:
        super().__init__()
        self.info = info


class CovarianceReady(Message):
    def __init__(self, layer: int, description: str, seconds: float) -> None:
        super().__init__()
        self.layer = layer
        self.description = description
        self.seconds = seconds


class EditComputed(Message):
    """A computed update of any method on the Edit tab's request (not applied)."""

    def __init__(self, outcome: EditOutcome) -> None:
        super().__init__()
        self.outcome = outcome


class CompareComputed(Message):
    def __init__(self, outcomes: dict[str, EditOutcome]) -> None:
        super().__init__()
        self.outcomes = outcomes


class MethodsCompared(Message):
    """Every method beside ROME's key modes on the Edit tab's request (nothing applied)."""

    def __init__(self, rows: list[MethodOutcome]) -> None:
        super().__init__()
        self.rows = rows


class EditApplied(Message):
    def __init__(self, info: AppliedInfo) -> None:
        super().__init__()
        self.info = info


class ModelChanged(Message):
    """Edits were undone, reverted or re-applied: ``what`` says which, for the status line."""

    def __init__(self, what: str) -> None:
        super().__init__()
        self.what = what


class OwnGenerated(Message):
    def __init__(self, prompt: str, text: str, note: str) -> None:
        super().__init__()
        self.prompt = prompt
        self.text = text
        self.note = note


class ModelSaved(Message):
    """A run's edited model was written as a Hugging Face folder."""

    def __init__(self, path: Path, run_id: str, n_edits: int) -> None:
        super().__init__()
        self.path = path
        self.run_id = run_id
        self.n_edits = n_edits


class HistoryLoaded(Message):
    def __init__(self, rows: list[HistoryRow], note: str = "") -> None:
        super().__init__()
        self.rows = rows
        self.note = note


class ReplayRunsLoaded(Message):
    """The database's replay runs; ``gone``: running ones whose writer process is gone."""

    def __init__(self, runs: list[Any], gone: list[str] | None = None) -> None:
        super().__init__()
        self.runs = runs
        self.gone = gone or []


class SeriesRefreshed(Message):
    """Shown runs read again because another process wrote them."""

    def __init__(self, series: list[ReplaySeries]) -> None:
        super().__init__()
        self.series = series


class RunSeriesLoaded(Message):
    """A stored run's chart data, to show alone (open) or beside the others (overlay);
    ``where``: the pane that asked (replay or runs)."""

    def __init__(self, series: ReplaySeries, overlay: bool, where: str = "replay") -> None:
        super().__init__()
        self.series = series
        self.overlay = overlay
        self.where = where


class ReplayOpened(Message):
    """A replay started or resumed (``existing``: what a resumed run had already)."""

    def __init__(
        self,
        run_id: str,
        total: int,
        start_seq: int,
        mode: str,
        existing: ReplaySeries | None,
    ) -> None:
        super().__init__()
        self.run_id = run_id
        self.total = total
        self.start_seq = start_seq
        self.mode = mode
        self.existing = existing


class ReplayProgress(Message):
    """An event of ``evals.replay.replay`` after its start (edit, checkpoint, warning, end)."""

    def __init__(self, event: EditDone | CheckpointDone | ReplayWarning | ReplayFinished) -> None:
        super().__init__()
        self.event = event


class Notice(Message):
    """Something a job wants the user to know (not an error)."""

    def __init__(self, text: str, severity: str = "information", title: str = "") -> None:
        super().__init__()
        self.text = text
        self.severity = severity
        self.title = title
