"""The one-line bar at the top: app name, model, device, layer, applied edits."""

from __future__ import annotations

from rich.text import Text
from textual.widgets import Static


class ModelBar(Static):
    DEFAULT_CSS = """
    ModelBar { height: 1; background: $panel; color: $foreground; padding: 0 1; }
    """

    def show(
        self,
        model: str | None,
        *,
        device: str = "",
        dtype: str = "",
        layer: int | None = None,
        n_layers: int | None = None,
        applied: int = 0,
        state: str = "",
    ) -> None:
        t = Text()
        t.append("rome-workbench", style="bold")
        t.append("  ")
        if model is None:
            t.append(state or "no model loaded (F2 loads one)", style="italic")
        else:
            t.append(model, style="bold cyan")
            t.append(f"  {device} {dtype}")
            if layer is not None:
                t.append(f"  layer {layer}/{(n_layers or 0) - 1}")
            t.append("  ")
            t.append(
                f"{applied} edit{'s' if applied != 1 else ''} applied",
                style="bold yellow" if applied else "dim",
            )
            if state:
                t.append(f"  {state}", style="italic")
        self.update(t)
