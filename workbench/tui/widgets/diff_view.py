"""Before / after continuations side by side, changed words highlighted."""

from __future__ import annotations

from collections.abc import Sequence

from rich.console import Group
from rich.table import Table
from rich.text import Text
from textual.widgets import Static

from workbench.core.generation import GenerationPair, word_diff

STYLES = {"same": "", "removed": "bold red strike", "added": "bold black on green"}


def spans_text(spans: Sequence[tuple[str, str]]) -> Text:
    t = Text()
    for text, kind in spans:
        t.append(text, style=STYLES[kind])
    return t


class DiffView(Static):
    """One block per prompt: the prompt, then ``before | after`` with the changes marked."""

    DEFAULT_CSS = "DiffView { height: auto; }"

    def show(self, pairs: Sequence[GenerationPair], empty: str = "") -> None:
        if not pairs:
            self.update(Text(empty, style="dim italic"))
            return
        blocks = []
        for pair in pairs:
            left, right = word_diff(pair.before, pair.after)
            table = Table(
                box=None, expand=True, show_header=True, padding=(0, 1), header_style="dim"
            )
            table.add_column("before", ratio=1)
            table.add_column("after" + ("" if pair.changed else " (unchanged)"), ratio=1)
            table.add_row(spans_text(left), spans_text(right))
            title = Text(pair.prompt, style="bold")
            title.append(" …", style="dim")
            blocks.append(Group(title, table, Text("")))
        self.update(Group(*blocks))
