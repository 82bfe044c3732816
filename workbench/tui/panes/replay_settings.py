"""The Replay tab's settings form: every setting the CLI's ``replay`` takes, with its
defaults and its one validation from ``workbench.core.replay``; checked on Start."""

from __future__ import annotations

from typing import Any

from rich.text import Text
from textual import on
from textual.app import ComposeResult
from textual.containers import Grid, Horizontal, Vertical
from textual.widgets import Button, Checkbox, Input, Label, Select, Static

from evals.glue import CALIBRATIONS, SCORINGS
from evals.glue import TASKS as GLUE_TASKS
from rome import MODES
from workbench.core.forms import has_key_modes
from workbench.core.replay import (
    FIELD_LABELS,
    REPLAY_METHODS,
    V_STOPS,
    config_errors,
    form_defaults,
)

#: typed fields: ReplayConfig name -> (label, tooltip)
TEXT_FIELDS = {
    "dataset": (
        "Data",
        "'sample' or 'val' (bundled CounterFact), 'zsre' (bundled zsRE), 'hub' (online), "
        "or a CounterFact or MEND-format zsRE JSON file",
    ),
    "n_edits": ("Edits", "How many edits to apply in sequence"),
    "order_seed": (
        "Order seed",
        "Edit the records in the order this seed shuffles them into (empty: the file's order)",
    ),
    "batch_size": ("Batch size", "Requests per edit step (batch methods; rome: 1)"),
    "layer": ("Layer", "The layer to edit (empty: the preset's)"),
    "glue_every": (
        "GLUE every",
        "Checkpoint (GLUE, probes, retention) every N edits and at the start",
    ),
    "glue_limit": ("GLUE limit", "Examples per GLUE task at each checkpoint (0: every example)"),
    "glue_dir": ("GLUE folder", "A folder of <task>.jsonl files (empty: the bundled subsets)"),
    "retention_size": (
        "Retention M",
        "Retention protocol: the first M edits re-scored at every checkpoint (0: off)",
    ),
}
#: what an empty typed field means
PLACEHOLDERS = {"glue_dir": "bundled", "layer": "preset", "order_seed": "file order"}
#: fields chosen from a list: name -> (label, choices, tooltip)
CHOICE_FIELDS = {
    "method": ("Method", REPLAY_METHODS, "The editing method"),
    "mode": ("Key mode", MODES, "Key mode of every edit: original, rrome or prompt"),
    "glue_scoring": ("Scoring", SCORINGS, "GLUE: label log-probabilities, or generation"),
    "glue_calibration": (
        "Calibration",
        CALIBRATIONS,
        "GLUE: contextual calibration (Calibrate Before Use; log-prob scoring only)",
    ),
}
PRESET = "preset"
#: the stabilisers (preset fields, not ReplayConfig's): name -> (label, choices, tooltip)
STABILISERS = {
    "v_stop": (
        "v* stop",
        (PRESET, *V_STOPS),
        "v* stopping rule: loss (reference) or "
        "most_probable (ENCORE's MPES); preset: as the model's preset",
    ),
    "norm_anchor": (
        "Norm anchor",
        (PRESET, "on", "off"),
        "Norm-anchor scaling of v* (NAS); preset: as the model's preset",
    ),
}
#: the form's label of each setting (errors are shown with it)
FIELD_NAMES = {
    **{k: v[0] for k, v in TEXT_FIELDS.items()},
    **{k: v[0] for k, v in CHOICE_FIELDS.items()},
    "glue_tasks": "Tasks",
}


def _text(value: Any) -> str:
    return "" if value is None else str(value)


