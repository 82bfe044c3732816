"""A replay run's summary as data: a title and ``(label, value)`` rows, already
formatted, for the CLI to draw as a table and the app to show as it likes; and
its CounterFact scores under the three evaluation protocols
(``evals.protocols``), which every face names the same way."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from evals.figures import stored_figures
from evals.protocols import END_OF_STREAM, IMMEDIATE, RETENTION, RETENTION_TASK
from evals.replay import PERPLEXITY_TASK
from evals.retention import RetentionResult, retention_of
from evals.stats import median
from workbench.store import FLUENCY_TASK, Checkpoint, Edit, Store

from .run_stats import Rate, RunStats, count_rate, glue_rate, run_stats

#: the CounterFact figures shown under each protocol
SCORE_KEYS = ("es", "ps", "ns", "s")


@dataclass(frozen=True)
class ProtocolScores:
    """ES / PS / NS / S of a run under one protocol (``None``: not recorded)."""

    protocol: str
    es: float | None = None
    ps: float | None = None
    ns: float | None = None
    s: float | None = None
    n: int = 0  # records scored
    hold: int | None = None  # of them, how many edit prompts still prefer the new object
    note: str = ""  # what was scored, when
    #: 95 % intervals: "es", "ps", "ns", "s" and "hold" where the records allow one
    rates: dict[str, Rate] = field(default_factory=dict)

    @property
    def recorded(self) -> bool:
        return self.n > 0

    def scores(self) -> str:
        """``0.920 / 0.750 / 0.570 / 0.712`` (``-`` where missing)."""
        return " / ".join(fmt(getattr(self, k)) for k in SCORE_KEYS)

    def interval(self, key: str, digits: int = 3) -> str:
        """``[0.852, 0.894]``: the 95 % interval of ``key`` ("" where there is none)."""
        r = self.rates.get(key)
        return r.interval(digits) if r is not None else ""

    def with_interval(self, key: str, digits: int = 3) -> str:
        """``0.874 [0.852, 0.894]`` (the hold: ``874/1000 [0.852, 0.894]``)."""
        if key == "hold":
            head = f"{self.hold}/{self.n}" if self.hold is not None else "-"
        else:
            head = fmt(getattr(self, key), digits)
        ci = self.interval(key, digits)
        return f"{head} {ci}" if ci and head != "-" else head


@dataclass(frozen=True)
class RunSummary:
    """What a finished (or stopped) replay comes to."""

    run_id: str
    mode: str | None
    status: str
    rows: list[tuple[str, str]] = field(default_factory=list)
    protocols: list[ProtocolScores] = field(default_factory=list)

    @property
    def title(self) -> str:
        return f"run {self.run_id} ({self.mode}, {self.status})"


def fmt(x: float | None, digits: int = 3) -> str:
    return "-" if x is None else f"{x:.{digits}f}"


def retention_curve(checkpoints: Sequence[Checkpoint]) -> list[RetentionResult]:
    """The run's retention passes, in step order."""
    return [retention_of(c) for c in checkpoints if c.task == RETENTION_TASK]


def _num(d: Mapping[str, Any], key: str) -> float | None:
    v = d.get(key)
    return float(v) if isinstance(v, (int, float)) and not isinstance(v, bool) else None


def protocol_scores(
    store: Store,
    run_id: str,
    figures: Mapping[str, Any] | None = None,
    stats: RunStats | None = None,
) -> list[ProtocolScores]:
    """The run's ES / PS / NS / S under immediate, end of stream and retention
    (always the three, in that order; one a run did not record has ``n == 0``), each
    with its 95 % intervals (:mod:`workbench.core.run_stats`)."""
    figs = figures if figures is not None else stored_figures(store, run_id)
    st = stats if stats is not None else run_stats(store, run_id)
    return [
        _immediate_scores(figs, st),
        _end_of_stream_scores(figs, st),
        _retention_scores(store, run_id, st),
    ]


