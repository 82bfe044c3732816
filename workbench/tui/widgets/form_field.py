"""A labelled form row with an error line under it."""

from __future__ import annotations

from textual.app import ComposeResult
from textual.containers import Horizontal, Vertical
from textual.widget import Widget
from textual.widgets import Label, Static


class FormField(Vertical):
    """``label | input`` on one line; the reason an entry is invalid on the next."""

    DEFAULT_CSS = """
    FormField { height: auto; }
    FormField > .ff-row { height: auto; }
    FormField .ff-label { width: 13; padding: 0 1 0 0; color: $text-muted; }
    FormField .ff-error { display: none; color: $text-error; padding: 0 0 0 13; height: auto; }
    FormField.-error .ff-error { display: block; }
    FormField.-error .ff-label { color: $text-error; }
    """

    def __init__(self, label: str, field: Widget, *, key: str, id: str | None = None) -> None:
        super().__init__(id=id)
        self.label = label
        self.field = field
        self.key = key

    def compose(self) -> ComposeResult:
        with Horizontal(classes="ff-row"):
            yield Label(self.label, classes="ff-label")
            yield self.field
        yield Static("", classes="ff-error")

    @property
    def error(self) -> str:
        return str(self.query_one(".ff-error", Static).content)

    def set_error(self, message: str | None) -> None:
        """Show ``message`` under the field (``None`` clears it)."""
        err = self.query_one(".ff-error", Static)
        err.update(f"↑ {self.label.strip()} {message}" if message else "")
        self.set_class(bool(message), "-error")
        self.field.set_class(bool(message), "-invalid")
