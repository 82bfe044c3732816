"""The :class:`Store`: runs and their edits (with the rank-one factors), on top of
:class:`~workbench.store.connection.StoreBase` (connection, lock) and
:class:`~workbench.store.results.ResultTables` (checkpoints, generations, rescore).

Over 500 lines on purpose: one class, the public face of the store, whose
methods each stay short; splitting it further would scatter one table's
queries over several files.
"""

from __future__ import annotations

import dataclasses
import logging
import sqlite3
import uuid
from collections.abc import Iterator, Mapping, Sequence
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, Unpack

from .codec import (
    check_run_id,
    dumps,
    now,
    opt_int,
    unpack_factors,
)
from .connection import Access
from .errors import (
    AmbiguousRunError,
    DuplicateEditError,
    InvalidFieldError,
    MissingFactorsError,
    UnknownEditError,
    UnknownRunError,
)
from .export import atomic_write, edits_csv, run_json
from .records import (
    DEFAULT_BUSY_TIMEOUT_S,
    RUN_KINDS,
    RUN_STATUSES,
    Edit,
    Run,
    RunKind,
    RunStatus,
    default_db_path,
)
from .results import ResultTables
from .schema import SCHEMA_VERSION
from .steps import EditFields, StepTables, edit_row

if TYPE_CHECKING:
    import torch

log = logging.getLogger(__name__)

_RUN_SELECT = """
    SELECT runs.*,
        (SELECT COUNT(*) FROM edits WHERE edits.run_id = runs.id) AS n_edits,
        (SELECT COUNT(*) FROM edits WHERE edits.run_id = runs.id AND flagged) AS n_flagged
    FROM runs
"""

_EDIT_COLUMNS = (
    "id, run_id, seq, case_id, request, mode, layer, weight_name, update_norm, "
    "update_norm_ratio, denominator, cos_kstar_ks, record, metrics, timings, flagged, "
    "flag_reason, refused, applied, fingerprint, created_at, factors IS NOT NULL AS has_factors, "
    "step, method"
)

_GONE = "writer process ended without finishing the run"

_UPDATABLE_RUN_FIELDS = frozenset(
    {
        "notes",
        "base_fingerprint",
        "n_edits_planned",
        "preset",
        "data_source",
        "hparams",
        "glue_every",
        "glue_tasks",
        "glue_limit",
        "guard",
        "mode",
    }
)