def _immediate_scores(figs: Mapping[str, Any], st: RunStats) -> ProtocolScores:
    """Each record scored right after its edit (and, in the note, just before it)."""
    post, pre = figs.get("post") or {}, figs.get("pre") or {}
    n_post = int(post.get("n") or 0)
    before = " / ".join(fmt(_num(pre, k), 2) for k in ("es", "ps", "ns"))
    return ProtocolScores(
        IMMEDIATE,
        _num(post, "es"),
        _num(post, "ps"),
        _num(post, "ns"),
        _num(post, "s"),
        n=n_post,
        note=f"{n_post} records, each right after its edit"
        + (f"; just before it: ES/PS/NS {before}" if pre else ""),
        rates=dict(st.immediate),
    )


def _end_of_stream_scores(figs: Mapping[str, Any], st: RunStats) -> ProtocolScores:
    """Every record re-scored on the final model (empty where the run was not re-scored)."""
    final = figs.get("final") or {}
    n_final = int(final.get("n") or 0)
    survived = figs.get("survived")
    hold = int(survived) if survived is not None else None
    return ProtocolScores(
        END_OF_STREAM,
        _num(final, "es"),
        _num(final, "ps"),
        _num(final, "ns"),
        _num(final, "s"),
        n=n_final,
        hold=hold,
        note=(
            f"{n_final} records on the final model; {hold} of {n_final} hold"
            if n_final
            else "not re-scored (the run did not finish, or ran without --rescore)"
        ),
        rates={**st.final, **({"hold": st.hold} if st.hold is not None else {})},
    )


def _retention_scores(store: Store, run_id: str, st: RunStats) -> ProtocolScores:
    """The first M edits at the last retention pass (empty where none was stored)."""
    curve = retention_curve(store.checkpoints(run_id, task=RETENTION_TASK))
    if not curve:
        return ProtocolScores(RETENTION, note="no retention passes stored with this run")
    last = curve[-1]
    return ProtocolScores(
        RETENTION,
        last.es,
        last.ps,
        last.ns,
        last.s,
        n=last.m,
        hold=last.n_hold,
        note=f"first {last.m} edits after {last.step} edits; {last.n_hold} of {last.m} hold",
        rates={**st.retention_scores, "hold": count_rate(last.n_hold, last.m)},
    )


def protocol_rows(protocols: Sequence[ProtocolScores]) -> list[tuple[str, str]]:
    """One row per protocol: ``ES / PS / NS / S (protocol)`` and the scores with a note;
    then, where there are intervals, the 95 % intervals of the four."""
    rows = []
    for p in protocols:
        rows.append((f"ES / PS / NS / S ({p.protocol})", f"{p.scores()}  {p.note}"))
        if p.rates:
            cis = " / ".join(p.interval(k) or "-" for k in SCORE_KEYS)
            hold = f"; hold {p.interval('hold')}" if "hold" in p.rates else ""
            rows.append((f"  95 % intervals ({p.protocol})", cis + hold))
    return rows


def needed_rows(st: RunStats) -> list[tuple[str, str]]:
    """How many records needed an edit (pre-edit ES < 1) and how many of them hold, beside
    all of them, with 95 % intervals."""
    if st.needed is None:
        return []
    rows = [("needed an edit (pre-edit ES < 1)", f"{st.needed} of {st.n}")]
    if st.needed_immediate is not None:
        rows.append(("  of them, ES = 1 right after the edit", st.needed_immediate.text()))
    if st.needed_hold is not None and st.hold is not None:
        rows.append(
            ("  of them, holding at the end", f"{st.needed_hold.text()} (all: {st.hold.text()})")
        )
    return rows


