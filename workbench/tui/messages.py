"""Messages the workers post to the app. Progress messages replace each other in the queue."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from textual.message import Message

if TYPE_CHECKING:
    from .session import AppliedInfo, EditOutcome, HistoryRow, ModelInfo


class Progress(Message):
    """One step of a job; a newer one of the same job supersedes an unprocessed older one."""

    def __init__(
        self, job: str, phase: str, done: int, total: int | None, detail: str = ""
    ) -> None:
        super().__init__()
        self.job = job
        self.phase = phase
        self.done = done
        self.total = total
        self.detail = detail

    def can_replace(self, message: Message) -> bool:
        return isinstance(message, Progress) and message.job == self.job


class JobStarted(Message):
    def __init__(self, job: str, label: str) -> None:
        super().__init__()
        self.job = job
        self.label = label


class JobFinished(Message):
    """A job ended: ``status`` is "done", "cancelled" or "failed"."""

    def __init__(self, job: str, label: str, status: str, seconds: float) -> None:
        super().__init__()
        self.job = job
        self.label = label
        self.status = status
        self.seconds = seconds


class JobFailed(Message):
    """A job raised: the app's one error handler turns it into a notice or dialog."""

    def __init__(self, job: str, label: str, error: BaseException) -> None:
        super().__init__()
        self.job = job
        self.label = label
        self.error = error


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
    def __init__(self, outcome: EditOutcome) -> None:
        super().__init__()
        self.outcome = outcome


class CompareComputed(Message):
    def __init__(self, outcomes: dict[str, EditOutcome]) -> None:
        super().__init__()
        self.outcomes = outcomes


class EditApplied(Message):
    def __init__(self, info: AppliedInfo) -> None:
        super().__init__()
        self.info = info


class ModelChanged(Message):
    """Edits were undone, reverted or re-applied: ``what`` says which, for the status line."""

    def __init__(self, what: str) -> None:
        super().__init__()
        self.what = what


class GenerationDone(Message):
    def __init__(self, pairs: list[Any], title: str) -> None:
        super().__init__()
        self.pairs = pairs
        self.title = title


class HistoryLoaded(Message):
    def __init__(self, rows: list[HistoryRow], note: str = "") -> None:
        super().__init__()
        self.rows = rows
        self.note = note


@dataclass
class ReplaySeries:
    """One replay run's data for the charts (from the store or live)."""

    run_id: str
    label: str
    norms: list[tuple[int, float]]  # (edit number, update norm)
    flags: list[tuple[int, str]]  # (edit number, reason)
    glue: dict[str, list[tuple[int, float]]]  # task -> (step, accuracy)
    fluency: list[tuple[int, float]]
    status: str = ""
    total: int | None = None


class ReplayEvent(Message):
    """An event of ``evals.replay.replay`` (ReplayStarted, EditDone, ...)."""

    def __init__(self, event: Any) -> None:
        super().__init__()
        self.event = event


class ReplayRunsLoaded(Message):
    def __init__(self, runs: list[Any], series: list[ReplaySeries]) -> None:
        super().__init__()
        self.runs = runs
        self.series = series


class Notice(Message):
    """Something a job wants the user to know (not an error)."""

    def __init__(self, text: str, severity: str = "information", title: str = "") -> None:
        super().__init__()
        self.text = text
        self.severity = severity
        self.title = title


class OwnGenerated(Message):
    def __init__(self, prompt: str, text: str, note: str) -> None:
        super().__init__()
        self.prompt = prompt
        self.text = text
        self.note = note
