"""The Replay tab: a CounterFact edit sequence with GLUE checkpoints and live charts."""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any

from rich.text import Text
from textual import on
from textual.app import ComposeResult
from textual.containers import Grid, Horizontal, Vertical
from textual.message import Message
from textual.widgets import Button, Checkbox, DataTable, Input, Label, ProgressBar, Select, Static

from rome import MODES

from ..format import fnum, fseconds
from ..messages import ReplaySeries
from ..replay_data import GLUE_TASKS, config_errors, resumable
from ..widgets.glue_chart import GlueChart
from ..widgets.norm_chart import NormChart, NormSeries

MAX_LOG = 40


class ReplayPane(Vertical):
    """Settings, live progress and charts, stored runs.

    Narrow: one scrolling column in that order. Wide: settings over stored runs
    on the left, the live part on the right.
    """

    class RunAction(Message):
        """Resume / open / overlay a stored run."""

        def __init__(self, action: str, run_id: str) -> None:
            super().__init__()
            self.action = action
            self.run_id = run_id

    def __init__(self) -> None:
        super().__init__(id="replay-pane")
        self.live: ReplaySeries | None = None
        self.overlays: list[ReplaySeries] = []
        self.runs: list[Any] = []
        self.log_lines: list[Text] = []
        self.started_at = 0.0
        self.total = 0
        self._auto_opened = False

    # ----------------------------------------------------------- layout
    def compose(self) -> ComposeResult:
        with Vertical(id="replay-setup"):
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
                    tooltip="Examples per GLUE task at each checkpoint",
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
        with Vertical(id="replay-live"):
            yield Static(Text("No replay running.", style="dim italic"), id="replay-status")
            bar = ProgressBar(total=None, show_eta=True, id="replay-progress")
            bar.display = False  # shown once a replay starts
            yield bar
            yield Static("", id="replay-current")
            with Horizontal(id="replay-charts"):
                yield GlueChart("GLUE accuracy", id="replay-glue")
                yield NormChart("update norm", id="replay-norm")
            yield Static("", id="replay-log")
        with Vertical(id="replay-stored"):
            yield Label("Stored replay runs", classes="section-title")
            table: DataTable = DataTable(id="replay-runs", cursor_type="row", zebra_stripes=True)
            table.add_columns("run", "mode", "status", "edits", "⚠", "created")
            yield table
            with Horizontal(classes="buttons"):
                yield Button(
                    "Open",
                    id="run-open",
                    compact=True,
                    tooltip="Show the selected run in the charts",
                )
                yield Button(
                    "Overlay",
                    id="run-overlay",
                    compact=True,
                    tooltip="Add the selected run to the charts (e.g. original vs rrome)",
                )
                yield Button(
                    "Resume",
                    id="run-resume",
                    compact=True,
                    variant="success",
                    tooltip="Continue an interrupted or cancelled run",
                )

    # ----------------------------------------------------------- form
    def values(self) -> dict[str, Any]:
        vals: dict[str, Any] = {
            k: self.query_one(f"#r-{k}", Input).value
            for k in ("dataset", "n_edits", "glue_every", "glue_limit")
        }
        vals["mode"] = str(self.query_one("#r-mode", Select).value)
        vals["tasks"] = [t for t in GLUE_TASKS if self.query_one(f"#r-task-{t}", Checkbox).value]
        return vals

    def check(self) -> dict[str, Any] | None:
        """The form's values, or None after showing what is wrong."""
        vals = self.values()
        errors = config_errors(vals)
        for key in ("dataset", "n_edits", "glue_every", "glue_limit"):
            self.query_one(f"#r-{key}", Input).set_class(key in errors, "-invalid")
        names = {
            "dataset": "Data",
            "n_edits": "Edits",
            "glue_every": "GLUE every",
            "glue_limit": "GLUE limit",
            "mode": "Mode",
            "tasks": "Tasks",
        }
        text = Text("\n".join(f"{names[k]} {v}" for k, v in errors.items()), style="red")
        self.query_one("#replay-errors", Static).update(text)
        return None if errors else vals

    # ----------------------------------------------------------- runs
    def show_runs(self, runs: Sequence[Any]) -> None:
        self.runs = list(runs)
        table = self.query_one("#replay-runs", DataTable)
        table.clear()
        for r in runs:
            style = {
                "finished": "green",
                "running": "cyan",
                "cancelled": "yellow",
                "interrupted": "bold yellow",
                "failed": "red",
            }.get(r.status, "")
            planned = f"/{r.n_edits_planned}" if r.n_edits_planned else ""
            table.add_row(
                r.id[:8],
                r.mode or "",
                Text(r.status, style=style),
                f"{r.n_edits}{planned}",
                str(r.n_flagged) if r.n_flagged else "",
                r.created_at[5:16].replace("T", " "),
                key=r.id,
            )
        if runs and not self.overlays and self.live is None and not self._auto_opened:
            self._auto_opened = True  # show the newest run's charts once
            self.post_message(self.RunAction("open", runs[0].id))
        waiting = resumable(runs)
        if waiting and self.live is None:
            r = waiting[0]
            self.query_one("#replay-status", Static).update(
                Text(
                    f"Run {r.id} ({r.mode}) stopped at {r.n_edits}/{r.n_edits_planned} edits "
                    f"({r.status}): select it and press Resume to continue.",
                    style="bold yellow",
                )
            )
            table.move_cursor(row=table.get_row_index(r.id))

    def selected_run(self) -> str | None:
        table = self.query_one("#replay-runs", DataTable)
        if table.row_count == 0:
            return None
        try:
            return str(table.coordinate_to_cell_key(table.cursor_coordinate).row_key.value)
        except Exception:
            return None

    @on(Button.Pressed, "#run-open, #run-overlay, #run-resume")
    def _run_button(self, event: Button.Pressed) -> None:
        event.stop()
        run_id = self.selected_run()
        if run_id is None:
            self.app.notify("No stored replay run selected.", severity="warning")
            return
        self.post_message(self.RunAction((event.button.id or "").removeprefix("run-"), run_id))

    # ----------------------------------------------------------- charts
    def open_series(self, series: ReplaySeries, overlay: bool) -> None:
        if overlay:
            self.overlays = [s for s in self.overlays if s.run_id != series.run_id] + [series]
        else:
            self.overlays = [series]
            if self.live is not None and self.live.run_id == series.run_id:
                self.overlays = []
        self.redraw()

    def all_series(self) -> list[ReplaySeries]:
        out = [s for s in self.overlays if self.live is None or s.run_id != self.live.run_id]
        return out + ([self.live] if self.live is not None else [])

    def redraw(self) -> None:
        series = self.all_series()
        self.query_one(GlueChart).set_runs([(s.label, s.glue) for s in series])
        self.query_one(NormChart).set_series(
            [NormSeries(s.label, s.norms, [n for n, _ in s.flags]) for s in series]
        )

    # ----------------------------------------------------------- live events
    def add_log(self, text: Text | str, style: str = "") -> None:
        line = text if isinstance(text, Text) else Text(text, style=style)
        self.log_lines = (self.log_lines + [line])[-MAX_LOG:]
        shown = Text("\n").join(self.log_lines[-6:])
        self.query_one("#replay-log", Static).update(shown)

    def start_live(
        self, run_id: str, total: int, start_seq: int, mode: str, existing: ReplaySeries | None
    ) -> None:
        self.live = existing or ReplaySeries(run_id, f"{run_id[:6]} {mode}", [], [], {}, [])
        self.live.status = "running"
        self.total = total
        self.started_at = time.monotonic()
        bar = self.query_one("#replay-progress", ProgressBar)
        bar.update(total=total, progress=start_seq)
        what = "resumed at edit " + str(start_seq + 1) if start_seq else "started"
        self.query_one("#replay-status", Static).update(
            Text(f"Run {run_id} ({mode}) {what}: {total} edits · Esc cancels", style="bold")
        )
        self.query_one("#replay-current", Static).update(
            Text("baseline GLUE checkpoint…", style="italic")
        )
        self.query_one("#replay-progress").display = True
        self.redraw()
        if self.screen.has_class("-narrow"):  # the settings scroll away, the charts show
            live = self.query_one("#replay-live")
            self.call_after_refresh(self.scroll_to_widget, live, animate=False, top=True)

    def handle(self, ev: Any) -> None:
        """Update the tab for one event of ``evals.replay.replay``."""
        kind = type(ev).__name__
        live = self.live
        if kind == "EditDone" and live is not None:
            n = ev.seq + 1
            live.norms.append((n, float(ev.update_norm)))
            if ev.flagged:
                live.flags.append((n, ev.flag_reason or "flagged"))
            self.query_one("#replay-progress", ProgressBar).update(total=ev.total, progress=n)
            t = Text()
            t.append(f"edit {n}/{ev.total}: ", style="bold")
            t.append(f"{ev.subject} → {ev.target_new}")
            t.append(f"  ‖ΔW‖ {fnum(ev.update_norm)} ({fnum(ev.update_norm_ratio)}×‖W‖)")
            es = ev.metrics.get("es") if isinstance(ev.metrics, dict) else None
            if es is not None:
                t.append(f" · ES {fnum(es)}")
            t.append(f" · {fseconds(ev.seconds)}", style="dim")
            if ev.refused:
                t.append("  REFUSED", style="bold red")
            elif ev.flagged:
                t.append("  ⚠ flagged", style="bold red")
            self.query_one("#replay-current", Static).update(t)
            self.redraw()
        elif kind == "CheckpointDone" and live is not None:
            for task, row in ev.glue.items():
                acc = row.get("accuracy")
                if acc is not None:
                    pts = [p for p in live.glue.get(task, []) if p[0] != ev.step]
                    live.glue[task] = pts + [(ev.step, float(acc))]
            if ev.fluency is not None:
                live.fluency.append((ev.step, float(ev.fluency)))
            accs = " ".join(f"{t} {fnum(r.get('accuracy'), 2)}" for t, r in ev.glue.items())
            flu = f" · fluency {fnum(ev.fluency)}" if ev.fluency is not None else ""
            self.add_log(f"checkpoint after {ev.step} edits: {accs}{flu}", "cyan")
            self.redraw()
        elif kind == "ReplayWarning":
            self.add_log(f"⚠ {ev.message}", "yellow")
        elif kind == "ReplayFinished":
            if live is not None:
                live.status = ev.status
            s = ev.summary or {}
            parts = [f"{ev.status}: {s.get('edits_done', '?')} edits"]
            if "survived" in s:
                parts.append(f"{int(s['survived'])} survive (ES=1 at the end)")
            for k in ("es", "ps", "ns", "s"):
                if s.get(k) is not None:
                    parts.append(f"{k.upper()} {fnum(s[k], 2)}")
            style = {"finished": "bold green", "cancelled": "bold yellow"}.get(
                ev.status, "bold red"
            )
            self.query_one("#replay-status", Static).update(
                Text(f"Run {ev.run_id} " + " · ".join(parts), style=style)
            )
            self.add_log(f"run {ev.run_id} {ev.status}", style)
            self.redraw()

    def stopped(self) -> None:
        """The replay job ended (finished, cancelled or failed): keep its series as an overlay."""
        if self.live is not None:
            self.overlays = [s for s in self.overlays if s.run_id != self.live.run_id]
            self.overlays.append(self.live)
            self.live = None
