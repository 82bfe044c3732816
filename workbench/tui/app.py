"""The Textual workbench app: a tabbed main screen over a :class:`~.session.Session`.

The workflows live in ``actions/`` (model, edit, history, replay), one layer
each over :class:`~.base.AppBase`, which holds the session, the job runner and
the one error handler. This module lays the screen out, binds the keys and
puts the layers together.
"""

from __future__ import annotations

from collections.abc import Iterable
from functools import partial
from pathlib import Path

from textual.app import ComposeResult, SystemCommand
from textual.screen import ModalScreen, Screen
from textual.widgets import Footer, TabbedContent, TabPane

from .actions.edit import EditActions
from .actions.history import HistoryActions
from .actions.model import ModelActions
from .actions.replay import ReplayActions
from .actions.runs import RunsActions
from .base import TAB_TITLES, TABS
from .commands import BINDINGS, PALETTE
from .examples import EXAMPLES
from .jobs import JobId
from .logs import QuietTerminal
from .panes.compare import ComparePane
from .panes.edit import EditPane
from .panes.generation import GenerationPane
from .panes.history import HistoryPane
from .panes.model import ModelPane
from .panes.replay import ReplayPane
from .panes.runs import RunsPane
from .panes.weights import WeightsPane
from .widgets.job_status import JobStatus
from .widgets.model_bar import ModelBar


class WorkbenchApp(ModelActions, EditActions, HistoryActions, ReplayActions, RunsActions):
    """The model-editing workbench: ROME and r-ROME, MEMIT, EMMET and AlphaEdit."""

    CSS_PATH = "workbench.tcss"
    TITLE = "rome-workbench"
    HORIZONTAL_BREAKPOINTS = [(0, "-narrow"), (110, "-wide")]
    BINDINGS = BINDINGS  # type: ignore[assignment]  # a list of Binding, which App's type allows

    # ----------------------------------------------------------- layout
    def compose(self) -> ComposeResult:
        yield ModelBar(id="model-bar")
        with TabbedContent(initial="tab-model", id="tabs"):
            with TabPane("Model", id="tab-model"):
                yield ModelPane(self.model_name, self.device, self.dtype, self.device_map)
            with TabPane("Edit", id="tab-edit"):
                yield EditPane()
            with TabPane("Compare", id="tab-compare"):
                yield ComparePane()
            with TabPane("Generate", id="tab-generate"):
                yield GenerationPane()
            with TabPane("Weights", id="tab-weights"):
                yield WeightsPane()
            with TabPane("History", id="tab-history"):
                yield HistoryPane()
            with TabPane("Replay", id="tab-replay"):
                yield ReplayPane()
            with TabPane("Runs", id="tab-runs"):
                yield RunsPane()
        yield JobStatus(id="job-status")
        yield Footer(compact=True)

    def on_load(self) -> None:
        """Before the terminal is taken over: log lines go to the file, not the screen."""
        self.quiet.install()

    def on_mount(self) -> None:
        self.update_bar()
        self.open_store()
        self.start_polling()
        if self.autoload:
            self.action_load_model()

    def on_unmount(self) -> None:
        self.close_session()
        self.quiet.restore()

    # ----------------------------------------------------------- small actions
    def action_cancel(self) -> None:
        job = self.jobs.current
        if job is None:
            return
        job.cancel()
        what = "the current edit" if job.job is JobId.REPLAY else "the current step"
        self.job_status.progress("cancelling", 0, None, f"stops after {what}")
        self.notify(f"Cancelling {job.label}: it stops after {what}.", timeout=4)

    def action_help(self) -> None:
        from .screens.help import HelpScreen

        if not isinstance(self.screen, HelpScreen):
            self.push_screen(HelpScreen())

    def action_show_tab(self, tab: str) -> None:
        if tab in TABS:
            self.show_tab(tab)

    def action_step_tab(self, step: int) -> None:
        """The tab ``step`` places to the right (left when negative), wrapping around."""
        if isinstance(self.screen, ModalScreen):
            return  # a dialog or the help is open
        i = TABS.index(self.active_tab) if self.active_tab in TABS else 0
        self.show_tab(TABS[(i + step) % len(TABS)])

    def action_example(self, key: str) -> None:
        self.show_tab("edit")
        self.edit_pane.choose_example(key)

    async def action_quit(self) -> None:
        job = self.jobs.current
        if job is None or self._quit_pending:
            self.exit()
            return
        from .screens.dialogs import ConfirmDialog

        def answer(yes: bool | None) -> None:
            if yes and self.jobs.current is job:
                self._quit_pending = True
                job.cancel()
                self.notify(
                    f"Stopping {job.label} after the current step, then quitting "
                    "(q again quits at once).",
                    timeout=10,
                )
            elif yes:
                self.exit()

        self.push_screen(
            ConfirmDialog(
                "Quit?",
                f"{job.label} is running. Quit anyway? It stops after the current step; "
                "finished edits are kept in the history.",
                yes="Quit",
                no="Keep working",
            ),
            answer,
        )

    # ----------------------------------------------------------- command palette
    def get_system_commands(self, screen: Screen) -> Iterable[SystemCommand]:
        yield from super().get_system_commands(screen)
        for title, help_text, action in PALETTE:
            yield SystemCommand(title, help_text, getattr(self, f"action_{action}"))
        for i, tab in enumerate(TABS):
            yield SystemCommand(
                f"Go to {TAB_TITLES[tab]}",
                f"Show the {TAB_TITLES[tab]} tab ({i + 1}, or Alt+{i + 1} anywhere)",
                partial(self.show_tab, tab),
            )
        for e in EXAMPLES:
            yield SystemCommand(
                f"Example: {e.title}",
                f"Fill the edit form: {e.note or e.prompt}",
                partial(self.action_example, e.key),
            )


def run_app(
    model: str = "smollm2-135m",
    db_path: str | Path | None = None,
    device: str = "auto",
    dtype: str | None = None,
    *,
    device_map: str | None = None,
    autoload: bool = True,
    log_file: str | Path | None = None,
) -> None:
    """Open the workbench (the CLI's default command). Logs go to a file, not the screen."""
    quiet = QuietTerminal(log_file)
    with quiet:  # from before the app starts until after it has left the terminal
        app = WorkbenchApp(
            model=model,
            db_path=db_path,
            device=device,
            dtype=dtype,
            device_map=device_map,
            autoload=autoload,
        )
        app.quiet = quiet  # the app's own install / restore nest inside this one
        app.run()
