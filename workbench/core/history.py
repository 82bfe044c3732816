"""The History tab's rows, read from the store (in a worker thread; no Textual here)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from .records import HistoryRow

if TYPE_CHECKING:
    from workbench.store import Edit, Run, Store


def history_rows(store: Store, model: str | None, session_run: str | None) -> list[HistoryRow]:
    """Every stored edit of ``model`` (every model when None), newest first."""
    rows = [
        history_row(run, e, run.id == session_run)
        for run in store.list_runs(model=model)
        for e in store.edits(run.id)
    ]
    rows.sort(key=lambda r: (r.created_at, r.seq), reverse=True)
    return rows


def history_row(run: Run, e: Edit, in_session: bool) -> HistoryRow:
    req = e.request or {}
    return HistoryRow(
        run_id=run.id,
        run_kind=run.kind,
        run_status=run.status,
        seq=e.seq,
        created_at=e.created_at,
        prompt=str(req.get("prompt", "")),
        subject=str(req.get("subject", "")),
        target_new=str(req.get("target_new", "")),
        target_true=req.get("target_true"),
        mode=e.mode,
        layer=e.layer,
        norm=e.update_norm,
        ratio=e.update_norm_ratio,
        denominator=e.denominator,
        cos=e.cos_kstar_ks,
        flagged=e.flagged,
        flag_reason=e.flag_reason,
        refused=e.refused,
        applied=e.applied,
        has_factors=e.has_factors,
        in_session=in_session,
        metrics=dict(e.metrics or {}),
        record=dict(e.record or {}),
        method=e.method_name,
    )
