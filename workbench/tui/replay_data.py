"""A replay run's chart data, from the store (in a worker thread) or grown by live events.

The replay's settings, their one validation and the resumable rule are the
core's (``workbench.core.replay``, ``workbench.core.stores``).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from evals.figures import stored_figures
from evals.protocols import RETENTION_TASK
from evals.replay import PERPLEXITY_TASK
from workbench.core.report import edit_facts
from workbench.core.run_stats import RunEvidence, RunStats, run_evidence, run_records, run_stats
from workbench.core.summary import ProtocolScores, protocol_scores, zsre_rows
from workbench.store import FLUENCY_TASK

if TYPE_CHECKING:
    from evals.replay import CheckpointDone, EditDone
    from workbench.store import Checkpoint, Run, Store


Points = list[tuple[int, float]]


@dataclass
class ReplaySeries:
    """One replay run's data for the charts (from the store, then grown by live events)."""

    run_id: str
    label: str
    norms: Points = field(default_factory=list)  # (edit number, ‖ΔW‖)
    drift: Points = field(default_factory=list)  # (edit number, ‖W_n − W_0‖)
    flags: list[tuple[int, str]] = field(default_factory=list)  # (edit number, reason)
    glue: dict[str, Points] = field(default_factory=dict)  # task -> (step, accuracy)
    fluency: Points = field(default_factory=list)  # (step, generation entropy)
    perplexity: Points = field(default_factory=list)  # (step, perplexity)
    ratio: Points = field(default_factory=list)  # (edit number, ‖W_n‖ / ‖W_0‖)
    retention: Points = field(default_factory=list)  # (step, fraction of the first M holding)
    retention_size: int | None = None  # M
    #: the flagged edits' records: (edit number, [(label, value)]) (see core.report.edit_facts)
    flagged: list[tuple[int, list[tuple[str, str]]]] = field(default_factory=list)
    status: str = ""
    total: int | None = None
    signature: tuple[Any, ...] = ()  # the stored run's state when read (a change: read again)
    protocols: list[ProtocolScores] = field(default_factory=list)  # ES/PS/NS/S under each
    stats: RunStats | None = None  # rates with intervals, "needed an edit" (stored runs)
    evidence: RunEvidence | None = None  # what paired tests between runs read
    #: a zsRE run's scoring protocols, named (workbench.core.summary.zsre_rows); empty else
    zsre: list[tuple[str, str]] = field(default_factory=list)

    @property
    def short(self) -> str:
        """The label without its stabilisers (``"7b8ef94e original"``), for chart legends."""
        return self.label.split(" + ")[0]

    def add_edit(self, ev: EditDone) -> None:
        n = ev.seq + 1
        self.norms.append((n, float(ev.update_norm)))
        self.drift.append((n, float(ev.w_delta_norm)))
        self.ratio.append((n, float(ev.w_norm_ratio)))
        if ev.flagged:
            reason = ev.flag_reason or "flagged"
            self.flags.append((n, reason))
            self.flagged.append((n, live_facts(ev)))

    def add_checkpoint(self, ev: CheckpointDone) -> None:
        for task, row in ev.glue.items():
            acc = row.get("accuracy")
            if acc is not None:
                self.glue[task] = _put(self.glue.get(task, []), ev.step, float(acc))
        if ev.fluency is not None:
            self.fluency = _put(self.fluency, ev.step, float(ev.fluency))
        if ev.perplexity is not None:
            self.perplexity = _put(self.perplexity, ev.step, float(ev.perplexity))
        held = ev.retention
        if held and held.get("value") is not None:
            self.retention = _put(self.retention, ev.step, float(held["value"]))
            self.retention_size = held.get("size")


def live_facts(ev: EditDone) -> list[tuple[str, str]]:
    """What a live flagged edit shows before it is read back from the store."""
    pre = ev.metrics.get("pre") if isinstance(ev.metrics.get("pre"), dict) else {}

    def scores(m: Mapping[str, Any]) -> str:
        return " · ".join(f"{k.upper()} {fmt(metric(m, k))}" for k in ("es", "ps", "ns"))

    rows = [
        ("edit", f"{ev.seq} (case {ev.case_id})"),
        ("request", f"{ev.subject} → {ev.target_new}"),
        ("cos(k*, k(s))", fmt(ev.cos_kstar_ks)),
        ("denominator", fmt(ev.denominator)),
        ("‖ΔW‖", f"{fmt(ev.update_norm)} ({fmt(ev.update_norm_ratio)}×‖W‖)"),
        ("flag", ev.flag_reason or "flagged"),
    ]
    if pre:
        rows.append(("pre (just before)", scores(pre)))
    rows.append(("post (immediate)", scores(ev.metrics)))
    return rows


def fmt(x: float | None) -> str:
    return "-" if x is None else f"{x:.3g}"


def _put(points: Points, step: int, value: float) -> Points:
    """``points`` with the value at ``step`` set (a resumed checkpoint replaces its step)."""
    return [p for p in points if p[0] != step] + [(step, value)]


def metric(metrics: Mapping[str, Any] | None, key: str) -> float | None:
    value = (metrics or {}).get(key)
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    return float(value) if math.isfinite(value) else None


def checkpoint_perplexity(c: Checkpoint) -> float | None:
    """A stored perplexity checkpoint: ``extra["perplexity"]``, else exp(mean token NLL)."""
    ppl = metric(c.extra, "perplexity")
    if ppl is None and c.value is not None and math.isfinite(c.value) and c.value < 700:
        ppl = math.exp(c.value)
    return ppl


def series_from_store(store: Store, run: Run) -> ReplaySeries:
    """A stored run's norms, drift, flags, GLUE accuracies and probes, for the charts."""
    s = ReplaySeries(
        run.id,
        run_label(run),
        status=run.status,
        total=run.n_edits_planned,
        signature=run_signature(run),
    )
    for e in store.edits(run.id):
        n = e.seq + 1
        if e.update_norm is not None:
            s.norms.append((n, float(e.update_norm)))
        drift = metric(e.metrics, "w_delta_norm")
        if drift is not None:
            s.drift.append((n, drift))
        ratio = metric(e.metrics, "w_norm_ratio")
        if ratio is not None:
            s.ratio.append((n, ratio))
        if e.flagged:
            s.flags.append((n, e.flag_reason or "flagged"))
            s.flagged.append((n, edit_facts(e)))
    for c in store.checkpoints(run.id):
        if c.task == RETENTION_TASK:
            if c.value is not None:
                s.retention.append((c.step, float(c.value)))
                s.retention_size = int((c.extra or {}).get("size") or c.n or 0) or None
        elif c.task == FLUENCY_TASK:
            if c.value is not None:
                s.fluency.append((c.step, float(c.value)))
        elif c.task == PERPLEXITY_TASK:
            ppl = checkpoint_perplexity(c)
            if ppl is not None:
                s.perplexity.append((c.step, ppl))
        elif c.accuracy is not None:
            s.glue.setdefault(c.task, []).append((c.step, float(c.accuracy)))
    records = run_records(store, run.id)
    s.stats = run_stats(store, run.id, records)
    s.protocols = protocol_scores(store, run.id, stats=s.stats)
    s.evidence = run_evidence(store, run.id, records)
    s.zsre = zsre_rows(stored_figures(store, run.id))
    return s


def run_label(run: Run) -> str:
    """The run's label (``"7b8ef94e original + MPES"``), as the plot's legend has it."""
    return run.label


def run_signature(run: Run) -> tuple[Any, ...]:
    """What changes when another process writes the run: read its series again then."""
    return (run.status, run.n_edits, run.n_flagged, run.updated_at)
