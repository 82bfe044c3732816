"""The History tab: every stored edit of this model; undo, revert, re-apply."""

from __future__ import annotations

from collections.abc import Sequence

from rich.table import Table
from rich.text import Text
from textual import on
from textual.app import ComposeResult
from textual.containers import Horizontal, Vertical, VerticalScroll
from textual.message import Message
from textual.widgets import Button, DataTable, Static

from workbench.core.format import fnum, fprob
from workbench.core.records import HistoryRow
from workbench.tui.tables import cursor_key


def plural(n: int, word: str) -> str:
    return f"{n} {word}{'' if n == 1 else 's'}"


def short(text: str, n: int) -> str:
    return text if len(text) <= n else text[: n - 1] + "…"


def when(iso: str) -> str:
    """``2024-05-01T12:34:56.789+00:00`` -> ``05-01 12:34``."""
    return f"{iso[5:10]} {iso[11:16]}" if len(iso) >= 16 else iso


CF_METRICS = ("es", "em", "ps", "pm", "ns", "nm", "s", "ge")


def _number(value: object) -> float | None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    return float(value)


def probe_lines(metrics: dict) -> list[tuple[str, str]]:
    """p(new) / p(true) before → after on each probe of a session edit."""
    out: list[tuple[str, str]] = []
    for probe in ("prompt", "paraphrase", "neighbour"):
        if f"{probe}_p_new_before" not in metrics:
            continue
        line = (
            f"p(new) {fprob(metrics.get(f'{probe}_p_new_before'))}"
            f"→{fprob(metrics.get(f'{probe}_p_new_after'))}"
        )
        if f"{probe}_p_true_before" in metrics:
            line += (
                f" · p(true) {fprob(metrics.get(f'{probe}_p_true_before'))}"
                f"→{fprob(metrics.get(f'{probe}_p_true_after'))}"
            )
        out.append((probe, line))
    return out


def counterfact_line(metrics: dict) -> str:
    """CounterFact scores after the edit, as ``pre→post`` where the pre-edit ones are stored."""
    pre_value = metrics.get("pre")
    pre: dict = pre_value if isinstance(pre_value, dict) else {}
    scores = []
    for k in CF_METRICS:
        post = _number(metrics.get(k))
        if post is None:
            continue
        before = _number(pre.get(k))
        shown = fnum(post, 2) if before is None else f"{fnum(before, 2)}→{fnum(post, 2)}"
        scores.append(f"{k.upper()} {shown}")
    return " · ".join(scores)


def drift_line(metrics: dict) -> str:
    """The edited matrix after the edit, against the base: ‖W_n − W₀‖ and ‖W_n‖ / ‖W₀‖."""
    parts = []
    drift = _number(metrics.get("w_delta_norm"))
    if drift is not None:
        parts.append(f"‖W−W₀‖ {fnum(drift)}")
    ratio = _number(metrics.get("w_norm_ratio"))
    if ratio is not None:
        parts.append(f"‖W‖/‖W₀‖ {fnum(ratio, 4)}")
    return " · ".join(parts)


def metric_lines(metrics: dict) -> list[tuple[str, str]]:
    """Compact lines for an edit's metrics: probes (session edits) or CounterFact scores."""
    out = probe_lines(metrics)
    scores = counterfact_line(metrics)
    if scores:
        label = "CounterFact" if not isinstance(metrics.get("pre"), dict) else "pre → post"
        out.append((label, scores))
    drift = drift_line(metrics)
    if drift:
        out.append(("weights", drift))
    if metrics.get("from"):
        out.append(("re-applied", f"from {metrics['from']}"))
    return out


