"""What the store hands back (frozen dataclasses), and the vocabularies of its fields."""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from .codec import loads

APP_NAME = "rome-workbench"
DB_ENV_VAR = "ROME_WORKBENCH_DB"
DEFAULT_BUSY_TIMEOUT_S = 10.0

RUN_KINDS = ("replay", "session")
RUN_STATUSES = ("running", "finished", "cancelled", "failed", "interrupted")
#: statuses of a run that stopped before its last edit and may be resumed
RESUMABLE_STATUSES = ("interrupted", "cancelled", "failed")
FLUENCY_TASK = "fluency"

RunKind = Literal["replay", "session"]
RunStatus = Literal["running", "finished", "cancelled", "failed", "interrupted"]


@dataclass(frozen=True)
class Run:
    id: str
    kind: str
    model: str
    preset: str | None
    mode: str | None
    hparams: dict[str, Any]
    data_source: str | None
    n_edits_planned: int | None
    glue_every: int | None
    glue_tasks: list[str]
    glue_limit: int | None
    guard: bool
    status: str
    created_at: str
    updated_at: str
    base_fingerprint: str | None
    notes: str | None
    error: str | None
    n_edits: int = 0
    n_flagged: int = 0

    @property
    def label(self) -> str:
        """Short label for legends and lists: ``"<id> <mode>"``."""
        return f"{self.id} {self.mode}" if self.mode else self.id

    @classmethod
    def from_row(cls, r: Mapping[str, Any]) -> Run:
        """A run from a ``runs`` row joined with its edit counts."""
        return cls(
            id=r["id"],
            kind=r["kind"],
            model=r["model"],
            preset=r["preset"],
            mode=r["mode"],
            hparams=loads(r["hparams"], {}),
            data_source=r["data_source"],
            n_edits_planned=r["n_edits_planned"],
            glue_every=r["glue_every"],
            glue_tasks=loads(r["glue_tasks"], []),
            glue_limit=r["glue_limit"],
            guard=bool(r["guard"]),
            status=r["status"],
            created_at=r["created_at"],
            updated_at=r["updated_at"],
            base_fingerprint=r["base_fingerprint"],
            notes=r["notes"],
            error=r["error"],
            n_edits=int(r.get("n_edits") or 0),
            n_flagged=int(r.get("n_flagged") or 0),
        )


@dataclass(frozen=True)
class Edit:
    id: int
    run_id: str
    seq: int
    case_id: int | None
    request: dict[str, Any]
    mode: str
    layer: int
    weight_name: str
    update_norm: float | None
    update_norm_ratio: float | None
    denominator: float | None
    cos_kstar_ks: float | None
    record: dict[str, Any]
    metrics: dict[str, Any]
    timings: dict[str, Any]
    flagged: bool
    flag_reason: str | None
    refused: bool
    applied: bool
    fingerprint: str | None
    created_at: str
    has_factors: bool

    @classmethod
    def from_row(cls, r: Mapping[str, Any]) -> Edit:
        """An edit from an ``edits`` row selected with ``has_factors``."""
        return cls(
            id=r["id"],
            run_id=r["run_id"],
            seq=r["seq"],
            case_id=r["case_id"],
            request=loads(r["request"], {}),
            mode=r["mode"],
            layer=r["layer"],
            weight_name=r["weight_name"],
            update_norm=r["update_norm"],
            update_norm_ratio=r["update_norm_ratio"],
            denominator=r["denominator"],
            cos_kstar_ks=r["cos_kstar_ks"],
            record=loads(r["record"], {}),
            metrics=loads(r["metrics"], {}),
            timings=loads(r["timings"], {}),
            flagged=bool(r["flagged"]),
            flag_reason=r["flag_reason"],
            refused=bool(r["refused"]),
            applied=bool(r["applied"]),
            fingerprint=r["fingerprint"],
            created_at=r["created_at"],
            has_factors=bool(r["has_factors"]),
        )


@dataclass(frozen=True)
class Checkpoint:
    run_id: str
    step: int
    task: str
    accuracy: float | None
    f1: float | None
    mcc: float | None
    invalid: int | None
    n: int | None
    value: float | None
    extra: dict[str, Any]
    created_at: str

    @classmethod
    def from_row(cls, r: Mapping[str, Any]) -> Checkpoint:
        """A checkpoint from a ``checkpoints`` row (``extra`` still JSON text)."""
        return cls(
            run_id=r["run_id"],
            step=r["step"],
            task=r["task"],
            accuracy=r["accuracy"],
            f1=r["f1"],
            mcc=r["mcc"],
            invalid=r["invalid"],
            n=r["n"],
            value=r["value"],
            extra=loads(r["extra"], {}),
            created_at=r["created_at"],
        )


@dataclass(frozen=True)
class Generation:
    id: int
    run_id: str
    edit_seq: int
    prompt: str
    before: str | None
    after: str | None
    created_at: str


@dataclass(frozen=True)
class Rescore:
    run_id: str
    seq: int
    metrics: dict[str, Any]
    created_at: str

    @classmethod
    def from_row(cls, r: Mapping[str, Any]) -> Rescore:
        """A re-scoring from a ``rescore`` row."""
        return cls(r["run_id"], r["seq"], loads(r["metrics"], {}), r["created_at"])


@dataclass(frozen=True)
class WriterInfo:
    """Who holds (or last held) a run's writer lock, as written in the lock file."""

    pid: int | None
    host: str | None
    since: str | None
    alive: bool | None = None


def default_db_path() -> Path:
    """``$ROME_WORKBENCH_DB`` if set, else ``<user data dir>/rome-workbench/workbench.db``."""
    env = os.environ.get(DB_ENV_VAR)
    if env:
        return Path(env).expanduser()
    import platformdirs

    return Path(platformdirs.user_data_dir(APP_NAME)) / "workbench.db"
