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
    ("Compare key modes", "original vs rrome vs prompt side by side (F6)", "compare"),
    ("Apply edit", "Apply the Edit tab's edit to the model (F7)", "apply"),
    ("Undo last edit", "Restore the weights before the last edit (F8)", "undo"),
    ("Revert to base weights", "Undo every applied edit", "revert_all"),
    ("Generate", "Greedy continuation of the Generate tab's prompt (F9)", "generate"),
    ("Start replay", "Run the Replay tab's CounterFact sequence", "start_replay"),
    ("Cancel job", "Stop the running job between two steps (Esc)", "cancel"),
    ("Refresh history", "Reload the stored edits", "refresh_history"),
    ("Help", "Keys, tabs and the workflow (F1)", "help"),
)

TAB_KEYS = Binding.Group("tabs")

BINDINGS: list[Binding] = [
    Binding("f1", "help", "Help", id="help", tooltip="Keys, tabs and the workflow"),
    Binding("f2", "load_model", "Load", id="load_model", tooltip="Load the Model tab's model"),
    Binding(
        "f3",
        "step_tab(-1)",
        "previous tab",
        id="tab.previous",
        priority=True,
        group=TAB_KEYS,
        tooltip="Show the tab on the left (works in a text field too)",
    ),
    Binding(
        "f4",
        "step_tab(1)",
        "next tab",
        id="tab.next",
        priority=True,
        group=TAB_KEYS,
        tooltip="Show the tab on the right (works in a text field too)",
    ),
    Binding("f5", "compute", "Compute", id="compute", tooltip="Compute the edit; model unchanged"),
    Binding("f6", "compare", "Compare", id="compare", tooltip="Compute the three key modes"),
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
    Binding(
        "ctrl+pageup",
        "step_tab(-1)",
        "previous tab",
        id="tab.previous.page",
        priority=True,
        show=False,
        tooltip="Show the tab on the left (as F3)",
    ),
    Binding(
        "ctrl+pagedown",
        "step_tab(1)",
        "next tab",
        id="tab.next.page",
        priority=True,
        show=False,
        tooltip="Show the tab on the right (as F4)",
    ),
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
