"""The session's run in the store: made at its first stored step (its settings written
by :class:`~evals.spec.RunSpec`), each applied step stored whole (``Store.add_step``),
undone steps marked, the run closed with the model.

No Textual and no rich here; a store failure is logged and returned, never raised:
the edit stays on the model and the app says it is not in the history.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Sequence
from typing import TYPE_CHECKING, Any

from evals.spec import RunSpec
from rome import EditHparams

from .generation import GenerationPair
from .records import EditOutcome

if TYPE_CHECKING:
    from workbench.store import Edit, Store

log = logging.getLogger(__name__)

#: a step's stored rows at ``seq``: its edit rows (``Store.add_edit``'s fields) and layers
Rows = Callable[[int], tuple[list[dict[str, Any]], Sequence[Any]]]

#: what a re-applied edit takes over from the stored one
COPIED_EDIT_FIELDS = (
    "request",
    "mode",
    "layer",
    "weight_name",
    "case_id",
    "update_norm",
    "update_norm_ratio",
    "denominator",
    "cos_kstar_ks",
    "record",
)


class SessionRun:
    """The store (or why there is none) and the session run's id and writer lease."""

    def __init__(self, store: Store | None, store_error: str | None = None) -> None:
        self.store = store
        self.store_error = store_error
        self.run_id: str | None = None
        self._lease: Any = None

    def _ensure(self, model: str, hp: EditHparams, base_fingerprint: str) -> str:
        assert self.store is not None
        if self.run_id is None:
            run = self.store.create_run(
                model=model,
                kind="session",
                preset=hp.name,
                hparams=RunSpec.new(hp).to_dict(),
                # the weights as loaded: the run starts when its first edit is
                # stored, after that edit was applied
                base_fingerprint=base_fingerprint,
                notes="interactive session (rome-workbench TUI)",
            )
            self._lease = self.store.acquire_writer(run.id)
            self.run_id = run.id
        return self.run_id

    def record(
        self,
        start: tuple[str, EditHparams, str],
        rows: Rows,
        pairs: Sequence[GenerationPair] = (),
        what: str = "",
    ) -> tuple[str | None, int | None, str | None]:
        """Store a step at the run's next seq (the run made from ``start``: model, preset,
        base fingerprint), then its generations; ``(run_id, seq, None)``, or
        ``(None, None, why not)``."""
        if self.store is None:
            return None, None, self.store_error or "no database open"
        from workbench.store import StoreError

        try:
            run_id = self._ensure(*start)
            seq = self.store.next_seq(run_id)
            edits, layers = rows(seq)
            self.store.add_step(run_id, seq, edits, layers)
            for g in pairs:
                self.store.add_generation(run_id, seq, g.prompt, g.before, g.after)
            return run_id, seq, None
        except StoreError as exc:
            log.warning("could not store the %s edit: %s", what, exc)
            return None, None, str(exc)

    def mark_undone(self, refs: Iterable[tuple[str, int] | None]) -> None:
        if self.store is None:
            return
        from workbench.store import StoreError

        for ref in refs:
            if ref is None:
                continue
            try:
                self.store.mark_undone(*ref)
            except StoreError as exc:
                log.warning("could not mark %s:%s undone: %s", *ref, exc)

    def finish(self) -> None:
        """Close the session run (status finished, lock released)."""
        if self.store is None or self.run_id is None:
            return
        from workbench.store import StoreError

        try:
            self.store.set_status(self.run_id, "finished")
        except StoreError as exc:
            log.warning("could not close session run %s: %s", self.run_id, exc)
        if self._lease is not None:
            self._lease.release()
            self._lease = None
        self.run_id = None


def step_rows(outcome: EditOutcome, fingerprint: str) -> Rows:
    """An applied outcome's stored step: one edit row; a rank-one record (ROME's) keeps its
    factors ``u``, ``v`` in the row as before, another method's layers go in the step."""
    upd, res, v = outcome.update, outcome.result, outcome.verdict

    def rows(seq: int) -> tuple[list[dict[str, Any]], Sequence[Any]]:
        last = upd.layers[-1]
        row: dict[str, Any] = dict(
            seq=seq, request=outcome.form.request().to_dict(), mode=upd.mode,
            layer=last.layer, weight_name=last.weight_name, update_norm=outcome.norm,
            update_norm_ratio=outcome.ratio, metrics=outcome.metrics(),
            flagged=v.disabling, flag_reason=v.summary or None, fingerprint=fingerprint,
            method=upd.method,
        )  # fmt: skip
        if res is not None:
            row.update(
                request=res.request, record=res, u=res.u, v=res.v, timings=res.timings,
                denominator=res.denominator, cos_kstar_ks=res.cos_kstar_ks,
            )  # fmt: skip
            return [row], []
        record = dict(upd.records[0]) if upd.records else {}
        record.update(
            method=upd.method,
            preset=outcome.preset,
            method_options={k: x for k, x in upd.options.items() if _jsonable(x)},
            layer_norms={str(k): x for k, x in upd.layer_norms().items()},
            batch_size=1,
        )
        return [{**row, "record": record}], upd.layers

    return rows


def reapplied_rows(edit: Edit, u: Any, v: Any, fingerprint: str) -> Rows:
    """A stored edit re-applied from History, as a step of this session's run."""
    copied = {k: getattr(edit, k) for k in COPIED_EDIT_FIELDS}
    metrics = {"source": "reapplied", "from": f"{edit.run_id}:{edit.seq}"}

    def rows(seq: int) -> tuple[list[dict[str, Any]], Sequence[Any]]:
        row = dict(seq=seq, u=u, v=v, metrics=metrics, fingerprint=fingerprint, **copied)
        return [{**row, "method": edit.method_name}], []

    return rows


def _jsonable(v: Any) -> bool:
    return isinstance(v, (str, int, float, bool, type(None), list, dict))
