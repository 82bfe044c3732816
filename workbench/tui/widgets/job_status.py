"""The status line: what runs, its progress bar with ETA, and the last outcome."""

from __future__ import annotations

from textual.app import ComposeResult
from textual.containers import Horizontal
from textual.widgets import Label, ProgressBar


class JobStatus(Horizontal):
    """One line above the footer. Progress messages replace each other here."""

    DEFAULT_CSS = """
    JobStatus { height: 1; background: $boost; padding: 0 1; }
    JobStatus #job-label { width: auto; max-width: 34; color: $accent; padding: 0 1 0 0; }
    JobStatus ProgressBar { width: auto; display: none; padding: 0 1 0 0; }
    JobStatus ProgressBar Bar { width: 12; }
    JobStatus.-busy ProgressBar { display: block; }
    JobStatus #job-detail { width: 1fr; color: $text-muted; }
    """

    def __init__(self, id: str | None = None) -> None:
        super().__init__(id=id)
        # kept as attributes: a late progress message may arrive while the app closes
        self._label = Label("ready", id="job-label")
        self._bar = ProgressBar(total=None, show_eta=True, id="job-bar")
        self._detail = Label("", id="job-detail")

    def compose(self) -> ComposeResult:
        yield self._label
        yield self._bar
        yield self._detail

    @property
    def detail(self) -> str:
        return str(self._detail.content)

    def start(self, label: str) -> None:
        self.add_class("-busy")
        self._label.update(label)
        self._bar.update(total=None, progress=0)
        self._detail.update("starting… (Esc cancels)")

    def progress(self, phase: str, done: int, total: int | None, detail: str = "") -> None:
        if total:
            self._bar.update(total=total, progress=done)
        else:
            self._bar.update(total=None)
        count = f" {done}/{total}" if total else ""
        text = f"{phase}{count}" + (f" · {detail}" if detail else "") + " · Esc cancels"
        self._detail.update(text)

    def finish(self, text: str) -> None:
        self.remove_class("-busy")
        self._label.update("ready")
        self._detail.update(text)
