"""What the store hands back (frozen dataclasses), and the vocabularies of its fields."""

from __future__ import annotations

import copy
import dataclasses
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, TypeVar

from .codec import loads
from .location import APP_NAME, DB_ENV_VAR

DEFAULT_BUSY_TIMEOUT_S = 10.0

RUN_KINDS = ("replay", "session")
RUN_STATUSES = ("running", "finished", "cancelled", "failed", "interrupted")
#: statuses of a run that stopped before its last edit and may be resumed
RESUMABLE_STATUSES = ("interrupted", "cancelled", "failed")
FLUENCY_TASK = "fluency"

_R = TypeVar("_R")

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
        """Short label for legends and lists: ``"<id> <mode>"``, plus the stabilisers
        the run's preset switched on (``"+ norm anchor"``, ``"+ MPES"``)."""
        from evals.spec import RunSpec  # the one reader of the stored settings

        label = f"{self.id} {self.mode}" if self.mode else self.id
        hp = RunSpec.of(self.hparams if isinstance(self.hparams, dict) else None).hparams
        if hp.get("v_norm_anchor"):
            label += " + norm anchor"
        if hp.get("v_stop") == "most_probable":
            label += " + MPES"
        return label

    @classmethod
    def from_row(cls, r: Mapping[str, Any]) -> Run:
        """A run from a ``runs`` row joined with its edit counts."""
        json: dict[str, Any] = {"hparams": {}, "glue_tasks": []}
        return from_row(cls, r, json=json, flags=("guard",), counts=("n_edits", "n_flagged"))


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
    step: int | None = None  # the step (edit or batch) it belongs to; None: its own seq
    method: str | None = None  # None: rome (rows written before methods were stored)

    @property
    def step_index(self) -> int:
        return self.seq if self.step is None else self.step

    @property
    def method_name(self) -> str:
        return self.method or "rome"

    @classmethod
    def from_row(cls, r: Mapping[str, Any]) -> Edit:
        """An edit from an ``edits`` row selected with ``has_factors``."""
        json: dict[str, Any] = dict.fromkeys(("request", "record", "metrics", "timings"), {})
        return from_row(cls, r, json=json, flags=("flagged", "refused", "applied", "has_factors"))


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
        return from_row(cls, r, json={"extra": {}})


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
        return from_row(cls, r, json={"metrics": {}})


def default_db_path() -> Path:
    """``$ROME_WORKBENCH_DB`` if set, else ``<user data dir>/rome-workbench/workbench.db``."""
    env = os.environ.get(DB_ENV_VAR)
    if env:
        return Path(env).expanduser()
    import platformdirs

    return Path(platformdirs.user_data_dir(APP_NAME)) / "workbench.db"


def from_row(
    cls: type[_R],
    r: Mapping[str, Any],
    *,
    json: Mapping[str, Any] | None = None,
    flags: tuple[str, ...] = (),
    counts: tuple[str, ...] = (),
) -> _R:
    """A record dataclass from a row: ``json`` columns decoded (NULL -> a copy of
    the default given), ``flags`` as bools, ``counts`` as ints (missing -> 0)."""
    json = json or {}
    values: dict[str, Any] = {}
    for f in dataclasses.fields(cls):  # type: ignore[arg-type]
        name = f.name
        if name in json:
            values[name] = loads(r[name], copy.copy(json[name]))
        elif name in flags:
            values[name] = bool(r[name])
        elif name in counts:
            values[name] = int(r.get(name) or 0)
        else:
            values[name] = r[name]
    return cls(**values)
