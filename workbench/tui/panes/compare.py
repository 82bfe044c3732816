"""The Compare tab: one edit in ROME's three key modes, side by side (apply one or none),
and every method beside them (``edit --method all``'s figures): select a row, apply it."""

from __future__ import annotations

from rich.console import Group, JustifyMethod
from rich.table import Table
from rich.text import Text
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Horizontal, VerticalScroll
from textual.message import Message
from textual.widgets import Button, DataTable, Static

from rome import MODES, EditResult
from workbench.core.format import farrow, fnum
from workbench.core.forms import EditForm
from workbench.core.methods import MethodOutcome
from workbench.core.records import EditOutcome

from .edit import verdict_text

VERDICT_STYLE = {"ok": "green", "warn": "yellow", "bad": "bold red", "refused": "bold red"}
#: a method row's verdict word -> its style
METHOD_VERDICT_STYLE = {"ok": "green", "check": "yellow", "DISABLING": "bold red"}


def _fraction(x: float) -> str:
    return "–" if x != x else f"{x:.0%}"  # NaN: no request to count


#: the method rows' columns: (name, justify)
METHOD_COLUMNS: tuple[tuple[str, JustifyMethod], ...] = (
    ("method", "left"),
    ("preset", "left"),
    ("‖ΔW‖ per layer", "left"),
    ("‖ΔW‖", "right"),
    ("‖ΔW‖ / ‖W‖", "right"),
    ("p(new) prompt", "right"),
    ("efficacy", "right"),
    ("verdict", "left"),
)


def method_cells(o: MethodOutcome) -> tuple[str | Text, ...]:
    """One method's row (ROME once per key mode): ‖ΔW‖ per edited layer, p(new) on the
    bare prompt and the efficacy before → after, the verdict judged across the rows."""
    per_layer = " ".join(f"L{layer} {fnum(n)}" for layer, n in o.layer_norms.items())
    p_before = o.p_new_before[0] if o.p_new_before else None
    p_after = o.p_new_after[0] if o.p_new_after else None
    cells: tuple[str | Text, ...] = (
        Text(o.label, style="bold"),
        Text(o.preset, style="dim"),
        per_layer or "–",
        fnum(o.norm),
        fnum(o.ratio),
        farrow(p_before, p_after),
        f"{_fraction(o.efficacy_before)}→{_fraction(o.efficacy)}",
        Text(o.verdict, style=METHOD_VERDICT_STYLE.get(o.verdict, "bold red")),
    )
    return tuple(
        Text(c, justify=j) if isinstance(c, str) else c
        for c, (_, j) in zip(cells, METHOD_COLUMNS, strict=True)
    )


def key_mode_result(o: EditOutcome) -> EditResult:
    """A key mode's rank-one record (every outcome of the key-mode comparison has one)."""
    assert o.result is not None, "a key mode's outcome keeps its rank-one record"
    return o.result


def compare_table(outcomes: dict[str, EditOutcome]) -> Table:
    modes = [m for m in MODES if m in outcomes]
    t = Table(box=None, padding=(0, 1), show_edge=False, header_style="bold", expand=False)
    t.add_column("", style="dim", no_wrap=True)
    for m in modes:
        style = VERDICT_STYLE[outcomes[m].verdict.level]
        t.add_column(Text(m, style=style), no_wrap=True, justify="right")

    def row(label: str, values: list[str]) -> None:
        t.add_row(label, *values)

    rs = [key_mode_result(outcomes[m]) for m in modes]
    row("‖ΔW‖", [fnum(r.update_norm) for r in rs])
    row("‖ΔW‖ / ‖W‖", [fnum(r.update_norm_ratio) for r in rs])
    row("denominator", [fnum(r.denominator) for r in rs])
    row("cos(k*, k(s))", [fnum(r.cos_kstar_ks) for r in rs])
    first = outcomes[modes[0]]
    for b in first.before:
        news, trues = [], []
        for m in modes:
            a = outcomes[m].probe(b.name, after=True)
            news.append(farrow(b.p_new, a.p_new if a else None))
            trues.append(farrow(b.p_true, a.p_true if a else None))
        row(f"{b.name} p(new)", news)
        if b.p_true is not None:
            row(f"{b.name} p(true)", trues)
    row(
        "templated p(new)",
        [farrow(r.p_new_before_templated, r.p_new_after_templated) for r in rs],
    )
    t.add_row(
        "verdict",
        *[
            Text(outcomes[m].verdict.label, style=VERDICT_STYLE[outcomes[m].verdict.level])
            for m in modes
        ],
    )
    return t


