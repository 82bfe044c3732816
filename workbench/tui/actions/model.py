"""Opening the history database, loading a model and preparing its covariance."""

from __future__ import annotations

import time

from textual.widgets import TabbedContent

from ..base import AppBase, guarded
from ..jobs import JobContext, JobEnd, JobId, ReadId
from ..messages import CovarianceReady, ModelLoaded, Notice, StoreOpened


class ModelActions(AppBase):
    """The store at start, then the Model tab: load (F2) and prepare the covariance."""

    # ----------------------------------------------------------- store
    def open_store(self) -> None:
        """Open the database (or take the given one), in a worker. An existing file is
        opened to read until the first write (browsing writes nothing to it, not even a
        migration; saving an edit or a replay migrates it, saying so); a run whose
        writer is gone reads as interrupted without being stored so."""
        given = self._given_store
        db_path = self.db_path

        def work() -> StoreOpened:
            from workbench.core.stores import database_path, open_store
            from workbench.store import Access, StoreError

            try:
                if given is not None:
                    return StoreOpened(given, [])
                exists = database_path(db_path).exists()
                access: Access = "read-until-write" if exists else "write"
                store = open_store(db_path, access=access)

                def on_migrate(note: str) -> None:
                    self.post_message(
                        Notice(note[:1].upper() + note[1:], "warning", "Database migrated")
                    )

                store.on_migrate = on_migrate
                return StoreOpened(store, [])
            except StoreError as exc:
                return StoreOpened(None, [], exc, "Opening the database")

        self._store_opening = True
        self.read(ReadId.STORE, "Opening the database", work)

    @guarded("Opening the database")
    def on_store_opened(self, msg: StoreOpened) -> None:
        self._store_opening = False
        if msg.store is None:
            self.session.store_error = str(msg.error)
        else:
            self.session.store = msg.store
            self._own_store = msg.store is not self._given_store
        if msg.error is not None:
            self.report_error(msg.error, msg.doing)
        self.refresh_history()
        self.refresh_replay_runs()

    def close_session(self) -> None:
        """End the session run and close the store we opened (not while a job runs)."""
        if self.busy:
            return
        self.session.finish()
        if self._own_store:
            from workbench.core.stores import close_store

            close_store(self.session.store)
            self.session.store = None

    # ----------------------------------------------------------- model
    def action_load_model(self) -> None:
        if self.refuse_busy():
            return
        pane = self.model_pane
        name, device, dtype, device_map = pane.values()
        if not name:
            pane.set_error("is empty: a preset name, a hub id or a local folder")
            self.show_tab("model")
            return
        pane.set_error(None)
        if self.session.n_applied:
            from ..screens.dialogs import ConfirmDialog

            def answer(yes: bool | None) -> None:
                if yes:
                    self._load(name, device, dtype, device_map)

            self.push_screen(
                ConfirmDialog(
                    "Load another model?",
                    f"{self.session.n_applied} edit(s) are applied to the loaded model. "
                    "Loading replaces it; the edits stay in the history and can be re-applied.",
                    yes="Load",
                    no="Keep",
                ),
                answer,
            )
            return
        self._load(name, device, dtype, device_map)

    def _load(self, name: str, device: str, dtype: str | None, device_map: str | None) -> None:
        def work(ctx: JobContext) -> None:
            ctx.progress("loading", 0, None, name)
            info = self.session.load(name, device, dtype, device_map, ctx.engine_callback())
            ctx.post(ModelLoaded(info))
            t0 = time.monotonic()
            corpus = info.covariance
            desc = self.session.prepare(
                progress=ctx.engine_callback(lambda phase: f"{phase}: {corpus}")
            )
            ctx.post(CovarianceReady(info.layer, desc, time.monotonic() - t0))

        if self.start_job(JobId.LOAD, f"Loading {name}", work, on_end=self._after_load):
            where = f"device map {device_map}" if device_map else device
            self.model_pane.set_loading(True, f"Loading {name} ({where})…")
            self.update_bar(f"loading {name}…")

    def _after_load(self, end: JobEnd) -> None:
        self.update_bar()  # the "loading …" state goes, whether the load worked or not
        if not self.session.loaded:
            self.model_pane.show_unloaded()
            return
        self.model_pane.show_info(self.session.info())
        if end is JobEnd.CANCELLED:
            self.notify(
                "The covariance will be computed at the first edit.",
                title="Covariance not ready",
                severity="warning",
            )

    @guarded("Showing the model")
    def on_model_loaded(self, msg: ModelLoaded) -> None:
        info = msg.info
        self.model_pane.show_info(info)
        self.edit_pane.set_model(info.n_layers, info.layer, info.default_mode)
        self.edit_pane.set_methods(self.session.method_layers(self.methods.family()))
        self.update_bar()
        self.weights_pane.show([], None)
        self.refresh_history()
        self.refresh_replay_runs()
        self.notify(
            f"{info.name} on {info.device} ({info.n_layers} layers, edit layer {info.layer}) "
            f"in {info.seconds:.1f} s.",
            title="Model loaded",
            timeout=4,
        )
        if self._first_load and self.query_one(TabbedContent).active == "tab-model":
            self.show_tab("edit")
            self.edit_pane.focus_prompt()  # a newcomer types the edit at once
        self._first_load = False

    @guarded("Showing the model")
    def on_covariance_ready(self, msg: CovarianceReady) -> None:
        if self.session.loaded:
            self.model_pane.show_info(self.session.info())
        if msg.seconds > 2:
            self.notify(
                f"Layer {msg.layer}: {msg.description} "
                f"({msg.seconds:.0f} s; cached for next time).",
                title="Covariance ready",
                timeout=5,
            )

    def action_prepare_covariance(self) -> None:
        if self.refuse_busy() or not self.need_model():
            return
        layer_text = self.edit_pane.raw_values().get("layer", "").strip()
        layer = int(layer_text) if layer_text.isdigit() else None

        def work(ctx: JobContext) -> None:
            t0 = time.monotonic()
            desc = self.session.prepare(layer, progress=ctx.engine_callback())
            lm, _ = self.session.require()
            chosen = lm.hparams.layer if layer is None else layer
            ctx.post(CovarianceReady(chosen, desc, time.monotonic() - t0))

        self.start_job(JobId.PREPARE, "Preparing covariance", work)
