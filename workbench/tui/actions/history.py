"""The History tab: undo (F8), revert to the base weights, re-apply stored edits, save a run."""

from __future__ import annotations

from pathlib import Path

from textual import on

from workbench.core.save import save_run

from ..base import AppBase, guarded
from ..jobs import JobContext, JobId, ReadId
from ..messages import HistoryLoaded, ModelChanged, ModelSaved
from ..panes.history import HistoryPane


class HistoryActions(AppBase):
    """Stored edits: undo, revert, re-apply onto the loaded model, save a run's model."""

    # ----------------------------------------------------------- undo / revert
    def action_undo(self) -> None:
        if self.refuse_busy() or not self.need_model():
            return
        if self.session.n_applied == 0:
            self.notify("No applied edit to undo.", title="Nothing to undo", severity="warning")
            return

        def work(ctx: JobContext) -> None:
            what = self.session.undo()
            ctx.post(ModelChanged(what))

        self.start_job(JobId.UNDO, "Undoing the last edit", work)

    def action_revert_all(self) -> None:
        if self.refuse_busy() or not self.need_model():
            return
        n = self.session.n_applied
        if n == 0:
            self.notify("The model has its base weights already.", title="Nothing to revert")
            return
        from ..screens.dialogs import ConfirmDialog

        def work(ctx: JobContext) -> None:
            k = self.session.revert_all()
            ctx.post(ModelChanged(f"reverted {k} edit(s): base weights restored"))

        def answer(yes: bool | None) -> None:
            if yes:
                self.start_job(JobId.REVERT, "Reverting to the base weights", work)

        self.push_screen(
            ConfirmDialog(
                "Revert to the base weights?",
                f"Undo all {n} applied edit(s)? They stay in the history and can be re-applied.",
                yes="Revert",
                no="Keep",
            ),
            answer,
        )

    # ----------------------------------------------------------- re-apply
    def _reapply_keys(self, msg: HistoryPane.Reapply) -> list[tuple[str, int]] | None:
        """What re-applying means for the row (None after saying why it cannot)."""
        row = msg.row
        if msg.whole_run:
            if row.in_session:
                self.notify(
                    "That is this session's own run: undo / re-apply its edits one by one.",
                    severity="warning",
                )
                return None
            keys = self.history_pane.run_keys(row.run_id)
        elif row.in_session and row.applied:
            self.notify("That edit is on the model already.", severity="warning")
            return None
        elif row.refused:
            self.notify("That edit was refused when it was made.", severity="warning")
            return None
        else:
            keys = [(row.run_id, row.seq)]
        if not keys:
            self.notify("No applied edits in that run.", severity="warning")
            return None
        return keys

    @on(HistoryPane.Reapply)
    def _reapply(self, msg: HistoryPane.Reapply) -> None:
        if self.refuse_busy() or not self.need_model():
            return
        keys = self._reapply_keys(msg)
        if keys is None:
            return

        def work(ctx: JobContext) -> None:
            before = self.session.n_applied
            try:
                self.session.reapply(keys, progress=ctx.engine_callback())
            finally:  # also after a cancel or an error part way: show what is on the model
                n = self.session.n_applied - before
                ctx.post(ModelChanged(f"re-applied {n} of {len(keys)} stored edit(s)"))

        self.start_job(JobId.REAPPLY, f"Re-applying {len(keys)} edit(s)", work)

    @guarded("Showing the model")
    def on_model_changed(self, msg: ModelChanged) -> None:
        self.update_bar()
        self.refresh_weights()
        self.refresh_history()
        self.edit_pane.clear_applied()
        self.notify(msg.what[0].upper() + msg.what[1:] + ".", timeout=4)

    # ----------------------------------------------------------- reading the history
    def action_refresh_history(self) -> None:
        self.refresh_history()

    def refresh_history(self) -> None:
        if self.session.store is None:
            if not self._store_opening:
                why = self.session.store_error or "not open"
                self.history_pane.show([], f"no database: {why}")
            return
        note = "" if self.session.loaded else "(all models; load one to see only its edits)"

        def work() -> HistoryLoaded:
            return HistoryLoaded(self.session.history(), note)

        self.read(ReadId.HISTORY, "Reading the history", work)

    @guarded("Showing the history")
    def on_history_loaded(self, msg: HistoryLoaded) -> None:
        self.history_pane.show(msg.rows, msg.note)

    # ----------------------------------------------------------- save a run's model
    @on(HistoryPane.SaveRun)
    def _save_run(self, msg: HistoryPane.SaveRun) -> None:
        if self.refuse_busy():
            return
        if self.session.store is None:
            self.notify("Saving a run needs the database, which is not open.", severity="error")
            return
        from ..screens.save import SaveDialog

        run_id = msg.row.run_id
        n = len(self.history_pane.run_keys(run_id))
        if n == 0:
            self.notify("That run has no applied edits to save.", severity="warning")
            return

        def answer(path: Path | None) -> None:
            if path is not None:
                self._start_save(run_id, n, path)

        self.push_screen(SaveDialog(run_id, n, Path.cwd() / f"edited-{run_id[:8]}"), answer)

    def _start_save(self, run_id: str, n: int, path: Path) -> None:
        """Rebuild the run on a fresh copy of its base model (the loaded one stays as it is)."""
        store = self.session.store
        assert store is not None  # checked before the dialog
        lm = self.session.lm
        device = str(lm.device) if lm is not None else self.device
        dtype = str(lm.dtype).replace("torch.", "") if lm is not None else self.dtype

        def work(ctx: JobContext) -> None:
            ctx.progress("loading the base model", 0, None, run_id)
            out = save_run(
                store, run_id, path, device=device, dtype=dtype, progress=ctx.engine_callback()
            )
            ctx.post(ModelSaved(out, run_id, n))

        self.start_job(JobId.SAVE, f"Saving run {run_id[:8]}", work)

    def on_model_saved(self, msg: ModelSaved) -> None:
        self.notify(
            f"Run {msg.run_id}: the base model plus {msg.n_edits} edit(s) written to {msg.path}.",
            title="Model saved",
            timeout=8,
        )