class ComparePane(VerticalScroll):
    """The three modes' figures; a warning on a disabling mode; Apply buttons; every
    method's row below, the selected one applied with ``a``."""

    DEFAULT_CSS = """
    ComparePane #compare-methods-table { height: auto; }
    ComparePane #compare-row-buttons { height: auto; margin: 1 0 0 0; }
    """

    BINDINGS = [
        Binding(
            "a",
            "apply_row",
            "Apply row",
            id="compare.apply_row",
            tooltip="Apply the selected method row's update (a ROME key mode or a batch "
            "method), as compared, to the model",
        ),
    ]

    class ApplyMode(Message):
        def __init__(self, mode: str) -> None:
            super().__init__()
            self.mode = mode

    class ApplyRow(Message):
        """Apply the method row ``label`` (``rome/<mode>`` or a batch method)."""

        def __init__(self, label: str) -> None:
            super().__init__()
            self.label = label

    def __init__(self) -> None:
        super().__init__(id="compare-pane")
        self.outcomes: dict[str, EditOutcome] = {}
        self.method_rows: list[MethodOutcome] = []
        self.form: EditForm | None = None  # the compared request (ROME's form)
        self.version: int | None = None  # Session.version the comparison was computed on

    def compose(self) -> ComposeResult:
        yield Static(
            Text(
                "F6 computes the Edit tab's request in ROME's three key modes and with "
                "every method (nothing is applied).",
                style="dim italic",
            ),
            id="compare-head",
        )
        with Horizontal(classes="buttons", id="compare-buttons"):
            for m in MODES:
                yield Button(
                    f"Apply {m}",
                    id=f"apply-{m}",
                    compact=True,
                    disabled=True,
                    tooltip=f"Apply the {m} update to the model",
                )
            yield Button(
                "Discard",
                id="compare-discard",
                compact=True,
                disabled=True,
                tooltip="Apply none of them",
            )
        yield Static("", id="compare-warnings")
        yield Static("", id="compare-body")
        yield Static("", id="compare-methods")
        table: DataTable = DataTable(id="compare-methods-table", cursor_type="row")
        for name, justify in METHOD_COLUMNS:
            table.add_column(Text(name, justify=justify), key=name)
        table.display = False
        yield table
        with Horizontal(classes="buttons", id="compare-row-buttons"):
            yield Button(
                "Apply selected row",
                id="compare-apply-row",
                compact=True,
                disabled=True,
                tooltip="Apply the selected method row's update to the model (a)",
            )
        yield Static("", id="compare-methods-notes")

    def show_computing(self, text: str) -> None:
        self.query_one("#compare-head", Static).update(Text(text + "…", style="italic"))
        self.query_one("#compare-body", Static).update("")
        self.query_one("#compare-warnings", Static).update("")
        self._show_rows([])
        self._buttons(False)

    def _buttons(self, enabled: bool) -> None:
        for b in self.query("#compare-buttons Button").results(Button):
            mode = (b.id or "").removeprefix("apply-")
            if enabled and mode in self.outcomes and self.outcomes[mode].verdict.level == "refused":
                b.disabled = True
            else:
                b.disabled = not enabled
            b.variant = (
                "error"
                if mode in self.outcomes and self.outcomes[mode].verdict.disabling
                else "default"
            )

    def show(self, outcomes: dict[str, EditOutcome]) -> None:
        self.outcomes = dict(outcomes)
        any_o = next(iter(outcomes.values()))
        self.form, self.version = any_o.form, any_o.version
        r = key_mode_result(any_o)
        head = Text()
        head.append(f"{r.request.subject} → {r.request.target_new}", style="bold")
        head.append(
            f"   layer {r.layer} · {r.n_templates} templates · C: {r.covariance}", style="dim"
        )
        self.query_one("#compare-head", Static).update(head)
        self.query_one("#compare-body", Static).update(compare_table(outcomes))
        lines = []
        for m in MODES:
            o = outcomes.get(m)
            if o is None or o.verdict.level == "ok":
                continue
            t = Text(f"{m}: ", style="bold")
            t.append_text(verdict_text(o.verdict, label=False))
            lines.append(t)
        bad = [m for m in MODES if m in outcomes and outcomes[m].verdict.disabling]
        if bad:
            good = [m for m in MODES if m in outcomes and not outcomes[m].verdict.disabling]
            advice = Text(
                f"⚠ {', '.join(bad)} would likely disable the model"
                + (f"; prefer {' or '.join(good)}." if good else "."),
                style="bold red",
            )
            lines.insert(0, advice)
        if not lines:
            lines.append(Text("All three updates look safe; pick one to apply.", style="green"))
        self.query_one("#compare-warnings", Static).update(Group(*lines))
        self.query_one("#compare-methods", Static).update(
            Text("Computing the batch methods beside them…", style="italic")
        )
        self._buttons(True)

    def show_methods(self, rows: list[MethodOutcome]) -> None:
        """Every method beside ROME's key modes, judged together (as ``edit --method all``),
        computed by the comparison's job on the weights of its key modes."""
        title = Text("\nMethods on the bare prompt", style="bold")
        title.append(
            "  (‖ΔW‖ over the edited layers; efficacy: target_new above target_true, "
            "before→after; verdict across these rows)",
            style="dim",
        )
        self.query_one("#compare-methods", Static).update(title)
        self._show_rows(rows)
        notes = []
        for o in rows:
            if o.verdict != "ok" and o.reasons:
                style = METHOD_VERDICT_STYLE.get(o.verdict, "bold red")
                line = Text(f"{o.label}: ", style="bold")
                line.append(
                    f"{o.verdict}: {'; '.join(o.reasons)}", style=style.replace("bold ", "")
                )
                notes.append(line)
        notes.append(
            Text(
                "Select a row and press a (or Apply selected row) to apply its update as "
                "compared here; once the model changes, F6 compares again.",
                style="dim italic",
            )
        )
        self.query_one("#compare-methods-notes", Static).update(Group(Text(""), *notes))

    def _show_rows(self, rows: list[MethodOutcome]) -> None:
        self.method_rows = list(rows)
        table = self.query_one("#compare-methods-table", DataTable)
        table.clear()
        for o in rows:
            table.add_row(*method_cells(o), key=o.label)
        table.display = bool(rows)
        self.query_one("#compare-apply-row", Button).disabled = not rows
        if not rows:
            self.query_one("#compare-methods", Static).update("")
            self.query_one("#compare-methods-notes", Static).update("")

    def selected_row(self) -> MethodOutcome | None:
        """The method row under the table's cursor."""
        table = self.query_one("#compare-methods-table", DataTable)
        if not self.method_rows or not 0 <= table.cursor_row < len(self.method_rows):
            return None
        key = table.coordinate_to_cell_key(table.cursor_coordinate).row_key.value
        return next((o for o in self.method_rows if o.label == key), None)

    def select_row(self, label: str) -> None:
        """Put the table's cursor on the row ``label``."""
        table = self.query_one("#compare-methods-table", DataTable)
        table.move_cursor(row=table.get_row_index(label))

    def action_apply_row(self) -> None:
        row = self.selected_row()
        if row is None:
            self.app.notify("No method row to apply: compare first (F6).", severity="warning")
            return
        self.post_message(self.ApplyRow(row.label))

    def mark_applied(self, mode: str, number: int) -> None:
        """An edit was applied: these updates were computed on the weights before it."""
        if not self.outcomes:
            return
        self.outcomes = {}
        self.query_one("#compare-warnings", Static).update(
            Text(f"Applied {mode} as session edit #{number}; F6 compares again.", style="green")
        )
        self._buttons(False)
        self.query_one("#compare-apply-row", Button).disabled = True

    def discard(self) -> None:
        self.outcomes = {}
        self.query_one("#compare-head", Static).update(
            Text("Discarded: nothing applied. F6 compares again.", style="dim italic")
        )
        self.query_one("#compare-body", Static).update("")
        self.query_one("#compare-warnings", Static).update("")
        self._show_rows([])
        self._buttons(False)

    def on_button_pressed(self, event: Button.Pressed) -> None:
        bid = event.button.id or ""
        if bid == "compare-discard":
            event.stop()
            self.discard()
        elif bid == "compare-apply-row":
            event.stop()
            self.action_apply_row()
        elif bid.startswith("apply-"):
            event.stop()
            self.post_message(self.ApplyMode(bid.removeprefix("apply-")))