class ReplaySettings(Vertical):
    """The settings grid, the reasons a value is refused, Start and Cancel."""

    def _text_row(self, key: str, defaults: dict[str, Any]) -> ComposeResult:
        label, tip = TEXT_FIELDS[key]
        yield Label(label, classes="rc-label")
        yield self._input(key, defaults, tip)

    def _choice_row(self, key: str, defaults: dict[str, Any]) -> ComposeResult:
        yield Label(CHOICE_FIELDS[key][0], classes="rc-label")
        yield self._select(key, defaults[key])

    def compose(self) -> ComposeResult:
        """The settings grid in screen order (long: a layout, read top to bottom)."""
        d = form_defaults()
        with Grid(id="replay-config"):
            yield Label("Data", classes="rc-label")
            yield self._input("dataset", d, TEXT_FIELDS["dataset"][1], wide=True)
            yield from self._text_row("n_edits", d)
            yield from self._text_row("batch_size", d)
            yield from self._choice_row("method", d)
            yield from self._choice_row("mode", d)
            yield from self._text_row("layer", d)
            yield from self._text_row("retention_size", d)
            yield from self._text_row("order_seed", d)
            yield from self._text_row("glue_every", d)
            yield from self._text_row("glue_limit", d)
            yield from self._choice_row("glue_scoring", d)
            yield from self._choice_row("glue_calibration", d)
            yield Label("", classes="rc-label")  # keeps the rows in pairs
            yield Static("")
            yield Label("Tasks", classes="rc-label")
            with Horizontal(id="r-tasks", classes="rc-wide"):
                for task in GLUE_TASKS:
                    yield Checkbox(
                        task,
                        task in d["glue_tasks"],
                        id=f"r-task-{task}",
                        compact=True,
                        tooltip=f"Score GLUE {task} at every checkpoint",
                    )
            yield Label("GLUE folder", classes="rc-label")
            yield self._input("glue_dir", d, TEXT_FIELDS["glue_dir"][1], wide=True)
            for key, (label, choices, tip) in STABILISERS.items():
                yield Label(label, classes="rc-label")
                yield Select(
                    [(c, c) for c in choices],
                    value=PRESET,
                    allow_blank=False,
                    id=f"r-{key}",
                    compact=True,
                    tooltip=tip,
                )
            yield Label("Probes", classes="rc-label")
            yield Checkbox(
                "perplexity",
                d["perplexity"],
                id="r-perplexity",
                compact=True,
                tooltip="The held-out perplexity probe at every checkpoint (fluency always runs)",
            )
            yield Label("Guard", classes="rc-label")
            yield Checkbox(
                "refuse flagged",
                d["guard"],
                id="r-guard",
                compact=True,
                tooltip="Refuse (do not apply) edits flagged as disabling",
            )
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

    @staticmethod
    def _input(key: str, defaults: dict[str, Any], tip: str, wide: bool = False) -> Input:
        value = defaults[key]
        if key == "glue_limit" and value is None:
            value = 0
        return Input(
            _text(value),
            id=f"r-{key}",
            compact=True,
            placeholder=PLACEHOLDERS.get(key, ""),
            tooltip=tip,
            classes="rc-wide" if wide else "",
        )

    @staticmethod
    def _select(key: str, value: str) -> Select[str]:
        _, choices, tip = CHOICE_FIELDS[key]
        return Select(
            [(c, c) for c in choices],
            value=value,
            allow_blank=False,
            id=f"r-{key}",
            compact=True,
            tooltip=tip,
        )

    @on(Select.Changed, "#r-method")
    def _method_chosen(self, event: Select.Changed) -> None:
        """The key mode is ROME's: off for a batch method (its value is then not used)."""
        method = str(event.value)
        mode = self.query_one("#r-mode", Select)
        keyed = has_key_modes(method)
        mode.disabled = not keyed
        mode.tooltip = CHOICE_FIELDS["mode"][2] if keyed else f"ROME's key mode: {method} has none"

    def values(self) -> dict[str, Any]:
        """The settings as ReplayConfig fields (numbers still as typed)."""
        vals: dict[str, Any] = {k: self.query_one(f"#r-{k}", Input).value for k in TEXT_FIELDS}
        vals["glue_dir"] = vals["glue_dir"].strip() or None
        for key in CHOICE_FIELDS:
            vals[key] = str(self.query_one(f"#r-{key}", Select).value)
        vals["glue_tasks"] = [
            t for t in GLUE_TASKS if self.query_one(f"#r-task-{t}", Checkbox).value
        ]
        vals["perplexity"] = self.query_one("#r-perplexity", Checkbox).value
        vals["guard"] = self.query_one("#r-guard", Checkbox).value
        return vals

    def stabilisers(self) -> tuple[str | None, bool | None]:
        """(v_stop, norm_anchor) for ``core.replay.edit_hparams``; None: as the preset."""
        stop = str(self.query_one("#r-v_stop", Select).value)
        anchor = str(self.query_one("#r-norm_anchor", Select).value)
        return (
            None if stop == PRESET else stop,
            None if anchor == PRESET else anchor == "on",
        )

    def check(self) -> dict[str, Any] | None:
        """The form's values, or None after showing what is wrong."""
        vals = self.values()
        errors = config_errors(vals)
        for key in TEXT_FIELDS:
            self.query_one(f"#r-{key}", Input).set_class(key in errors, "-invalid")
        lines = [f"{FIELD_NAMES.get(k, FIELD_LABELS.get(k, k))} {why}" for k, why in errors.items()]
        text = Text("\n".join(lines), style="red")
        self.query_one("#replay-errors", Static).update(text)
        return None if errors else vals