def zsre_rows(figures: Mapping[str, Any], stats: RunStats | None = None) -> list[tuple[str, str]]:
    """A zsRE run's scoring protocols, named: what ES / PS / NS above are, and the
    teacher-forced accuracies beside them (immediate, and at the end of the stream),
    with their 95 % intervals where ``stats`` is given."""
    protocol = figures.get("protocol")
    if not protocol:
        return []
    from evals.zsre_scoring import PROTOCOL_LABELS, TEACHER_FORCED

    rows = [("zsRE ES / PS / NS above", PROTOCOL_LABELS.get(protocol, str(protocol)))]
    label = f"ES / PS / NS {PROTOCOL_LABELS[TEACHER_FORCED]}"
    for name, key in ((IMMEDIATE, "post"), (END_OF_STREAM, "final")):
        got = figures.get(key) or {}
        if got.get("es_tf") is not None:
            scores = " / ".join(fmt(_num(got, k)) for k in ("es_tf", "ps_tf", "ns_tf"))
            tf = stats.teacher_forced.get(name, {}) if stats is not None else {}
            if tf:
                scores += "  95 %: " + " / ".join(
                    tf[k].interval() if k in tf else "-" for k in ("es_tf", "ps_tf", "ns_tf")
                )
            rows.append((f"{label} ({name})", scores))
    return rows


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
        rows.append(("median |dW|", f"{median(norms):.2f}"))
        rows.append(("max |dW|", f"{max(norms):.2f}"))
    per_edit = seconds_per_edit(edits)
    if per_edit is not None:
        edit_s, scoring_s = per_edit
        rows.append(("wall s per edit: edit + scoring", f"{edit_s:.1f} + {scoring_s:.1f}"))
    return rows


SCORING_TIMINGS = ("pre_metrics", "post_metrics")


def seconds_per_edit(edits: Sequence[Edit]) -> tuple[float, float] | None:
    """Wall seconds per stored edit: the edit itself (z / v*, keys, the solve) and the
    scoring of its request before and after (``pre_metrics`` / ``post_metrics``).

    A batch's edits share one step's timings, counted once. Wall time on a shared machine:
    compare runs made side by side, not across machines. None when nothing was timed.
    """
    steps: dict[int, dict[str, Any]] = {}
    for e in edits:
        if e.timings:
            steps.setdefault(e.step_index, e.timings)
    timed = sum(1 for e in edits if e.timings)
    if not timed:
        return None
    edit_s = scoring_s = 0.0
    for t in steps.values():
        for k, v in t.items():
            if isinstance(v, (int, float)):
                if k in SCORING_TIMINGS:
                    scoring_s += v
                else:
                    edit_s += v
    return edit_s / timed, scoring_s / timed


@dataclass
class LayerFigures:
    """One edited layer of a run: its update per step and its drift as edits went on."""

    layer: int
    step_norms: list[float]  # ‖ΔW_l‖ of each step (a step is an edit or a batch)
    drift: list[tuple[int, float, float]]  # (edits applied, ‖W_l − W_l0‖, ‖W_l‖ / ‖W_l0‖)


def layer_figures(edits: Sequence[Edit]) -> list[LayerFigures]:
    """Per edited layer, from what each stored edit recorded: the step's per-layer norms
    (``record.layer_norms``; a one-layer step's ‖ΔW‖) and the drift after it
    (``metrics.layers``; a one-layer step's ``w_delta_norm`` / ``w_norm_ratio``)."""
    norms: dict[int, dict[int, float]] = {}
    drift: dict[int, list[tuple[int, float, float]]] = {}
    for e in edits:
        m = e.metrics or {}
        per = m.get("layers") or {}
        if not per and m.get("w_delta_norm") is not None:
            per = {str(e.layer): m}
        for key, d in per.items():
            drift.setdefault(int(key), []).append(
                (e.seq + 1, float(d["w_delta_norm"]), float(d["w_norm_ratio"]))
            )
        if not e.applied:
            continue
        ln = (e.record or {}).get("layer_norms") or (
            {str(e.layer): e.update_norm} if e.update_norm is not None else {}
        )
        for key, n in ln.items():
            norms.setdefault(int(key), {})[e.step_index] = float(n)
    return [
        LayerFigures(layer, list(norms.get(layer, {}).values()), drift.get(layer, []))
        for layer in sorted(set(norms) | set(drift))
    ]


