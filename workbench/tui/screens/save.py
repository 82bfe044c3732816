"""The "Save model…" dialog: where to write a run's edited model as a Hugging Face folder."""

from __future__ import annotations

from pathlib import Path

from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Horizontal, Vertical
from textual.screen import ModalScreen
from textual.widgets import Button, Input, Label, Static


class SaveDialog(ModalScreen[Path | None]):
    """Ask for the output folder; dismisses with the path, or None (Esc / Cancel)."""

    BINDINGS = [
        Binding("escape", "cancel", "Cancel", id="save.cancel", tooltip="Close without saving"),
    ]

    def __init__(self, run_id: str, n_edits: int, default: Path) -> None:
        super().__init__(classes="dialog-screen")
        self.run_id = run_id
        self.n_edits = n_edits
        self.default = default

    def compose(self) -> ComposeResult:
        with Vertical(classes="dialog"):
            yield Label("Save the edited model", classes="dialog-title")
            yield Static(
                f"The base model plus the {self.n_edits} applied edit(s) of run {self.run_id}, "
                "rebuilt in order (fingerprint checked), written with save_pretrained "
                "(safetensors, config, tokenizer) and a model card listing the edits.",
                classes="dialog-body",
            )
            yield Input(
                str(self.default),
                id="save-dir",
                compact=True,
                placeholder="output folder",
                tooltip="A new or empty folder; Enter saves",
            )
            yield Static("", id="save-error", classes="dialog-hint")
            with Horizontal(classes="dialog-buttons"):
                yield Button("Save (Enter)", id="save-ok", variant="primary", compact=True)
                yield Button("Cancel (Esc)", id="save-no", compact=True)

    def on_mount(self) -> None:
        self.query_one("#save-dir", Input).focus()

    def _submit(self) -> None:
        text = self.query_one("#save-dir", Input).value.strip()
        if not text:
            self.query_one("#save-error", Static).update("Give a folder to write to.")
            return
        path = Path(text).expanduser()
        if path.exists() and (not path.is_dir() or any(path.iterdir())):
            self.query_one("#save-error", Static).update(f"{path} exists and is not empty.")
            return
        self.dismiss(path)

    def on_input_submitted(self, event: Input.Submitted) -> None:
        event.stop()
        self._submit()

    def on_button_pressed(self, event: Button.Pressed) -> None:
        event.stop()
        if event.button.id == "save-ok":
            self._submit()
        else:
            self.dismiss(None)

    def action_cancel(self) -> None:
        self.dismiss(None)