class HistoryPane(Vertical):
    class Reapply(Message):
        """Re-apply stored edits: ``whole_run`` means every applied edit of the row's run."""

        def __init__(self, row: HistoryRow, whole_run: bool) -> None:
            super().__init__()
            self.row = row
            self.whole_run = whole_run

    class SaveRun(Message):
        """Write the base model plus the run's applied edits as a Hugging Face folder."""

        def __init__(self, row: HistoryRow) -> None:
            super().__init__()
            self.row = row

    def __init__(self) -> None:
        super().__init__(id="history-pane")
        self.rows: dict[str, HistoryRow] = {}
        self.ordered: list[HistoryRow] = []

    def compose(self) -> ComposeResult:
        yield Static(Text("Loading the history…", style="dim italic"), id="history-note")
        table: DataTable = DataTable(id="history-table", cursor_type="row", zebra_stripes=True)
        table.add_columns("run", "#", "edit", "state", "method", "L", "‖ΔW‖", "×‖W‖", "cos", "when")
        yield table
        with VerticalScroll(id="history-details"):
            yield Static("", id="history-detail")
        with Horizontal(classes="buttons"):
            yield Button(
                "Undo F8",
                id="hist-undo",
                compact=True,
                action="app.undo",
                tooltip="Undo the last applied edit (weights restored bit for bit)",
            )
            yield Button(
                "Revert all",
                id="hist-revert",
                compact=True,
                variant="warning",
                action="app.revert_all",
                tooltip="Put the model back to its base weights",
            )
            yield Button(
                "Re-apply edit",
                id="hist-reapply",
                compact=True,
                tooltip="Apply the selected stored edit onto the loaded model",
            )
            yield Button(
                "Re-apply run",
                id="hist-reapply-run",
                compact=True,
                tooltip="Apply every applied edit of the selected run, in order",
            )
            yield Button(
                "Save model…",
                id="hist-save",
                compact=True,
                tooltip="Write the base model plus the selected run's applied edits as a "
                "Hugging Face folder",
            )
            yield Button(
                "Refresh",
                id="hist-refresh",
                compact=True,
                action="app.refresh_history",
                tooltip="Reload the history from the database",
            )

    def show(self, rows: Sequence[HistoryRow], note: str = "") -> None:
        table = self.query_one("#history-table", DataTable)
        selected = self.selected()
        table.clear()
        self.rows = {r.key: r for r in rows}
        self.ordered = list(rows)
        for r in rows:
            state = r.state
            style = {"applied": "green", "undone": "dim", "refused": "red"}[state]
            if r.in_session and r.applied:
                state = "on model"
            elif not r.in_session and state == "applied":
                style = ""
            if r.flagged:
                state += " ⚠"
                style = "bold red"
            run = f"{r.run_id[:6]}{'*' if r.in_session else ''}"
            table.add_row(
                Text(run, style="bold" if r.in_session else ""),
                str(r.seq),
                short(f"{r.subject} → {r.target_new}", 26),
                Text(state, style=style),
                r.how,
                str(r.layer),
                fnum(r.norm),
                fnum(r.ratio),
                fnum(r.cos, 2),
                when(r.created_at),
                key=r.key,
            )
        n_runs = len({r.run_id for r in rows})
        text = Text(f"{plural(len(rows), 'stored edit')} in {plural(n_runs, 'run')}", style="bold")
        text.append("  (* = this session's run; newest first)", style="dim")
        if note:
            text.append(f"  {note}", style="yellow")
        self.query_one("#history-note", Static).update(text)
        if selected is not None and selected.key in self.rows:
            table.move_cursor(row=table.get_row_index(selected.key))
        self._show_detail(self.selected())

    def selected(self) -> HistoryRow | None:
        key = cursor_key(self.query_one("#history-table", DataTable))
        return None if key is None else self.rows.get(key)

    @on(DataTable.RowHighlighted, "#history-table")
    def _highlighted(self, event: DataTable.RowHighlighted) -> None:
        self._show_detail(self.rows.get(str(event.row_key.value)))

    def _show_detail(self, r: HistoryRow | None) -> None:
        body = self.query_one("#history-detail", Static)
        if r is None:
            body.update(Text("Select an edit for its details.", style="dim italic"))
            return
        t = Table.grid(padding=(0, 2))
        t.add_column(style="dim", no_wrap=True)
        t.add_column()
        t.add_row(
            "edit", Text(f"{r.prompt.replace('{}', r.subject)} → {r.target_new}", style="bold")
        )
        t.add_row(
            "run",
            f"{r.run_id} ({r.run_kind}, {r.run_status}) seq {r.seq} · {r.created_at[:19]}",
        )
        t.add_row(
            "update",
            f"{r.how} · layer {r.layer} · ‖ΔW‖ {fnum(r.norm)} ({fnum(r.ratio)}×‖W‖) · "
            f"denominator {fnum(r.denominator)} · cos {fnum(r.cos)}",
        )
        if r.flag_reason:
            t.add_row("flag", Text(r.flag_reason, style="red"))
        rec = r.record
        if rec.get("p_new_before") is not None and "prompt_p_new_before" not in r.metrics:
            t.add_row(
                "prompt",
                f"p(new) {fprob(rec.get('p_new_before'))}→{fprob(rec.get('p_new_after'))}"
                + (
                    f" · p(true) {fprob(rec.get('p_true_before'))}→{fprob(rec.get('p_true_after'))}"
                    if rec.get("p_true_before") is not None
                    else ""
                ),
            )
        for label, line in metric_lines(r.metrics):
            t.add_row(label, line)
        if not r.has_factors:
            t.add_row("", Text("stored without factors: cannot be re-applied", style="yellow"))
        body.update(t)

    def run_keys(self, run_id: str) -> list[tuple[str, int]]:
        """The applied edits of a run, in order (what re-applying the run applies)."""
        return sorted(
            (r.run_id, r.seq)
            for r in self.ordered
            if r.run_id == run_id and r.applied and not r.refused
        )

    @on(Button.Pressed, "#hist-reapply, #hist-reapply-run, #hist-save")
    def _row_button(self, event: Button.Pressed) -> None:
        event.stop()
        row = self.selected()
        if row is None:
            self.app.notify("Select an edit in the table first.", severity="warning")
            return
        if event.button.id == "hist-save":
            self.post_message(self.SaveRun(row))
        else:
            self.post_message(self.Reapply(row, event.button.id == "hist-reapply-run"))