def layer_rows(edits: Sequence[Edit], every: int | None) -> list[list[str]]:
    """Table rows per edited layer: steps, median and max ‖ΔW_l‖ per step, the drift at
    the end, and ‖W_l‖ / ‖W_l0‖ after every ``every`` edits."""
    rows = []
    for f in layer_figures(edits):
        ns = sorted(f.step_norms)
        last = f.drift[-1] if f.drift else None
        marks = [d for d in f.drift if every and d[0] % every == 0]
        rows.append(
            [
                str(f.layer),
                str(len(ns)),
                f"{median(ns):.1f}" if ns else "-",
                f"{ns[-1]:.1f}" if ns else "-",
                f"{last[1]:.1f}" if last else "-",
                f"{last[2]:.3f}" if last else "-",
                ", ".join(f"{r:.2f} @{n}" for n, _, r in marks) or "-",
            ]
        )
    return rows


def figure_rows(summary: Mapping[str, Any]) -> list[tuple[str, str]]:
    """Weight drift of the edited matrix after the last edit."""
    rows = []
    if summary.get("w_delta_norm") is not None:
        rows.append(("|W_n - W_0|", f"{summary['w_delta_norm']:.2f}"))
        rows.append(("|W_n| / |W_0|", f"{summary['w_norm_ratio']:.3f}"))
    return rows


def checkpoint_value(c: Checkpoint) -> float | None:
    """The figure a checkpoint is read by: perplexity, fluency entropy, the fraction of
    the first M edits holding (retention), or accuracy."""
    if c.task == PERPLEXITY_TASK:
        return (c.extra or {}).get("perplexity")
    return c.value if c.task in (FLUENCY_TASK, RETENTION_TASK) else c.accuracy


def checkpoint_rate(c: Checkpoint) -> Rate | None:
    """A checkpoint's rate with its exact 95 % interval: GLUE accuracy over its examples,
    or the retention pass's fraction holding (None for perplexity and fluency)."""
    if c.task == RETENTION_TASK:
        r = retention_of(c)
        return count_rate(r.n_hold, r.m) if r.m else None
    if c.task in (PERPLEXITY_TASK, FLUENCY_TASK):
        return None
    return glue_rate(c)


def checkpoint_rows(store: Store, run_id: str) -> list[tuple[str, str]]:
    """Each checkpointed task's figure at the first and the last checkpoint (a rate with
    its 95 % interval)."""
    cps = store.checkpoints(run_id)
    rows = []
    for task in sorted({c.task for c in cps}):
        by = {c.step: c for c in cps if c.task == task}
        first, last = by[min(by)], by[max(by)]
        a, b = checkpoint_value(first), checkpoint_value(last)
        if a is not None and b is not None:
            what = "retention (first M holding)" if task == RETENTION_TASK else task
            ra, rb = checkpoint_rate(first), checkpoint_rate(last)
            sa = f"{a:.3f}" + (f" {ra.interval()}" if ra else "")
            sb = f"{b:.3f}" + (f" {rb.interval()}" if rb else "")
            rows.append((f"{what} start -> end", f"{sa} -> {sb}"))
    return rows


def run_summary(
    store: Store, run_id: str, status: str, summary: Mapping[str, Any] | None = None
) -> RunSummary:
    """The rows of a run's summary: edits, the scores under each protocol (from the
    stored figures, overridden by ``summary``, e.g. ``ReplayFinished.summary``),
    weight drift, checkpoints."""
    run = store.get_run(run_id)
    figures = {**stored_figures(store, run.id), **(summary or {})}
    stats = run_stats(store, run.id)
    protocols = protocol_scores(store, run.id, figures, stats)
    rows = (
        edit_rows(store, run.id)
        + protocol_rows(protocols)
        + needed_rows(stats)
        + zsre_rows(figures, stats)
        + figure_rows(figures)
        + checkpoint_rows(store, run.id)
    )
    return RunSummary(run.id, run.mode, status, rows, protocols)
