"""The Replay tab: a CounterFact edit sequence with GLUE checkpoints and live charts."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Literal

from rich.text import Text
from textual import on
from textual.app import ComposeResult
from textual.containers import Horizontal, Vertical
from textual.message import Message
from textual.widgets import Button, DataTable, Label, ProgressBar, Static

from evals.protocols import END_OF_STREAM, IMMEDIATE, RETENTION
from evals.replay import CheckpointDone, EditDone, ReplayFinished, ReplayWarning
from workbench.core.format import fnum, fseconds
from workbench.core.stores import resumable
from workbench.tui.tables import cursor_key

from ..replay_data import ReplaySeries, metric
from ..widgets.run_charts import RunCharts
from .replay_settings import ReplaySettings

MAX_LOG = 40
RunVerb = Literal["open", "overlay", "resume"]
STATUS_STYLE = {
    "finished": "green",
    "running": "cyan",
    "cancelled": "yellow",
    "interrupted": "bold yellow",
    "failed": "red",
}


def run_cells(r: Any, gone: set[str]) -> list[str | Text]:
    """A run's cells in the Replay and Runs tables: id, label, status (a running run
    whose writer process is gone says so), edits done / planned, flagged."""
    planned = f"/{r.n_edits_planned}" if r.n_edits_planned else ""
    status = Text(r.status, style=STATUS_STYLE.get(r.status, ""))
    if r.id in gone:
        status = Text("writer gone", style="bold yellow")
    flagged = str(r.n_flagged) if r.n_flagged else ""
    return [r.id[:8], r.label[len(r.id) :].strip(), status, f"{r.n_edits}{planned}", flagged]


def _scores(post: dict[str, Any], pre: dict[str, Any]) -> str:
    out = []
    for k in ("es", "ps", "ns", "s"):
        after = metric(post, k)
        if after is None:
            continue
        before = metric(pre, k)
        shown = fnum(after, 2) if before is None else f"{fnum(before, 2)}→{fnum(after, 2)}"
        out.append(f"{k.upper()} {shown}")
    return " ".join(out)


def summary_text(s: dict[str, Any]) -> str:
    """A replay's end in one line: edits, then ES/PS/NS/S under each protocol recorded
    (immediate: pre → post; end of stream: with how many hold), ‖W − W₀‖."""
    parts = [f"{s.get('edits_done', '?')} edits"]
    post = s.get("post") if isinstance(s.get("post"), dict) else {}
    pre: dict[str, Any] = s["pre"] if isinstance(s.get("pre"), dict) else {}
    if post:
        parts.append(f"{IMMEDIATE}: {_scores(post, pre)}")
    final = s.get("final") if isinstance(s.get("final"), dict) else {}
    if final:
        held = f" ({int(s['survived'])} hold)" if "survived" in s else ""
        parts.append(f"{END_OF_STREAM}: {_scores(final, {})}{held}")
    drift = metric(s, "w_delta_norm")
    if drift is not None:
        parts.append(f"‖W−W₀‖ {fnum(drift)}")
    return " · ".join(parts)


class ReplayPane(Vertical):
    """Settings, live progress and charts, stored runs.

    Narrow: one scrolling column in that order. Wide: settings over stored runs
    on the left, the live part on the right.
    """

    class RunAction(Message):
        """Resume / open / overlay a stored run."""

        def __init__(self, action: RunVerb, run_id: str) -> None:
            super().__init__()
            self.action: RunVerb = action
            self.run_id = run_id

    def __init__(self) -> None:
        super().__init__(id="replay-pane")
        self.live: ReplaySeries | None = None
        self.overlays: list[ReplaySeries] = []
        self.runs: list[Any] = []
        self.log_lines: list[Text] = []
        self.total = 0
        self._auto_opened = False
        self._offered: set[str] = set()
        self.gone: set[str] = set()

    # ----------------------------------------------------------- layout
    def compose(self) -> ComposeResult:
        yield ReplaySettings(id="replay-setup")
        with Vertical(id="replay-live"):
            yield Static(Text("No replay running.", style="dim italic"), id="replay-status")
            bar = ProgressBar(total=None, show_eta=True, id="replay-progress")
            bar.display = False  # shown once a replay starts
            yield bar
            yield Static("", id="replay-current")
            yield RunCharts(id="replay-charts")
            yield Static("", id="replay-log")
        with Vertical(id="replay-stored"):
            yield Label("Stored replay runs", classes="section-title")
            table: DataTable = DataTable(id="replay-runs", cursor_type="row", zebra_stripes=True)
            table.add_columns("run", "label", "status", "edits", "⚠", "created")
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
        return self.query_one(ReplaySettings).values()

    def check(self) -> dict[str, Any] | None:
        """The form's values, or None after showing what is wrong."""
        return self.query_one(ReplaySettings).check()

    # ----------------------------------------------------------- runs
    def show_runs(self, runs: Sequence[Any], gone: Sequence[str] = ()) -> None:
        """List ``runs``; ``gone``: running runs whose writer process is gone."""
        self.runs = list(runs)
        self.gone = set(gone)
        table = self.query_one("#replay-runs", DataTable)
        selected = self.selected_run()
        table.clear()
        for r in runs:
            table.add_row(*run_cells(r, self.gone), r.created_at[5:16].replace("T", " "), key=r.id)
        if runs and not self.overlays and self.live is None and not self._auto_opened:
            self._auto_opened = True  # show the newest run's charts once
            self.post_message(self.RunAction("open", runs[0].id))
        if selected is not None and selected in {r.id for r in runs}:
            table.move_cursor(row=table.get_row_index(selected))
        waiting = resumable(runs) + [r for r in runs if r.id in self.gone]
        if waiting and self.live is None and waiting[0].id not in self._offered:
            self._offered.add(waiting[0].id)
            r = waiting[0]
            self._status(
                f"Run {r.id} ({r.mode}) stopped at {r.n_edits}/{r.n_edits_planned} edits "
                f"({'its writer process is gone' if r.id in self.gone else r.status}): "
                "select it and press Resume to continue.",
                "bold yellow",
            )
            table.move_cursor(row=table.get_row_index(r.id))

    def selected_run(self) -> str | None:
        return cursor_key(self.query_one("#replay-runs", DataTable))

    @on(Button.Pressed, "#run-open, #run-overlay, #run-resume")
    def _run_button(self, event: Button.Pressed) -> None:
        event.stop()
        run_id = self.selected_run()
        if run_id is None:
            self.app.notify("No stored replay run selected.", severity="warning")
            return
        verb: RunVerb = {"run-open": "open", "run-overlay": "overlay"}.get(  # type: ignore[assignment]
            event.button.id or "", "resume"
        )
        self.post_message(self.RunAction(verb, run_id))

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
        self.query_one(RunCharts).show(self.all_series())

    # ----------------------------------------------------------- live events
    def _status(self, text: str, style: str) -> None:
        self.query_one("#replay-status", Static).update(Text(text, style=style))

    def add_log(self, text: Text | str, style: str = "") -> None:
        line = text if isinstance(text, Text) else Text(text, style=style)
        self.log_lines = (self.log_lines + [line])[-MAX_LOG:]
        shown = Text("\n").join(self.log_lines[-6:])
        self.query_one("#replay-log", Static).update(shown)

    def show_starting(self) -> None:
        """The replay job started; the run is not open yet."""
        self._status("Starting: loading data, baseline GLUE checkpoint…", "")

    def start_live(
        self, run_id: str, total: int, start_seq: int, mode: str, existing: ReplaySeries | None
    ) -> None:
        self.live = existing or ReplaySeries(run_id, f"{run_id[:6]} {mode}".strip())
        self.live.status = "running"
        self.total = total
        bar = self.query_one("#replay-progress", ProgressBar)
        bar.update(total=total, progress=start_seq)
        bar.display = True
        what = "resumed at edit " + str(start_seq + 1) if start_seq else "started"
        self._status(f"Run {run_id} ({mode}) {what}: {total} edits · Esc cancels", "bold")
        self.query_one("#replay-current", Static).update(
            Text("baseline GLUE checkpoint…", style="italic")
        )
        self.redraw()
        if self.screen.has_class("-narrow"):  # the settings scroll away, the charts show
            live = self.query_one("#replay-live")
            self.call_after_refresh(self.scroll_to_widget, live, animate=False, top=True)

    def handle(self, ev: EditDone | CheckpointDone | ReplayWarning | ReplayFinished) -> None:
        """Update the tab for one event of ``evals.replay.replay`` after its start."""
        if isinstance(ev, EditDone):
            self._edit_done(ev)
        elif isinstance(ev, CheckpointDone):
            self._checkpoint_done(ev)
        elif isinstance(ev, ReplayWarning):
            self.add_log(f"⚠ {ev.message}", "yellow")
        elif isinstance(ev, ReplayFinished):
            self._finished(ev)

    def _edit_done(self, ev: EditDone) -> None:
        if self.live is None:
            return
        self.live.add_edit(ev)
        n = ev.seq + 1
        self.query_one("#replay-progress", ProgressBar).update(total=ev.total, progress=n)
        t = Text()
        t.append(f"edit {n}/{ev.total}: ", style="bold")
        t.append(f"{ev.subject} → {ev.target_new}")
        t.append(f"  ‖ΔW‖ {fnum(ev.update_norm)} ({fnum(ev.update_norm_ratio)}×‖W‖)")
        t.append(f" · ‖W−W₀‖ {fnum(ev.w_delta_norm)} · ‖W‖/‖W₀‖ {fnum(ev.w_norm_ratio, 4)}")
        es = metric(ev.metrics, "es")
        if es is not None:
            t.append(f" · ES {fnum(es)} ({IMMEDIATE})")
        t.append(f" · {fseconds(ev.seconds)}", style="dim")
        if ev.refused:
            t.append("  REFUSED", style="bold red")
        elif ev.flagged:
            t.append("  ⚠ flagged", style="bold red")
        self.query_one("#replay-current", Static).update(t)
        self.redraw()

    def _checkpoint_done(self, ev: CheckpointDone) -> None:
        if self.live is None:
            return
        self.live.add_checkpoint(ev)
        parts = [" ".join(f"{t} {fnum(r.get('accuracy'), 2)}" for t, r in ev.glue.items())]
        if ev.fluency is not None:
            parts.append(f"fluency {fnum(ev.fluency)}")
        if ev.perplexity is not None:
            parts.append(f"perplexity {fnum(ev.perplexity)}")
        if ev.retention:
            held = ev.retention
            parts.append(f"{RETENTION}: {held['n_hold']}/{held['m']} of the first edits hold")
        self.add_log(f"checkpoint after {ev.step} edits: " + " · ".join(parts), "cyan")
        self.redraw()

    def _finished(self, ev: ReplayFinished) -> None:
        if self.live is not None:
            self.live.status = ev.status
        parts = [f"{ev.status}: " + summary_text(ev.summary or {})]
        style = {"finished": "bold green", "cancelled": "bold yellow"}.get(ev.status, "bold red")
        self._status(f"Run {ev.run_id} " + " · ".join(parts), style)
        self.add_log(f"run {ev.run_id} {ev.status}", style)
        self.redraw()

    def stopped(self) -> None:
        """The replay job ended (finished, cancelled or failed): keep its series as an overlay."""
        if self.live is not None:
            self.overlays = [s for s in self.overlays if s.run_id != self.live.run_id]
            self.overlays.append(self.live)
            self.live = None
