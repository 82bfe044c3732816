"""The app's key bindings and its command-palette entries, as data."""

from __future__ import annotations

from textual.binding import Binding

from .base import TAB_TITLES, TABS

#: (title, help, action) of the palette entries besides tabs and examples
PALETTE: tuple[tuple[str, str, str], ...] = (
    ("Load model", "Load the model named in the Model tab (F2)", "load_model"),
    (
        "Prepare covariance",
        "Compute the covariance statistics for the edit layer now",
        "prepare_covariance",
    ),
    ("Compute edit", "Compute the Edit tab's update; model unchanged (F5)", "compute"),
    (
        "Compare key modes and methods",
        "ROME's original / rrome / prompt beside the batch methods (F6)",
        "compare",
    ),
    ("Apply edit", "Apply the Edit tab's edit to the model (F7)", "apply"),
    ("Undo last edit", "Restore the weights before the last edit (F8)", "undo"),
    ("Revert to base weights", "Undo every applied edit", "revert_all"),
    ("Generate", "Greedy continuation of the Generate tab's prompt (F9)", "generate"),
    ("Start replay", "Run the Replay tab's CounterFact sequence", "start_replay"),
    ("Cancel job", "Stop the running job between two steps (Esc)", "cancel"),
    ("Refresh history", "Reload the stored edits", "refresh_history"),
    (
        "Open database…",
        "Browse another results database in the Runs tab (Ctrl+O)",
        "open_database",
    ),
    ("Help", "Keys, tabs and the workflow (F1)", "help"),
)

TAB_KEYS = Binding.Group("tabs")


def step_tab_key(key: str, step: int, id: str, *, shown: bool, also: str = "") -> Binding:
    """A key that moves ``step`` tabs along, from anywhere (a text field too)."""
    side = "left" if step < 0 else "right"
    return Binding(
        key,
        f"step_tab({step})",
        "previous tab" if step < 0 else "next tab",
        id=id,
        priority=True,
        show=shown,
        group=TAB_KEYS if shown else None,
        tooltip=f"Show the tab on the {side} (works in a text field too){also}",
    )


BINDINGS: list[Binding] = [
    Binding("f1", "help", "Help", id="help", tooltip="Keys, tabs and the workflow"),
    Binding("f2", "load_model", "Load", id="load_model", tooltip="Load the Model tab's model"),
    step_tab_key("f3", -1, "tab.previous", shown=True),
    step_tab_key("f4", 1, "tab.next", shown=True),
    step_tab_key("ctrl+pageup", -1, "tab.previous.page", shown=False, also="; as F3"),
    step_tab_key("ctrl+pagedown", 1, "tab.next.page", shown=False, also="; as F4"),
    Binding("f5", "compute", "Compute", id="compute", tooltip="Compute the edit; model unchanged"),
    Binding(
        "f6",
        "compare",
        "Compare",
        id="compare",
        tooltip="Compute the three key modes and the methods",
    ),
    Binding("f7", "apply", "Apply", id="apply", tooltip="Apply the edit to the model"),
    Binding("f8", "undo", "Undo", id="undo", tooltip="Undo the last applied edit"),
    Binding(
        "f9",
        "generate",
        "Generate",
        id="generate",
        show=False,
        tooltip="Generate from the Generate tab's prompt",
    ),
    Binding(
        "escape",
        "cancel",
        "Cancel",
        id="cancel",
        tooltip="Cancel the running job between two steps",
    ),
    Binding("q", "quit", "Quit", id="quit", tooltip="Quit (asks first while a job runs)"),
    Binding(
        "ctrl+o",
        "open_database",
        "Open db",
        id="open_database",
        show=False,
        tooltip="Open another results database and browse its runs (Runs tab)",
    ),
    *[
        Binding(
            str(i + 1),
            f"show_tab('{tab}')",
            TAB_TITLES[tab],
            show=False,
            id=f"tab.{tab}",
            tooltip=f"Show the {TAB_TITLES[tab]} tab (when no text field has focus)",
        )
        for i, tab in enumerate(TABS)
    ],
    *[
        Binding(
            f"alt+{i + 1}",
            f"show_tab('{tab}')",
            TAB_TITLES[tab],
            show=False,
            priority=True,
            id=f"tab.{tab}.alt",
            tooltip=f"Show the {TAB_TITLES[tab]} tab (works in a text field too)",
        )
        for i, tab in enumerate(TABS)
    ],
]
