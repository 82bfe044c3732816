"""A replay run's summary as data: a title and ``(label, value)`` rows, already
formatted, for the CLI to draw as a table and the app to show as it likes."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from evals.replay import PERPLEXITY_TASK
from evals.replay import run_summary as stored_figures
from workbench.store import FLUENCY_TASK, Checkpoint, Store

#: the CounterFact figures shown pre -> post and after the final re-scoring
SCORE_KEYS = ("es", "ps", "ns", "s")


@dataclass(frozen=True)
class RunSummary:
    """What a finished (or stopped) replay comes to."""

    run_id: str
    mode: str | None
    status: str
    rows: list[tuple[str, str]] = field(default_factory=list)

    @property
    def title(self) -> str:
        return f"run {self.run_id} ({self.mode}, {self.status})"


def edit_rows(store: Store, run_id: str) -> list[tuple[str, str]]:
    """How many edits were stored, flagged and refused, and their ‖ΔW‖."""
    edits = store.edits(run_id)
    norms = sorted(e.update_norm for e in edits if e.update_norm is not None)
    rows = [
        ("edits stored", str(len(edits))),
        ("flagged", str(sum(e.flagged for e in edits))),
        ("refused", str(sum(e.refused for e in edits))),
    ]
    if norms:
        rows.append(("median |dW|", f"{norms[len(norms) // 2]:.2f}"))  # the upper median
        rows.append(("max |dW|", f"{max(norms):.2f}"))
    return rows


def figure_rows(summary: Mapping[str, Any]) -> list[tuple[str, str]]:
    """Weight drift, CounterFact pre -> post at edit time, the final re-scoring."""
    rows = []
    if summary.get("w_delta_norm") is not None:
        rows.append(("|W_n - W_0|", f"{summary['w_delta_norm']:.2f}"))
        rows.append(("|W_n| / |W_0|", f"{summary['w_norm_ratio']:.3f}"))
    pre, post = summary.get("pre") or {}, summary.get("post") or {}
    for key in SCORE_KEYS:
        if post.get(key) is not None:
            before = f"{pre[key]:.3f} -> " if pre.get(key) is not None else ""
            rows.append((f"{key.upper()} pre -> post (at edit time)", f"{before}{post[key]:.3f}"))
    final = summary.get("final") or {}
    for key in SCORE_KEYS:
        if final.get(key) is not None:
            rows.append((f"final {key.upper()} (re-scored at the end)", f"{final[key]:.3f}"))
    if summary.get("survived") is not None:
        rows.append(("survived (ES = 1 at the end)", f"{summary['survived']:.0f}"))
    return rows


def checkpoint_value(c: Checkpoint) -> float | None:
    """The figure a checkpoint is read by: perplexity, fluency entropy, or accuracy."""
    if c.task == PERPLEXITY_TASK:
        return (c.extra or {}).get("perplexity")
    return c.value if c.task == FLUENCY_TASK else c.accuracy


def checkpoint_rows(store: Store, run_id: str) -> list[tuple[str, str]]:
    """Each checkpointed task's figure at the first and the last checkpoint."""
    cps = store.checkpoints(run_id)
    steps = sorted({c.step for c in cps})
    rows = []
    for task in sorted({c.task for c in cps}):
        by = {c.step: c for c in cps if c.task == task}
        first, last = by.get(steps[0]), by.get(steps[-1])
        if first and last:
            a, b = checkpoint_value(first), checkpoint_value(last)
            if a is not None and b is not None:
                rows.append((f"{task} start -> end", f"{a:.3f} -> {b:.3f}"))
    return rows


def run_summary(
    store: Store, run_id: str, status: str, summary: Mapping[str, Any] | None = None
) -> RunSummary:
    """The rows of a run's summary: edits, figures (the stored ones, overridden by
    ``summary``, e.g. ``ReplayFinished.summary``), checkpoints."""
    run = store.get_run(run_id)
    figures = {**stored_figures(store, run.id), **(summary or {})}
    rows = edit_rows(store, run.id) + figure_rows(figures) + checkpoint_rows(store, run.id)
    return RunSummary(run.id, run.mode, status, rows)
