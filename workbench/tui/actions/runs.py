"""The Runs tab: open any database, open and overlay its runs, follow another writer.

A timer re-reads the run list every :data:`POLL_S` seconds (in a worker); a
shown run whose stored state changed (another process added edits or
checkpoints, or finished it) is read again, so the charts follow a replay
running elsewhere. Reading never writes to the database.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from textual import on

from ..base import AppBase, guarded
from ..jobs import ReadId
from ..messages import RunSeriesLoaded, SeriesRefreshed
from ..panes.runs import RunsPane
from ..replay_data import ReplaySeries, run_signature, series_from_store

POLL_S = 2.0


class RunsActions(AppBase):
    """Browsing stored runs, here or in another database; refreshed while written."""

    def start_polling(self) -> None:
        self.set_interval(POLL_S, self._poll, name="poll-store")

    def _poll(self) -> None:
        if self.session.store is not None and not self._store_opening:
            self.refresh_replay_runs()

    # ----------------------------------------------------------- open / overlay
    @on(RunsPane.Show)
    @guarded("Opening the run")
    def _show_run(self, msg: RunsPane.Show) -> None:
        store = self.session.store
        if store is None:
            return
        overlay = msg.verb == "overlay"

        def work() -> RunSeriesLoaded:
            return RunSeriesLoaded(
                series_from_store(store, store.get_run(msg.run_id)), overlay, "runs"
            )

        self.read(ReadId.RUN_SERIES, "Reading the run", work)

    def shown_series(self) -> list[ReplaySeries]:
        """Every stored run drawn in a pane now (the live run is grown by its events)."""
        live = self.replay_pane.live
        out = [s for s in self.replay_pane.overlays if live is None or s.run_id != live.run_id]
        return out + list(self.runs_pane.series)

    def refresh_changed_series(self, runs: Sequence[Any]) -> None:
        """Read again the shown runs whose stored state changed since they were read."""
        store = self.session.store
        if store is None:
            return
        now = {r.id: r for r in runs}
        stale = {
            s.run_id
            for s in self.shown_series()
            if s.run_id in now and s.signature != run_signature(now[s.run_id])
        }
        if not stale:
            return

        def work() -> SeriesRefreshed:
            return SeriesRefreshed([series_from_store(store, store.get_run(r)) for r in stale])

        self.read(ReadId.SERIES_REFRESH, "Reading the changed runs", work)

    @guarded("Showing the runs")
    def on_series_refreshed(self, msg: SeriesRefreshed) -> None:
        by_id = {s.run_id: s for s in msg.series}
        pane = self.replay_pane
        pane.overlays = [by_id.get(s.run_id, s) for s in pane.overlays]
        pane.redraw()
        self.runs_pane.replace_series(msg.series)

    # ----------------------------------------------------------- another database
    def action_open_database(self) -> None:
        """Ask for a database file and browse it (the loaded model stays)."""
        if self.refuse_busy():
            return
        from ..screens.open_db import OpenDatabaseDialog

        current = self.session.store.path if self.session.store is not None else None

        def answer(path: Path | None) -> None:
            if path is not None:
                self.switch_database(path)

        self.push_screen(OpenDatabaseDialog(current), answer)

    def switch_database(self, path: Path) -> None:
        """Close this database (ending the session's run) and open ``path``."""
        if self.refuse_busy():
            return
        self.close_session()
        self.session.store = None
        self._listed = ()
        self.db_path = path
        self._given_store = None
        self.replay_pane.overlays = []
        self.replay_pane.redraw()
        self.runs_pane.series = []
        self.runs_pane.redraw()
        self.show_tab("runs")
        self.open_store()