class Store(ResultTables, StepTables):
    """The workbench database. Open with :meth:`open`; use as a context manager.

    Thread-safe: one connection guarded by a re-entrant lock, so Textual
    thread workers may share a Store.
    """

    @classmethod
    def open(
        cls,
        path: str | Path | None = None,
        *,
        busy_timeout: float = DEFAULT_BUSY_TIMEOUT_S,
        create: bool = True,
        access: Access = "write",
    ) -> Store:
        """Open the database at ``path`` (default: :func:`default_db_path`): to write
        (creating and migrating as needed), to ``"read"`` only (nothing is written, an
        older schema is read as it is), or to ``"read-until-write"`` (as to read, then
        as to write from the first write on)."""
        return cls(
            default_db_path() if path is None else path,
            busy_timeout=busy_timeout,
            create=create,
            access=access,
        )

    def __enter__(self) -> Store:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- runs ----------------------------------------------------------------------

    def create_run(
        self,
        *,
        model: str,
        kind: RunKind = "replay",
        mode: str | None = None,
        preset: str | None = None,
        hparams: Any = None,
        data_source: str | None = None,
        n_edits_planned: int | None = None,
        glue_every: int | None = None,
        glue_tasks: Sequence[str] | None = None,
        glue_limit: int | None = None,
        guard: bool = False,
        base_fingerprint: str | None = None,
        notes: str | None = None,
        run_id: str | None = None,
    ) -> Run:
        """Insert a new run with status ``running``. ``hparams`` may be a dict or a
        dataclass (``EditHparams``). ``run_id`` defaults to 8 hex chars of a uuid4."""
        if kind not in RUN_KINDS:
            raise InvalidFieldError(f"run kind must be one of {RUN_KINDS}, not {kind!r}")
        stamp = now()
        row = {
            "kind": kind,
            "model": str(model),
            "preset": preset,
            "mode": mode,
            "hparams": dumps(hparams or {}),
            "data_source": data_source,
            "n_edits_planned": opt_int(n_edits_planned),
            "glue_every": opt_int(glue_every),
            "glue_tasks": dumps(list(glue_tasks or [])),
            "glue_limit": opt_int(glue_limit),
            "guard": bool(guard),
            "status": "running",
            "created_at": stamp,
            "updated_at": stamp,
            "base_fingerprint": base_fingerprint,
            "notes": notes,
            "error": None,
        }
        with self._write() as conn:
            if run_id is not None:
                check_run_id(run_id)
                if self._run_exists(run_id):
                    raise InvalidFieldError(f"a run with id {run_id!r} already exists")
            else:
                run_id = uuid.uuid4().hex[:8]
                while self._run_exists(run_id):
                    run_id = uuid.uuid4().hex[:8]
            self._insert(conn, "runs", {"id": run_id, **row})
        log.info("created %s run %s (model %s, mode %s)", kind, run_id, model, mode)
        return self.get_run(run_id)

    def get_run(self, run_id: str) -> Run:
        """The run with this id, or the only run whose id starts with it (4+ chars)."""
        with self._op() as db:
            rows = list(db.query(_RUN_SELECT + " WHERE runs.id = ?", [run_id]))
            if not rows and isinstance(run_id, str) and len(run_id) >= 4:
                escaped = run_id.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")
                rows = list(
                    db.query(
                        _RUN_SELECT + " WHERE runs.id LIKE ? ESCAPE '\\' ORDER BY runs.id",
                        [escaped + "%"],
                    )
                )
                if len(rows) > 1:
                    raise AmbiguousRunError(run_id, [r["id"] for r in rows])
            if not rows:
                short = isinstance(run_id, str) and 0 < len(run_id) < 4
                raise UnknownRunError(str(run_id), str(self.path), min_prefix=4 if short else 0)
            return self._shown(Run.from_row(rows[0]))

    def _shown(self, run: Run) -> Run:
        """A reader's view of a run: ``running`` with nobody holding its writer lock
        (killed, crashed) reads as ``interrupted``, as a writer's recovery stores it."""
        if not self.infer_interrupted or run.status != "running":
            return run
        if self.writer_info(run.id) is not None:
            return run
        return dataclasses.replace(run, status="interrupted", error=run.error or _GONE)

    def list_runs(self, model: str | None = None, *, kind: str | None = None) -> list[Run]:
        """Runs, newest first, optionally only one model's / one kind's."""
        clauses, params = [], []
        if model is not None:
            clauses.append("runs.model = ?")
            params.append(model)
        if kind is not None:
            clauses.append("runs.kind = ?")
            params.append(kind)
        where = (" WHERE " + " AND ".join(clauses)) if clauses else ""
        with self._op() as db:
            rows = db.query(
                _RUN_SELECT + where + " ORDER BY runs.created_at DESC, runs.rowid DESC",
                params,
            )
            return [self._shown(Run.from_row(r)) for r in rows]

    def set_status(
        self, run_id: str, status: RunStatus, error: str | None = None, **fields: Any
    ) -> None:
        """Set a run's status (and error text, for ``failed``/``interrupted``); the
        ``fields`` :meth:`update_run` takes change in the same transaction."""
        if status not in RUN_STATUSES:
            raise InvalidFieldError(f"run status must be one of {RUN_STATUSES}, not {status!r}")
        values = self._run_values(fields) if fields else {}
        self._require_run(run_id)
        self._check_writable(run_id)
        with self._write() as conn:
            values.update(status=status, error=error, updated_at=now())
            self._update(conn, "runs", {"id": run_id}, values)
        log.info("run %s is now %s%s", run_id, status, f": {error}" if error else "")

    def update_run(self, run_id: str, **fields: Any) -> Run:
        """Change descriptive fields of a run (notes, base_fingerprint, ...)."""
        values = self._run_values(fields)
        values["updated_at"] = now()
        self._require_run(run_id)
        self._check_writable(run_id)
        with self._write() as conn:
            self._update(conn, "runs", {"id": run_id}, values)
        return self.get_run(run_id)

    @staticmethod
    def _run_values(fields: dict[str, Any]) -> dict[str, Any]:
        """Updatable run fields as stored (JSON encoded where they are)."""
        bad = set(fields) - _UPDATABLE_RUN_FIELDS
        if bad:
            raise InvalidFieldError(
                f"cannot update run field(s) {sorted(bad)}; "
                f"updatable: {sorted(_UPDATABLE_RUN_FIELDS)} (status: use set_status)"
            )
        values = dict(fields)
        for key in ("hparams", "glue_tasks"):
            if key in values:
                values[key] = dumps(values[key])
        if "guard" in values:
            values["guard"] = bool(values["guard"])
        return values

    def delete_run(self, run_id: str) -> None:
        """Delete a run and everything recorded under it (one transaction)."""
        self._require_run(run_id)
        self._check_writable(run_id)
        with self._write() as conn:
            for table in ("rescore", "generations", "checkpoints", "edits"):
                conn.execute(f"DELETE FROM {table} WHERE run_id = ?", (run_id,))
            conn.execute("DELETE FROM runs WHERE id = ?", (run_id,))
        log.info("deleted run %s", run_id)

    def recover_stale_runs(self, min_age_s: float = 30.0) -> list[str]:
        """Mark ``running`` runs whose writer is gone (killed, crashed) as
        ``interrupted``; returns their ids. Runs updated in the last
        ``min_age_s`` seconds are left alone (their writer may be starting)."""
        cutoff = datetime.now(timezone.utc).timestamp() - min_age_s
        stale = []
        for run in self.list_runs():
            if run.status != "running":
                continue
            try:
                if datetime.fromisoformat(run.updated_at).timestamp() > cutoff:
                    continue
            except ValueError:
                pass  # an unparsable timestamp counts as old
            if self.writer_info(run.id) is None:  # nobody holds it: writable
                stale.append(run.id)
        for run_id in stale:
            values = {
                "status": "interrupted",
                "error": _GONE,
                "updated_at": now(),
            }
            with self._write() as conn:
                self._update(conn, "runs", {"id": run_id}, values)
            log.info("run %s had no live writer: marked interrupted", run_id)
        return stale

    # -- edits ---------------------------------------------------------------------

    def next_seq(self, run_id: str) -> int:
        """One past the largest stored seq of the run (0 for a run without edits)."""
        self._require_run(run_id)
        with self._op():
            row = self._conn.execute(
                "SELECT MAX(seq) FROM edits WHERE run_id = ?", (run_id,)
            ).fetchone()
            return 0 if row[0] is None else int(row[0]) + 1

    def add_edit(self, run_id: str, seq: int, **fields: Unpack[EditFields]) -> Edit:
        """Store one edit and its factors, committed before returning.

        ``fields`` are :class:`~workbench.store.steps.EditFields`: ``request`` is a
        dict or an ``EditRequest``-like object (dataclass or ``to_dict()``);
        ``record`` the engine's result (``EditResult`` or its dict) whose top-level
        ``u``/``v``/``factors`` keys are dropped (the factors go in the safetensors
        blob, bit-exact). A refused edit must have ``applied=False``. Raises
        :class:`DuplicateEditError` if ``(run_id, seq)`` exists,
        :class:`RunLockedError` if another process holds the run's writer lock.
        """
        return self._insert_edit(edit_row(run_id, seq, **fields))

    def _insert_edit(self, row: dict[str, Any]) -> Edit:
        run_id, seq = row["run_id"], row["seq"]
        self._require_run(run_id)
        self._check_writable(run_id)
        with self._write() as conn:
            try:
                self._insert(conn, "edits", row)
            except sqlite3.IntegrityError as exc:
                if "UNIQUE" not in str(exc):
                    raise
                raise DuplicateEditError(run_id, seq, self.next_seq(run_id)) from exc
            self._update(conn, "runs", {"id": run_id}, {"updated_at": row["created_at"]})
        return self.edit(run_id, seq)

    def add_edit_result(
        self,
        run_id: str,
        seq: int,
        result: Any,
        *,
        case_id: int | None = None,
        metrics: Mapping[str, Any] | None = None,
        flagged: bool = False,
        flag_reason: str | None = None,
        refused: bool = False,
        applied: bool = True,
        fingerprint: str | None = None,
        timings: Mapping[str, Any] | None = None,
    ) -> Edit:
        """:meth:`add_edit` from an engine ``EditResult`` (duck-typed): request,
        mode, layer, weight_name, u, v, the update figures, timings and the
        record (``to_dict(factors=False)``) are taken from ``result``."""
        return self.add_edit(
            run_id,
            seq,
            request=result.request,
            mode=result.mode,
            layer=result.layer,
            weight_name=result.weight_name,
            u=result.u,
            v=result.v,
            case_id=case_id,
            update_norm=getattr(result, "update_norm", None),
            update_norm_ratio=getattr(result, "update_norm_ratio", None),
            denominator=getattr(result, "denominator", None),
            cos_kstar_ks=getattr(result, "cos_kstar_ks", None),
            record=result,
            metrics=metrics,
            timings=timings if timings is not None else getattr(result, "timings", None),
            flagged=flagged,
            flag_reason=flag_reason,
            refused=refused,
            applied=applied,
            fingerprint=fingerprint,
        )

    def edits(
        self, run_id: str, *, applied_only: bool = False, since_seq: int | None = None
    ) -> list[Edit]:
        """The run's edits ordered by seq (factors not loaded: see load_factors)."""
        self._require_run(run_id)
        sql = f"SELECT {_EDIT_COLUMNS} FROM edits WHERE run_id = ?"
        params: list[Any] = [run_id]
        if applied_only:
            sql += " AND applied"
        if since_seq is not None:
            sql += " AND seq >= ?"
            params.append(int(since_seq))
        with self._op() as db:
            return [Edit.from_row(r) for r in db.query(sql + " ORDER BY seq", params)]

    def edit(self, run_id: str, seq: int) -> Edit:
        self._require_run(run_id)
        with self._op() as db:
            rows = list(
                db.query(
                    f"SELECT {_EDIT_COLUMNS} FROM edits WHERE run_id = ? AND seq = ?",
                    [run_id, int(seq)],
                )
            )
        if not rows:
            raise UnknownEditError(run_id, int(seq))
        return Edit.from_row(rows[0])

    def last_edit(self, run_id: str) -> Edit | None:
        nxt = self.next_seq(run_id)
        return None if nxt == 0 else self.edit(run_id, nxt - 1)

    def load_factors(
        self, edit: Edit, *, device: str | torch.device | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The edit's ``(u, v)``, bit-identical to what was stored (dtype included)."""
        with self._op():
            row = self._conn.execute(
                "SELECT factors FROM edits WHERE run_id = ? AND seq = ?", (edit.run_id, edit.seq)
            ).fetchone()
        if row is None:
            raise UnknownEditError(edit.run_id, edit.seq)
        if row[0] is None:
            raise MissingFactorsError(edit.run_id, edit.seq)
        return unpack_factors(row[0], device)

    def iter_factors(
        self, run_id: str, *, device: str | torch.device | None = None
    ) -> Iterator[tuple[Edit, torch.Tensor, torch.Tensor]]:
        """``(edit, u, v)`` for the run's applied edits in seq order: what a resume
        re-applies to the base model. Raises MissingFactorsError on a gap."""
        for edit in self.edits(run_id, applied_only=True):
            u, v = self.load_factors(edit, device=device)
            yield edit, u, v

    def set_applied(self, run_id: str, seq: int, applied: bool) -> None:
        """Record that a session edit was undone (False) or redone (True)."""
        self._require_run(run_id)
        self._check_writable(run_id)
        with self._write() as conn:
            key = {"run_id": run_id, "seq": int(seq)}
            if self._update(conn, "edits", key, {"applied": bool(applied)}) == 0:
                raise UnknownEditError(run_id, int(seq))
            self._update(conn, "runs", {"id": run_id}, {"updated_at": now()})

    def mark_undone(self, run_id: str, seq: int) -> None:
        self.set_applied(run_id, seq, False)

    def update_edit(
        self,
        run_id: str,
        seq: int,
        *,
        metrics: Mapping[str, Any] | None = None,
        flagged: bool | None = None,
        flag_reason: str | None = None,
        fingerprint: str | None = None,
    ) -> Edit:
        """Change an edit's after-the-fact fields (metrics, flag, fingerprint)."""
        values: dict[str, Any] = {}
        if metrics is not None:
            values["metrics"] = dumps(dict(metrics))
        if flagged is not None:
            values["flagged"] = bool(flagged)
        if flag_reason is not None:
            values["flag_reason"] = flag_reason
        if fingerprint is not None:
            values["fingerprint"] = fingerprint
        self._require_run(run_id)
        if values:
            self._check_writable(run_id)
            with self._write() as conn:
                if self._update(conn, "edits", {"run_id": run_id, "seq": int(seq)}, values) == 0:
                    raise UnknownEditError(run_id, int(seq))
        return self.edit(run_id, seq)

    def flag_edit(self, run_id: str, seq: int, reason: str) -> Edit:
        return self.update_edit(run_id, seq, flagged=True, flag_reason=reason)

    # -- export ----------------------------------------------------------------------

    def export_run(
        self, run_id: str, fmt: Literal["json", "csv"] = "json", path: str | Path | None = None
    ) -> Path:
        """Write a run to ``path`` (default ``./<run_id>.<fmt>``); returns the path.

        JSON: ``{"schema_version", "run", "edits" (no factors), "checkpoints",
        "generations", "rescore"}``, NaN written as null. CSV: one row per edit
        with the main figures, ``metric.<name>`` columns for its scalar metrics
        and ``rescore.<name>`` for the end-of-run ones.
        """
        if fmt not in ("json", "csv"):
            raise InvalidFieldError(f"export format must be 'json' or 'csv', not {fmt!r}")
        run = self.get_run(run_id)
        out = Path(path) if path is not None else Path.cwd() / f"{run.id}.{fmt}"
        edits = self.edits(run.id)
        rescores = {r.seq: r.metrics for r in self.rescores(run.id)}
        if fmt == "json":
            text = run_json(
                SCHEMA_VERSION,
                run,
                edits,
                self.checkpoints(run.id),
                self.generations(run.id),
                rescores,
            )
        else:
            text = edits_csv(edits, rescores)
        atomic_write(out, text)
        log.info("exported run %s to %s", run.id, out)
        return out
