"""The events a replay yields (a CLI or a TUI consumes them)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass
class ReplayStarted:
    run_id: str
    total: int
    start_seq: int


@dataclass
class EditDone:
    seq: int
    total: int
    case_id: int
    subject: str
    target_new: str
    update_norm: float
    update_norm_ratio: float
    metrics: dict[str, Any]
    flagged: bool
    flag_reason: str | None
    refused: bool
    seconds: float
    w_delta_norm: float = 0.0  # ‖W_n − W_0‖_F after this edit
    w_norm_ratio: float = 1.0  # ‖W_n‖_F / ‖W_0‖_F after this edit
    cos_kstar_ks: float | None = None
    denominator: float | None = None


@dataclass
class CheckpointDone:
    step: int
    glue: dict[str, dict[str, Any]]
    fluency: float | None
    perplexity: float | None = None
    retention: dict[str, Any] | None = None  # evals.retention.RetentionResult.as_dict()


@dataclass
class ReplayWarning:
    message: str


@dataclass
class ReplayFinished:
    run_id: str
    status: str
    summary: dict[str, Any] = field(default_factory=dict)


ReplayEvent = ReplayStarted | EditDone | CheckpointDone | ReplayWarning | ReplayFinished
