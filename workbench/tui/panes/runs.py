"""The Runs tab: any results database browsed. Its replay runs with their labels;
open or overlay runs to draw every panel the plot command draws; their scores under
the three protocols; the flagged edits and the record of the one selected. Re-read
while another process writes the database."""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any, Literal

from rich.console import Group
from rich.table import Table
from rich.text import Text
from textual import on
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Horizontal, Vertical
from textual.message import Message
from textual.widgets import Button, DataTable, Static

from workbench.core.run_stats import compare_runs, p_text
from workbench.core.summary import SCORE_KEYS, ProtocolScores, fmt
from workbench.tui.tables import cursor_key

from ..replay_data import ReplaySeries
from ..widgets.flagged_edits import FlaggedEdits
from ..widgets.run_charts import RunCharts
from .replay import run_cells

ShowVerb = Literal["open", "overlay"]


class RunsPane(Horizontal):
    """Runs, scores and flagged edits on the left; the charts on the right."""

    BINDINGS = [
        Binding(
            "o",
            "overlay",
            "Overlay",
            id="runs.overlay",
            tooltip="Add the selected run to the charts (Enter opens it alone)",
        ),
        Binding(
            "g",
            "next_glue_task",
            "GLUE task",
            id="runs.glue_task",
            tooltip="Show the next GLUE task in the GLUE chart (all tasks, sst2, mrpc, ...)",
        ),
    ]

    class Show(Message):
        """Open (alone) or overlay a stored run in the charts."""

        def __init__(self, verb: ShowVerb, run_id: str) -> None:
            super().__init__()
            self.verb: ShowVerb = verb
            self.run_id = run_id

    def __init__(self) -> None:
        super().__init__(id="runs-pane")
        self.runs: list[Any] = []
        self.series: list[ReplaySeries] = []
        self.gone: set[str] = set()

    def compose(self) -> ComposeResult:
        with Vertical(id="runs-left"):
            yield Static(Text("No database open yet.", style="dim italic"), id="runs-db")
            table: DataTable = DataTable(id="runs-table", cursor_type="row", zebra_stripes=True)
            table.add_columns("run", "label", "status", "edits", "⚠")
            yield table
            with Horizontal(classes="buttons"):
                yield Button(
                    "Open", id="runs-open", compact=True, tooltip="Show the selected run alone"
                )
                yield Button(
                    "Overlay",
                    id="runs-overlay",
                    compact=True,
                    tooltip="Add the selected run to the charts (compare runs)",
                )
                yield Button(
                    "Open database…",
                    id="runs-open-db",
                    compact=True,
                    action="app.open_database",
                    tooltip="Browse another results database (Ctrl+O)",
                )
            yield Static("", id="runs-scores")
            yield FlaggedEdits(id="runs-flagged")
        yield RunCharts(id="runs-charts")

    def on_mount(self) -> None:
        self.redraw()

    def action_overlay(self) -> None:
        run_id = self.selected_run()
        if run_id is not None:
            self.post_message(self.Show("overlay", run_id))

    def action_next_glue_task(self) -> None:
        self.query_one(RunCharts).next_glue_task()

    # ----------------------------------------------------------- the list
    def show_database(self, path: str, note: str = "") -> None:
        t = Text("Database ", style="dim")
        t.append(path, style="bold")
        models = sorted({r.model for r in self.runs})
        t.append(f" · {len(self.runs)} replay run(s)")
        if models:
            t.append(f" of {', '.join(models)}")
        if note:
            t.append(f" · {note}", style="dim")
        self.query_one("#runs-db", Static).update(t)

    def show_runs(self, runs: Sequence[Any], gone: Sequence[str] = ()) -> None:
        self.runs = list(runs)
        self.gone = set(gone)
        table = self.query_one("#runs-table", DataTable)
        selected = self.selected_run()
        table.clear()
        for r in runs:
            table.add_row(*run_cells(r, self.gone), key=r.id)
        if selected is not None and selected in {r.id for r in runs}:
            table.move_cursor(row=table.get_row_index(selected))

    def selected_run(self) -> str | None:
        return cursor_key(self.query_one("#runs-table", DataTable))

    @on(Button.Pressed, "#runs-open, #runs-overlay")
    def _show_button(self, event: Button.Pressed) -> None:
        event.stop()
        run_id = self.selected_run()
        if run_id is None:
            self.app.notify("No run selected.", severity="warning")
            return
        verb: ShowVerb = "overlay" if event.button.id == "runs-overlay" else "open"
        self.post_message(self.Show(verb, run_id))

    @on(DataTable.RowSelected, "#runs-table")
    def _row_selected(self, event: DataTable.RowSelected) -> None:
        """Enter on a run opens it alone."""
        event.stop()
        self.post_message(self.Show("open", str(event.row_key.value)))

    # ----------------------------------------------------------- the charts
    def show_series(self, series: ReplaySeries, overlay: bool) -> None:
        if overlay:
            self.series = [s for s in self.series if s.run_id != series.run_id] + [series]
        else:
            self.series = [series]
        self.redraw()

    def replace_series(self, fresh: Sequence[ReplaySeries]) -> None:
        """Series read again after another process wrote their runs."""
        by_id = {s.run_id: s for s in fresh}
        self.series = [by_id.get(s.run_id, s) for s in self.series]
        self.redraw()

    def redraw(self) -> None:
        self.query_one(RunCharts).show(self.series)
        self.query_one(FlaggedEdits).show(self.series)
        self.query_one("#runs-scores", Static).update(scores_table(self.series))


