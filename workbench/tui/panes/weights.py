"""The Weights tab: the update-norm history of this session's edits."""

from __future__ import annotations

import statistics
from collections.abc import Sequence

from rich.text import Text
from textual.app import ComposeResult
from textual.containers import Vertical
from textual.widgets import DataTable, Static

from workbench.core.format import fnum
from workbench.core.records import NormPoint

from ..widgets.norm_chart import NormChart, NormSeries


class WeightsPane(Vertical):
    def __init__(self) -> None:
        super().__init__(id="weights-pane")

    def compose(self) -> ComposeResult:
        yield Static(
            Text("No edits applied in this session yet.", style="dim italic"), id="weights-summary"
        )
        yield NormChart("‖ΔW‖ per edit and ‖W − W₀‖", id="weights-chart")
        table: DataTable = DataTable(id="weights-table", cursor_type="row", zebra_stripes=True)
        table.add_columns("#", "edit", "mode", "L", "‖ΔW‖", "×‖W‖", "‖W−W₀‖", "state")
        yield table

    def show(self, points: Sequence[NormPoint], layer: int | None) -> None:
        """Points of ``layer`` (default: the last edit's layer) on the chart; all in the table."""
        table = self.query_one("#weights-table", DataTable)
        table.clear()
        for p in points:
            state = "active" if p.active else "undone"
            if p.flagged:
                state += " ⚠"
            table.add_row(
                str(p.number),
                p.label,
                p.mode,
                str(p.layer),
                fnum(p.norm),
                fnum(p.ratio),
                fnum(p.cumulative),
                Text(state, style="red" if p.flagged else ("" if p.active else "dim")),
                key=str(p.number),
            )
        if layer is None and points:
            layer = points[-1].layer
        mine = [p for p in points if p.layer == layer]
        summary = Text()
        if not mine:
            summary.append("No edits applied in this session yet.", style="dim italic")
        else:
            active = [p for p in mine if p.active]
            norms = [p.norm for p in mine]
            med = statistics.median(norms)
            summary.append(f"layer {layer}: ", style="bold")
            n = len(mine)
            summary.append(
                f"{n} edit{'s' if n != 1 else ''} ({len(active)} active) · median ‖ΔW‖ {fnum(med)}"
            )
            summary.append(f" · last {fnum(mine[-1].norm)}")
            if med > 0 and mine[-1].norm > 3 * med:
                summary.append("  ⚠ the last norm is far above the median", style="bold red")
        self.query_one("#weights-summary", Static).update(summary)
        chart = self.query_one(NormChart)
        chart.set_series(
            [
                NormSeries(
                    "‖ΔW‖",
                    [(p.number, p.norm) for p in mine],
                    [p.number for p in mine if p.flagged],
                ),
                NormSeries("‖W−W₀‖", [(p.number, p.cumulative) for p in mine if p.active]),
            ]
            if mine
            else []
        )
