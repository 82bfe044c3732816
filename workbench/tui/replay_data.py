"""Replay configuration from the form, and a run's chart data from the store."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from rome import MODES

from .messages import ReplaySeries

if TYPE_CHECKING:
    from workbench.store import Run, Store

GLUE_TASKS = ("sst2", "mrpc", "cola", "rte")


def config_errors(values: dict[str, Any]) -> dict[str, str]:
    """Per-field problems of the replay form (empty: valid)."""
    errors: dict[str, str] = {}
    data = str(values.get("dataset", "")).strip()
    if not data:
        errors["dataset"] = "is empty: 'sample' (bundled) or a CounterFact JSON file"
    elif data not in ("sample", "hub") and not Path(data).expanduser().is_file():
        errors["dataset"] = f"no file at {data}"
    for key, low, what in (
        ("n_edits", 1, "edits"),
        ("glue_every", 1, "GLUE interval"),
        ("glue_limit", 1, "GLUE limit"),
    ):
        text = str(values.get(key, "")).strip()
        try:
            n = int(text)
        except ValueError:
            errors[key] = f"{what} must be a whole number"
            continue
        if n < low:
            errors[key] = f"{what} must be at least {low}"
    if values.get("mode") not in MODES:
        errors["mode"] = f"must be one of {', '.join(MODES)}"
    if not values.get("tasks"):
        errors["tasks"] = "choose at least one GLUE task"
    return errors


def make_config(values: dict[str, Any]) -> Any:
    from evals.replay import ReplayConfig

    data = str(values["dataset"]).strip()
    if data not in ("sample", "hub"):
        data = str(Path(data).expanduser())
    return ReplayConfig(
        dataset=data,
        n_edits=int(values["n_edits"]),
        mode=str(values["mode"]),
        glue_every=int(values["glue_every"]),
        glue_tasks=tuple(values["tasks"]),
        glue_limit=int(values["glue_limit"]),
    )


def series_from_store(store: Store, run: Run) -> ReplaySeries:
    """A stored run's norms, flags, GLUE accuracies and fluency, for the charts."""
    edits = store.edits(run.id)
    norms = [(e.seq + 1, float(e.update_norm)) for e in edits if e.update_norm is not None]
    flags = [(e.seq + 1, e.flag_reason or "flagged") for e in edits if e.flagged]
    glue: dict[str, list[tuple[int, float]]] = {}
    fluency: list[tuple[int, float]] = []
    for c in store.checkpoints(run.id):
        if c.task == "fluency":
            if c.value is not None:
                fluency.append((c.step, float(c.value)))
        elif c.accuracy is not None:
            glue.setdefault(c.task, []).append((c.step, float(c.accuracy)))
    return ReplaySeries(
        run_id=run.id,
        label=run_label(run),
        norms=norms,
        flags=flags,
        glue=glue,
        fluency=fluency,
        status=run.status,
        total=run.n_edits_planned,
    )


def run_label(run: Run) -> str:
    return f"{run.id[:6]} {run.mode or ''}".strip()


def resumable(runs: Sequence[Run]) -> list[Run]:
    return [
        r
        for r in runs
        if r.status in ("interrupted", "cancelled", "failed")
        and (r.n_edits_planned is None or r.n_edits < r.n_edits_planned)
    ]
