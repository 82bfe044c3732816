"""The flagged edits of the runs shown, and the record of the one selected: its request,
cos(k*, k(s)), denominator, ‖ΔW‖, the flag's reason, its metrics before and after."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

from rich.table import Table
from rich.text import Text
from textual import on
from textual.app import ComposeResult
from textual.containers import Vertical, VerticalScroll
from textual.widgets import DataTable, Static

from workbench.tui.tables import cursor_key

if TYPE_CHECKING:
    from ..replay_data import ReplaySeries

Facts = list[tuple[str, str]]


def _short(text: str, n: int) -> str:
    return text if len(text) <= n else text[: n - 1] + "…"


class FlaggedEdits(Vertical):
    """A table of flagged edits (run, edit, ‖ΔW‖, reason); the selected one's record below."""

    DEFAULT_CSS = """
    FlaggedEdits { height: auto; }
    FlaggedEdits DataTable { height: auto; max-height: 9; }
    FlaggedEdits .flag-detail-box { height: auto; max-height: 12; }
    """

    def __init__(self, *, id: str | None = None) -> None:
        super().__init__(id=id)
        self.facts: dict[str, Facts] = {}

    def compose(self) -> ComposeResult:
        yield Static("", classes="flag-title section-title")
        table: DataTable = DataTable(cursor_type="row", zebra_stripes=True, classes="flag-table")
        table.add_columns("run", "edit", "‖ΔW‖", "reason")
        yield table
        with VerticalScroll(classes="flag-detail-box"):
            yield Static("", classes="flag-detail")

    def show(self, series: Sequence[ReplaySeries]) -> None:
        table = self.query_one(".flag-table", DataTable)
        table.clear()
        self.facts = {}
        total = 0
        for s in series:
            for n, facts in s.flagged:
                key = f"{s.run_id}:{n}"
                self.facts[key] = facts
                values = dict(facts)
                norm = values.get("‖ΔW‖", "").split(" ")[0]
                table.add_row(
                    s.run_id[:8], str(n - 1), norm, _short(values.get("flag", ""), 48), key=key
                )
                total += 1
        runs = len(series)
        self.query_one(".flag-title", Static).update(
            Text(f"Flagged edits: {total} in {runs} run(s) shown", style="bold")
        )
        self._detail(self.selected())

    def selected(self) -> str | None:
        return cursor_key(self.query_one(".flag-table", DataTable))

    def select(self, run_id: str, seq: int) -> None:
        """Move the cursor to edit ``seq`` of ``run_id`` (and show its record)."""
        table = self.query_one(".flag-table", DataTable)
        table.move_cursor(row=table.get_row_index(f"{run_id}:{seq + 1}"))
        self._detail(f"{run_id}:{seq + 1}")

    @on(DataTable.RowHighlighted, ".flag-table")
    def _highlighted(self, event: DataTable.RowHighlighted) -> None:
        event.stop()
        self._detail(str(event.row_key.value))

    def detail_text(self) -> str:
        """The selected edit's record as plain text (for tests and captures)."""
        key = self.selected()
        return "\n".join(f"{k}: {v}" for k, v in self.facts.get(key or "", []))

    def _detail(self, key: str | None) -> None:
        body = self.query_one(".flag-detail", Static)
        facts = self.facts.get(key or "")
        if not facts:
            body.update(Text("Select a flagged edit for its record.", style="dim italic"))
            return
        t = Table.grid(padding=(0, 1))
        t.add_column(style="dim", no_wrap=True)
        t.add_column()
        for label, value in facts:
            t.add_row(label, Text(value, style="red" if label == "flag" else ""))
        body.update(t)
