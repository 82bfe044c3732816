"""The one seam between a replay and its store: what ``evals/`` reads and writes.

A replay needs a place to create and find its run, store each step whole, its
checkpoints and end-of-run re-scoring, flag an edit, and read back what it
stored (to resume, to re-score, to sum up). :class:`ReplaySink` names exactly
those calls; ``workbench.store.Store`` is one (checked by mypy in
``workbench/core/replay.py`` and by a test), and ``evals`` never imports it.

The rows it hands back are described by the read-only protocols below, with
only the fields ``evals`` reads.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from contextlib import AbstractContextManager
from typing import Any, Literal, Protocol

import torch

#: the run statuses a replay writes
RunStatus = Literal["running", "finished", "cancelled", "failed", "interrupted"]


class RunRow(Protocol):
    """A stored run, as a replay reads it."""

    @property
    def id(self) -> str: ...
    @property
    def model(self) -> str: ...
    @property
    def status(self) -> str: ...
    @property
    def base_fingerprint(self) -> str | None: ...
    @property
    def hparams(self) -> dict[str, Any]: ...


class EditRow(Protocol):
    """A stored edit (one request of a step), as a replay reads it."""

    @property
    def seq(self) -> int: ...
    @property
    def case_id(self) -> int | None: ...
    @property
    def applied(self) -> bool: ...
    @property
    def update_norm(self) -> float | None: ...
    @property
    def fingerprint(self) -> str | None: ...
    @property
    def record(self) -> dict[str, Any]: ...
    @property
    def metrics(self) -> dict[str, Any]: ...
    @property
    def step_index(self) -> int: ...  # the first seq of its step


class LayerRow(Protocol):
    """One edited layer's stored factors (ΔW = V @ U) and the keys a method's state needs."""

    @property
    def layer(self) -> int: ...
    @property
    def weight_name(self) -> str: ...
    @property
    def U(self) -> torch.Tensor: ...  # noqa: N802 - the seam's names
    @property
    def V(self) -> torch.Tensor: ...  # noqa: N802
    @property
    def keys(self) -> torch.Tensor | None: ...


class StepRow(Protocol):
    """A stored step: its requests' rows and its layers' factors."""

    @property
    def step(self) -> int: ...
    @property
    def method(self) -> str: ...
    @property
    def edits(self) -> Sequence[EditRow]: ...
    @property
    def layers(self) -> Sequence[LayerRow]: ...


class CheckpointRow(Protocol):
    """A stored checkpoint row (a GLUE task, fluency, perplexity or retention)."""

    @property
    def step(self) -> int: ...
    @property
    def task(self) -> str: ...
    @property
    def value(self) -> float | None: ...
    @property
    def n(self) -> int | None: ...
    @property
    def extra(self) -> dict[str, Any]: ...


class RescoreRow(Protocol):
    """An edit re-scored on the final model."""

    @property
    def metrics(self) -> dict[str, Any]: ...


class ReplayReader(Protocol):
    """The reads: a run, its edits, steps, checkpoints and re-scoring."""

    def get_run(self, run_id: str) -> RunRow: ...

    def edits(self, run_id: str, *, applied_only: bool = False) -> Sequence[EditRow]: ...

    def last_edit(self, run_id: str) -> EditRow | None: ...

    def iter_steps(self, run_id: str) -> Iterator[StepRow]: ...

    def checkpoints(self, run_id: str) -> Sequence[CheckpointRow]: ...

    def rescores(self, run_id: str) -> Sequence[RescoreRow]: ...


class ReplaySink(ReplayReader, Protocol):
    """Everything a replay does with its store: the reads above and these writes."""

    def create_run(
        self,
        *,
        model: str,
        kind: Literal["replay"],
        mode: str | None,
        preset: str | None,
        hparams: Any,
        data_source: str | None,
        n_edits_planned: int | None,
        glue_every: int | None,
        glue_tasks: Sequence[str] | None,
        glue_limit: int | None,
        guard: bool,
        base_fingerprint: str | None,
    ) -> RunRow: ...

    def update_run(self, run_id: str, *, hparams: Mapping[str, Any]) -> object: ...

    def set_status(
        self,
        run_id: str,
        status: RunStatus,
        error: str | None = None,
        *,
        n_edits_planned: int = ...,
        hparams: Mapping[str, Any] = ...,
    ) -> None: ...

    def acquire_writer(self, run_id: str) -> AbstractContextManager[Any]: ...

    def add_step(
        self, run_id: str, step: int, edits: Sequence[Mapping[str, Any]], layers: Sequence[Any]
    ) -> None: ...

    def flag_edit(self, run_id: str, seq: int, reason: str) -> object: ...

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
    ) -> object: ...

    def add_rescore(self, run_id: str, seq: int, metrics: Mapping[str, Any]) -> None: ...


__all__ = [
    "CheckpointRow",
    "EditRow",
    "LayerRow",
    "ReplayReader",
    "ReplaySink",
    "RescoreRow",
    "RunRow",
    "RunStatus",
    "StepRow",
]
