"""The Compare tab: one edit in the three key modes, side by side; apply one or none."""

from __future__ import annotations

from rich.console import Group
from rich.table import Table
from rich.text import Text
from textual.app import ComposeResult
from textual.containers import Horizontal, VerticalScroll
from textual.message import Message
from textual.widgets import Button, Static

from rome import MODES
from workbench.core.format import farrow, fnum
from workbench.core.records import EditOutcome

from .edit import verdict_text

VERDICT_STYLE = {"ok": "green", "warn": "yellow", "bad": "bold red", "refused": "bold red"}


def compare_table(outcomes: dict[str, EditOutcome]) -> Table:
    modes = [m for m in MODES if m in outcomes]
    t = Table(box=None, padding=(0, 1), show_edge=False, header_style="bold", expand=False)
    t.add_column("", style="dim", no_wrap=True)
    for m in modes:
        style = VERDICT_STYLE[outcomes[m].verdict.level]
        t.add_column(Text(m, style=style), no_wrap=True, justify="right")

    def row(label: str, values: list[str]) -> None:
        t.add_row(label, *values)

    rs = [outcomes[m].result for m in modes]
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
    """The three modes' figures; a warning on a disabling mode; Apply buttons."""

    class ApplyMode(Message):
        def __init__(self, mode: str) -> None:
            super().__init__()
            self.mode = mode

    def __init__(self) -> None:
        super().__init__(id="compare-pane")
        self.outcomes: dict[str, EditOutcome] = {}

    def compose(self) -> ComposeResult:
        yield Static(
            Text(
                "F6 computes the Edit tab's request in the three key modes (nothing is applied).",
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

    def show_computing(self, text: str) -> None:
        self.query_one("#compare-head", Static).update(Text(text + "…", style="italic"))
        self.query_one("#compare-body", Static).update("")
        self.query_one("#compare-warnings", Static).update("")
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
        r = any_o.result
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
        self._buttons(True)

    def mark_applied(self, mode: str, number: int) -> None:
        """An edit was applied: these updates were computed on the weights before it."""
        if not self.outcomes:
            return
        self.outcomes = {}
        self.query_one("#compare-warnings", Static).update(
            Text(f"Applied {mode} as session edit #{number}; F6 compares again.", style="green")
        )
        self._buttons(False)

    def discard(self) -> None:
        self.outcomes = {}
        self.query_one("#compare-head", Static).update(
            Text("Discarded: nothing applied. F6 compares again.", style="dim italic")
        )
        self.query_one("#compare-body", Static).update("")
        self.query_one("#compare-warnings", Static).update("")
        self._buttons(False)

    def on_button_pressed(self, event: Button.Pressed) -> None:
        bid = event.button.id or ""
        if bid == "compare-discard":
            event.stop()
            self.discard()
        elif bid.startswith("apply-"):
            event.stop()
            self.post_message(self.ApplyMode(bid.removeprefix("apply-")))
