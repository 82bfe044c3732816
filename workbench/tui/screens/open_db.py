"""The "Open database…" dialog: which results database to browse."""

from __future__ import annotations

from pathlib import Path

from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Horizontal, Vertical
from textual.screen import ModalScreen
from textual.widgets import Button, Input, Label, Static


def database_error(text: str) -> str | None:
    """Why ``text`` is not a database file to browse (None: it is one)."""
    if not text.strip():
        return "Give the path of a results database (e.g. docs/results/long-smollm2.db)."
    path = Path(text.strip()).expanduser()
    if path.is_dir():
        return f"{path} is a folder, not a database file."
    if not path.is_file():
        return f"There is no file at {path}."
    return None


class OpenDatabaseDialog(ModalScreen[Path | None]):
    """Ask for a database file; dismisses with its path, or None (Esc / Cancel)."""

    BINDINGS = [
        Binding("escape", "cancel", "Cancel", id="open-db.cancel", tooltip="Close without opening"),
    ]

    def __init__(self, current: Path | None) -> None:
        super().__init__(classes="dialog-screen")
        self.current = current

    def compose(self) -> ComposeResult:
        with Vertical(classes="dialog"):
            yield Label("Open a results database", classes="dialog-title")
            yield Static(
                "Its replay runs are listed in the Runs tab, where they can be opened and "
                "overlaid. Browsing writes nothing to it; the list follows a replay that "
                "another process is writing into it.",
                classes="dialog-body",
            )
            yield Input(
                str(self.current or ""),
                id="open-db-path",
                compact=True,
                placeholder="path/to/results.db",
                tooltip="A workbench database file; Enter opens it",
            )
            yield Static("", id="open-db-error", classes="dialog-hint")
            with Horizontal(classes="dialog-buttons"):
                yield Button("Open (Enter)", id="open-db-ok", variant="primary", compact=True)
                yield Button("Cancel (Esc)", id="open-db-no", compact=True)

    def on_mount(self) -> None:
        self.query_one("#open-db-path", Input).focus()

    def _submit(self) -> None:
        text = self.query_one("#open-db-path", Input).value
        why = database_error(text)
        if why is not None:
            self.query_one("#open-db-error", Static).update(why)
            return
        self.dismiss(Path(text.strip()).expanduser())

    def on_input_submitted(self, event: Input.Submitted) -> None:
        event.stop()
        self._submit()

    def on_button_pressed(self, event: Button.Pressed) -> None:
        event.stop()
        if event.button.id == "open-db-ok":
            self._submit()
        else:
            self.dismiss(None)

    def action_cancel(self) -> None:
        self.dismiss(None)
