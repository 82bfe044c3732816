"""The Replay tab's settings form: data, edits, mode, GLUE checkpoints; validated on Start."""

from __future__ import annotations

from typing import Any

from rich.text import Text
from textual.app import ComposeResult
from textual.containers import Grid, Horizontal, Vertical
from textual.widgets import Button, Checkbox, Input, Label, Select, Static

from evals.glue import TASKS as GLUE_TASKS
from rome import MODES
from workbench.core.replay import config_errors

NUMBER_FIELDS = ("n_edits", "glue_every", "glue_limit")
#: the form's label of each ReplayConfig field it sets (errors are shown with it)
FIELD_NAMES = {
    "dataset": "Data",
    "n_edits": "Edits",
    "glue_every": "GLUE every",
    "glue_limit": "GLUE limit",
    "mode": "Mode",
    "glue_tasks": "Tasks",
}


class ReplaySettings(Vertical):
    """The settings grid, the reasons a value is refused, Start and Cancel."""

    def compose(self) -> ComposeResult:
        with Grid(id="replay-config"):
            yield Label("Data", classes="rc-label")
            yield Input(
                value="sample",
                id="r-dataset",
                compact=True,
                placeholder="sample, or a CounterFact .json file",
                tooltip="'sample' (bundled), 'hub' (online) or a CounterFact JSON file",
                classes="rc-wide",
            )
            yield Label("Edits", classes="rc-label")
            yield Input(
                "20",
                id="r-n_edits",
                type="integer",
                compact=True,
                tooltip="How many edits to apply in sequence",
            )
            yield Label("Mode", classes="rc-label")
            yield Select(
                [(m, m) for m in MODES],
                value="rrome",
                allow_blank=False,
                id="r-mode",
                compact=True,
                tooltip="Key mode of every edit",
            )
            yield Label("GLUE every", classes="rc-label")
            yield Input(
                "10",
                id="r-glue_every",
                type="integer",
                compact=True,
                tooltip="Run the GLUE checkpoint every N edits (and at the start)",
            )
            yield Label("GLUE limit", classes="rc-label")
            yield Input(
                "20",
                id="r-glue_limit",
                type="integer",
                compact=True,
                tooltip="Examples per GLUE task at each checkpoint (0: every example)",
            )
            yield Label("Tasks", classes="rc-label")
            with Horizontal(id="r-tasks", classes="rc-wide"):
                for task in GLUE_TASKS:
                    yield Checkbox(task, True, id=f"r-task-{task}", compact=True)
        yield Static("", id="replay-errors")
        with Horizontal(classes="buttons"):
            yield Button(
                "Start",
                id="replay-start",
                variant="primary",
                compact=True,
                action="app.start_replay",
                tooltip="Start a replay with these settings",
            )
            yield Button(
                "Cancel Esc",
                id="replay-cancel",
                compact=True,
                variant="warning",
                action="app.cancel",
                tooltip="Stop after the current edit; keeps what is done",
            )

    def values(self) -> dict[str, Any]:
        """The settings as ReplayConfig fields (numbers still as typed)."""
        vals: dict[str, Any] = {
            k: self.query_one(f"#r-{k}", Input).value for k in ("dataset", *NUMBER_FIELDS)
        }
        vals["mode"] = str(self.query_one("#r-mode", Select).value)
        vals["glue_tasks"] = [
            t for t in GLUE_TASKS if self.query_one(f"#r-task-{t}", Checkbox).value
        ]
        return vals

    def check(self) -> dict[str, Any] | None:
        """The form's values, or None after showing what is wrong."""
        vals = self.values()
        errors = config_errors(vals)
        for key in ("dataset", *NUMBER_FIELDS):
            self.query_one(f"#r-{key}", Input).set_class(key in errors, "-invalid")
        lines = [f"{FIELD_NAMES.get(k, k)} {why}" for k, why in errors.items()]
        text = Text("\n".join(lines), style="red")
        self.query_one("#replay-errors", Static).update(text)
        return None if errors else vals
