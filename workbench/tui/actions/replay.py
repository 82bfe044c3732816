"""The Replay tab: start, follow, cancel and resume a replay; open and overlay stored runs."""

from __future__ import annotations

from typing import Any

from textual import on

from evals.replay import CheckpointDone, EditDone, ReplayFinished, ReplayStarted
from workbench.core.replay import edit_hparams, make_config
from workbench.core.stores import can_resume, resumable, writer_gone

from ..base import AppBase, guarded
from ..jobs import JobContext, JobEnd, JobId, ReadId
from ..messages import (
    ModelChanged,
    ReplayOpened,
    ReplayProgress,
    ReplayRunsLoaded,
    RunSeriesLoaded,
)
from ..panes.replay import ReplayPane
from ..panes.replay_settings import ReplaySettings
from ..replay_data import run_signature, series_from_store


class ReplayActions(AppBase):
    """Replays run as one job; their events come back as typed messages."""

    # ----------------------------------------------------------- stored runs
    def refresh_replay_runs(self) -> None:
        """Re-read the stored runs (every replay run of the database, whatever its model),
        and which running ones lost their writer, in a worker."""
        store = self.session.store
        if store is None:
            return

        def work() -> ReplayRunsLoaded:
            runs = store.list_runs(kind="replay")
            gone = [r.id for r in runs if r.status == "running" and writer_gone(store, r)]
            return ReplayRunsLoaded(runs, gone)

        self.read(ReadId.REPLAY_RUNS, "Reading the replay runs", work)

    @guarded("Showing the replay runs")
    def on_replay_runs_loaded(self, msg: ReplayRunsLoaded) -> None:
        live = self.replay_pane.live
        gone = [g for g in msg.gone if live is None or live.run_id != g]
        listed = (tuple(run_signature(r) + (r.id,) for r in msg.runs), tuple(gone))
        if listed == self._listed:  # nothing changed since the last reading: keep the tables
            return
        self._listed = listed
        self.replay_pane.show_runs(msg.runs, gone)
        self.runs_pane.show_runs(msg.runs, gone)
        self.runs_pane.show_database(str(self.session.store.path) if self.session.store else "")
        self.refresh_changed_series(msg.runs)
        offered = self._offered_resume
        for run in resumable(msg.runs) + [r for r in msg.runs if r.id in gone]:
            if run.status in ("interrupted", "running") and run.id not in offered:
                offered.add(run.id)
                why = "its writer is gone" if run.id in gone else "interrupted"
                self.notify(
                    f"Replay {run.id} ({run.mode}) stopped at {run.n_edits}/"
                    f"{run.n_edits_planned} edits ({why}). Replay tab → select it → Resume.",
                    title="Interrupted replay",
                    severity="warning",
                    timeout=10,
                )

    @on(ReplayPane.RunAction)
    @guarded("Opening the run")
    def _run_action(self, msg: ReplayPane.RunAction) -> None:
        store = self.session.store
        if store is None:
            return
        if msg.action in ("open", "overlay"):
            overlay = msg.action == "overlay"

            def work() -> RunSeriesLoaded:
                return RunSeriesLoaded(series_from_store(store, store.get_run(msg.run_id)), overlay)

            self.read(ReadId.RUN_SERIES, "Reading the run", work)
            return
        run = store.get_run(msg.run_id)
        if not can_resume(store, run):
            holder = store.writer_info(run.id) if run.status == "running" else None
            why = f"being written by process {holder.pid}" if holder is not None else run.status
            self.notify(f"Run {run.id} is {why}: nothing to resume.", severity="warning")
            return
        if self.refuse_busy() or not self.need_model():
            return
        lm = self.session.lm
        if lm is not None and run.model != lm.name:
            self.notify(
                f"Run {run.id} was made with {run.model}; load that model to resume it.",
                severity="warning",
            )
            return
        self._start_replay(None, msg.run_id)

    @guarded("Showing the run")
    def on_run_series_loaded(self, msg: RunSeriesLoaded) -> None:
        if msg.where == "runs":
            self.runs_pane.show_series(msg.series, msg.overlay)
        else:
            self.replay_pane.open_series(msg.series, msg.overlay)

    # ----------------------------------------------------------- a replay
    def action_start_replay(self) -> None:
        if self.refuse_busy():
            return
        vals = self.replay_pane.check()
        if vals is None:
            self.show_tab("replay")
            self.notify("Fix the replay settings.", severity="warning", timeout=4)
            return
        if not self.need_model():
            return
        if self.session.store is None:
            self.notify("A replay needs the database, which is not open.", severity="error")
            return
        v_stop, anchor = self.replay_pane.query_one(ReplaySettings).stabilisers()
        self._start_replay(make_config(vals), None, (v_stop, anchor))

    def _start_replay(
        self,
        cfg: Any,
        resume: str | None,
        stabilisers: tuple[str | None, bool | None] = (None, None),
    ) -> None:
        n = self.session.n_applied
        label = (
            f"Resuming replay {resume}" if resume else f"Replay ({cfg.mode}, {cfg.n_edits} edits)"
        )

        def go() -> None:
            work = self._replay_work(cfg, resume, stabilisers)
            if self.start_job(JobId.REPLAY, label, work, self._ended):
                self.show_tab("replay")
                self.replay_pane.show_starting()

        if not n:
            go()
            return
        from ..screens.dialogs import ConfirmDialog

        self.push_screen(
            ConfirmDialog(
                "Revert the session's edits?",
                f"A replay starts from the base weights; {n} edit(s) are applied now. "
                "Revert them (they stay in the history) and start?",
                yes="Revert and start",
                no="Cancel",
            ),
            lambda yes: go() if yes else None,
        )

    def _replay_work(
        self, cfg: Any, resume: str | None, stabilisers: tuple[str | None, bool | None]
    ) -> Any:
        """The replay job: revert the session's edits, run it, post its events as messages."""

        def work(ctx: JobContext) -> None:
            lm, _ = self.session.require()
            hparams = None if resume else edit_hparams(lm, *stabilisers, cfg.method)
            if self.session.n_applied:
                k = self.session.revert_all()
                ctx.post(ModelChanged(f"reverted {k} edit(s) for the replay"))

            def on_event(ev: Any) -> None:
                if isinstance(ev, ReplayStarted):
                    ctx.post(self._opened(ev))
                else:
                    ctx.post(ReplayProgress(ev))

            self.session.run_replay(cfg, ctx.cancel_event, on_event, resume=resume, hparams=hparams)

        return work

    def _opened(self, ev: ReplayStarted) -> ReplayOpened:
        """In the worker: the run's mode, and what a resumed run already has, from the store."""
        store = self.session.store
        mode, existing = "", None
        if store is not None:
            run = store.get_run(ev.run_id)
            mode = run.mode or ""
            if ev.start_seq:
                existing = series_from_store(store, run)
        return ReplayOpened(ev.run_id, ev.total, ev.start_seq, mode, existing)

    def _ended(self, end: JobEnd) -> None:
        self.replay_pane.stopped()
        self.refresh_replay_runs()
        self.refresh_history()
        self.update_bar()

    @guarded("Showing the replay")
    def on_replay_opened(self, msg: ReplayOpened) -> None:
        self.replay_pane.start_live(msg.run_id, msg.total, msg.start_seq, msg.mode, msg.existing)
        self.job_status.progress("edits", msg.start_seq, msg.total, "baseline checkpoint")
        self.refresh_replay_runs()

    @guarded("Showing the replay")
    def on_replay_progress(self, msg: ReplayProgress) -> None:
        ev = msg.event
        pane = self.replay_pane
        pane.handle(ev)
        if isinstance(ev, EditDone):
            detail = f"{ev.subject} → {ev.target_new}"
            self.job_status.progress("edits", ev.seq + 1, ev.total, detail)
        elif isinstance(ev, CheckpointDone):
            self.job_status.progress("checkpoint", ev.step, pane.total or None, "GLUE done")
        elif isinstance(ev, ReplayFinished):
            self.notify(
                f"Run {ev.run_id}: {ev.status}. Its edits are in the history; "
                "the model's weights were restored.",
                title="Replay " + ev.status,
                timeout=6,
            )
            self.refresh_replay_runs()