def scores_table(series: Sequence[ReplaySeries]) -> Group | Text:
    """ES / PS / NS / S of the runs shown with their 95 % intervals, one row per run and
    protocol; holds among the records that needed an edit; and, for two runs or more,
    the paired tests between them."""
    if not series:
        return Text("Open a run (Enter, or Open) to see its charts and scores.", style="dim")
    zsre = [s for s in series if s.zsre]
    what = "zsRE" if len(zsre) == len(series) else "CounterFact, zsRE" if zsre else "CounterFact"
    t = Table(
        title=f"{what} scores by protocol (95 % intervals)",
        title_style="bold",
        box=None,
        padding=(0, 1),
        collapse_padding=True,
        show_edge=False,
    )
    t.add_column("run")
    t.add_column("protocol")
    for col in ("ES", "PS", "NS", "S", "hold"):  # a value over its interval, ".85–.89"
        t.add_column(col, justify="right", min_width=8, no_wrap=True)
    for s in series:
        for p in s.protocols:
            if not p.recorded:
                t.add_row(s.run_id[:8], p.protocol, Text("not recorded", style="dim"))
                continue
            hold = f"{p.hold}/{p.n}" if p.hold is not None else ""
            cells = [_cell(fmt(getattr(p, k)), _span(p, k)) for k in SCORE_KEYS]
            t.add_row(s.run_id[:8], p.protocol, *cells, _cell(hold, _span(p, "hold")))
    parts: list[Table | Text] = [t]
    for s in zsre:  # what a zsRE run's ES / PS / NS are, and its teacher-forced figures
        text = Text(f"{s.run_id[:8]} (zsRE)", style="bold")
        for label, value in s.zsre:
            text.append(f"\n  {label}: {value}")
        parts.append(text)
    needed = needed_text(series)
    if needed is not None:
        parts.append(needed)
    tests = paired_table(series)
    if tests is not None:
        parts.append(tests)
    return Group(*parts)


def _span(p: ProtocolScores, key: str) -> str:
    r = p.rates.get(key)
    return r.span(2) if r is not None else ""


def _cell(value: str, interval: str) -> Text:
    out = Text(value)
    if interval:
        out.append(f"\n{interval}", style="dim")
    return out


def needed_text(series: Sequence[ReplaySeries]) -> Text | None:
    """Per run: how many records needed an edit (pre-edit ES < 1) and how many of them
    hold at the end, beside all."""
    out = Text("Needed an edit (pre-edit ES < 1):", style="bold")
    shown = False
    for s in series:
        st = s.stats
        if st is None or st.needed is None:
            continue
        shown = True
        out.append(f"\n{s.run_id[:8]} {st.needed} of {st.n}")
        if st.needed_hold is not None and st.hold is not None:
            out.append(f"; hold at the end {st.needed_hold.text(2)}, all {st.hold.text(2)}")
        elif st.needed_immediate is not None:
            out.append(f"; ES = 1 right after {st.needed_immediate.text(2)}")
    return out if shown else None


def short_what(what: str) -> str:
    """``holds at end, needed an edit`` for the pane's narrow table (the report has the
    long names)."""
    what = what.replace("holds at the end of the stream, all", "holds at end, all")
    what = what.replace(
        "holds at the end, records that needed an edit in both", "holds at end, needed"
    )
    return re.sub(r" accuracy after (\d+) edits| after (\d+) edits", r" @\1\2", what)


def paired_table(series: Sequence[ReplaySeries]) -> Table | None:
    """The paired tests between every two stored runs shown (a difference at 0.05, or
    within noise)."""
    ev = [s.evidence for s in series if s.evidence is not None]
    rows = [c for i, a in enumerate(ev) for b in ev[i + 1 :] for c in compare_runs(a, b)]
    if not rows:
        return None
    t = Table(title="Paired tests (same records)", title_style="bold", box=None, padding=(0, 1))
    for col in ("A", "B", "compared", "A", "B", "p", "difference?"):
        t.add_column(col, justify="left" if col in ("compared", "difference?") else "right")
    for c in rows:
        verdict = Text("yes", style="bold") if c.significant else Text("within noise", style="dim")
        t.add_row(
            c.a[:8],
            c.b[:8],
            short_what(c.what),
            f"{c.test.a:.3f}",
            f"{c.test.b:.3f}",
            p_text(c.test.p),
            verdict,
        )
    return t
