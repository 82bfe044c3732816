"""What a run records besides its edits: GLUE and fluency checkpoints, generations
before and after an edit, and the end-of-run re-scoring."""

from __future__ import annotations

import sqlite3
from collections.abc import Mapping
from typing import Any

from .codec import dumps, now, opt_float, opt_int
from .connection import StoreBase
from .errors import DuplicateCheckpointError
from .records import FLUENCY_TASK, Checkpoint, Generation, Rescore


class ResultTables(StoreBase):
    """The ``checkpoints``, ``generations`` and ``rescore`` tables."""

    def add_checkpoint(
        self,
        run_id: str,
        step: int,
        task: str,
        *,
        accuracy: float | None = None,
        f1: float | None = None,
        mcc: float | None = None,
        invalid: int | None = None,
        n: int | None = None,
        value: float | None = None,
        extra: Mapping[str, Any] | None = None,
        replace: bool = False,
    ) -> Checkpoint:
        """One GLUE task's figures after ``step`` edits (step 0 = baseline), or a
        fluency probe (``task="fluency"``, entropy in ``value``; see add_fluency)."""
        row = {
            "run_id": run_id,
            "step": int(step),
            "task": str(task),
            "accuracy": opt_float(accuracy),
            "f1": opt_float(f1),
            "mcc": opt_float(mcc),
            "invalid": opt_int(invalid),
            "n": opt_int(n),
            "value": opt_float(value),
            "extra": dumps(dict(extra or {})),
            "created_at": now(),
        }
        self._require_run(run_id)
        self._check_writable(run_id)
        with self._write() as conn:
            if replace:
                conn.execute(
                    "DELETE FROM checkpoints WHERE run_id = ? AND step = ? AND task = ?",
                    (run_id, row["step"], row["task"]),
                )
            try:
                self._insert(conn, "checkpoints", row)
            except sqlite3.IntegrityError as exc:
                raise DuplicateCheckpointError(run_id, int(step), str(task)) from exc
            self._update(conn, "runs", {"id": run_id}, {"updated_at": row["created_at"]})
        return Checkpoint.from_row(row)

    def add_fluency(
        self,
        run_id: str,
        step: int,
        entropy: float,
        *,
        extra: Mapping[str, Any] | None = None,
        replace: bool = False,
    ) -> Checkpoint:
        """A fluency probe (generation entropy) after ``step`` edits."""
        return self.add_checkpoint(
            run_id, step, FLUENCY_TASK, value=entropy, extra=extra, replace=replace
        )

    def checkpoints(self, run_id: str, task: str | None = None) -> list[Checkpoint]:
        """The run's checkpoints ordered by step, then task."""
        self._require_run(run_id)
        sql = (
            "SELECT run_id, step, task, accuracy, f1, mcc, invalid, n, value, extra, "
            "created_at FROM checkpoints WHERE run_id = ?"
        )
        params: list[Any] = [run_id]
        if task is not None:
            sql += " AND task = ?"
            params.append(task)
        with self._op() as db:
            rows = db.query(sql + " ORDER BY step, task", params)
            return [Checkpoint.from_row(r) for r in rows]

    def add_generation(
        self, run_id: str, edit_seq: int, prompt: str, before: str | None, after: str | None
    ) -> None:
        """A prompt's continuation before and after edit ``edit_seq``."""
        self._require_run(run_id)
        self._check_writable(run_id)
        row = {
            "run_id": run_id,
            "edit_seq": int(edit_seq),
            "prompt": prompt,
            "before": before,
            "after": after,
            "created_at": now(),
        }
        with self._write() as conn:
            self._insert(conn, "generations", row)

    def generations(self, run_id: str, edit_seq: int | None = None) -> list[Generation]:
        self._require_run(run_id)
        sql = "SELECT * FROM generations WHERE run_id = ?"
        params: list[Any] = [run_id]
        if edit_seq is not None:
            sql += " AND edit_seq = ?"
            params.append(int(edit_seq))
        with self._op() as db:
            return [Generation(**r) for r in db.query(sql + " ORDER BY edit_seq, id", params)]

    def add_rescore(self, run_id: str, seq: int, metrics: Mapping[str, Any]) -> None:
        """End-of-run re-scoring of edit ``seq``; a second call for the same edit
        replaces the first."""
        self._require_run(run_id)
        self._check_writable(run_id)
        with self._write() as conn:
            conn.execute(
                "INSERT INTO rescore(run_id, seq, metrics, created_at) VALUES (?, ?, ?, ?) "
                "ON CONFLICT(run_id, seq) DO UPDATE SET metrics = excluded.metrics, "
                "created_at = excluded.created_at",
                (run_id, int(seq), dumps(dict(metrics)), now()),
            )

    def rescores(self, run_id: str) -> list[Rescore]:
        self._require_run(run_id)
        with self._op() as db:
            rows = db.query(
                "SELECT run_id, seq, metrics, created_at FROM rescore WHERE run_id = ? "
                "ORDER BY seq",
                [run_id],
            )
            return [Rescore.from_row(r) for r in rows]
