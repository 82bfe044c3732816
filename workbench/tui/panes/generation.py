"""The Generate tab: greedy continuations before / after the last applied edit."""

from __future__ import annotations

from collections.abc import Sequence

from rich.text import Text
from textual.app import ComposeResult
from textual.containers import Horizontal, VerticalScroll
from textual.widgets import Button, Input, Static

from workbench.core.generation import GenerationPair

from ..widgets.diff_view import DiffView
from ..widgets.form_field import FormField


class GenerationPane(VerticalScroll):
    def __init__(self) -> None:
        super().__init__(id="generation-pane")

    def compose(self) -> ComposeResult:
        yield Static(
            Text(
                "Apply an edit (F7) to see greedy continuations before and after it; "
                "changed words are highlighted.",
                style="dim italic",
            ),
            id="gen-title",
        )
        yield DiffView(id="gen-diff")
        with Horizontal(classes="buttons"):
            yield FormField(
                "Own prompt",
                Input(
                    placeholder="any prompt, e.g. Macbeth was written by",
                    id="gen-prompt",
                    compact=True,
                    tooltip="Generate from this prompt on the current model (F9)",
                ),
                key="gen-prompt",
            )
            yield Button(
                "Generate F9",
                id="btn-generate",
                compact=True,
                action="app.generate",
                tooltip="Greedy continuation of your prompt on the model as it is now",
            )
        yield Static("", id="gen-own")

    def prompt(self) -> str:
        return self.query_one("#gen-prompt", Input).value.strip()

    def focus_prompt(self) -> None:
        self.query_one("#gen-prompt", Input).focus()

    def show_pairs(self, pairs: Sequence[GenerationPair], title: str) -> None:
        self.query_one("#gen-title", Static).update(Text(title, style="bold"))
        self.query_one(DiffView).show(pairs, "no generation prompts")

    def show_own(self, prompt: str, text: str, note: str) -> None:
        t = Text()
        t.append(prompt, style="bold")
        t.append(text)
        t.append(f"\n({note})", style="dim")
        self.query_one("#gen-own", Static).update(t)

    async def on_input_submitted(self, event: Input.Submitted) -> None:
        event.stop()
        await self.app.run_action("generate")
