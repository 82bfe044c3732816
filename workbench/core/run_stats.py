"""A run's rates with 95 % intervals, and paired tests between runs on the same records.

Per run (:func:`run_stats`): ES / PS / NS under the immediate and end-of-stream
protocols with an interval each (exact binomial for 0 / 1 scores such as ES, a seeded
bootstrap over records otherwise), how many hold at the end of the stream, the same
among the records that *needed an edit* (pre-edit ES < 1: the edit prompt did not
already prefer the new object just before its edit), retention, and GLUE accuracy
(exact binomial over the examples).

Between two runs (:func:`paired_tests`): records are paired by CounterFact case id
(by position where a run stored none), so runs in different orders pair too. Holds
(end of stream, and the last common retention pass) by the exact McNemar test; GLUE
accuracy at the last common checkpoint by a paired bootstrap over the examples where
both runs stored per-example predictions, else an unpaired test (marked so). A
difference is called one only where p < 0.05.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from evals.glue import correct_by_example
from evals.protocols import END_OF_STREAM, IMMEDIATE, RETENTION_TASK
from evals.retention import retention_of
from evals.stats import (
    ALPHA,
    PairedTest,
    Spread,
    bootstrap_ci,
    bootstrap_stat_ci,
    clopper_pearson,
    mcnemar,
    mean_spread,
    paired_bootstrap,
    two_proportions,
)
from workbench.store import Checkpoint, Store

SCORES = ("es", "ps", "ns")
#: zsRE's teacher-forced token accuracies, stored beside ES / PS / NS
TEACHER_FORCED_KEYS = ("es_tf", "ps_tf", "ns_tf")
NON_GLUE_TASKS = ("fluency", "perplexity", RETENTION_TASK)


@dataclass(frozen=True)
class Rate:
    """A rate with its 95 % interval; ``k`` is set where it is a count of n."""

    value: float
    lo: float
    hi: float
    n: int
    k: int | None = None
    method: str = "exact binomial"

    def text(self, digits: int = 3) -> str:
        """``0.874 [0.852, 0.894]``, or ``874/1000 [0.852, 0.894]`` for a count."""
        head = f"{self.k}/{self.n}" if self.k is not None else f"{self.value:.{digits}f}"
        return f"{head} [{self.lo:.{digits}f}, {self.hi:.{digits}f}]"

    def interval(self, digits: int = 3) -> str:
        return f"[{self.lo:.{digits}f}, {self.hi:.{digits}f}]"

    def span(self, digits: int = 2) -> str:
        """``.85–.89``: the interval in the fewest characters (for narrow tables)."""

        def short(x: float) -> str:
            text = f"{x:.{digits}f}"
            return text[1:] if text.startswith("0.") else text

        return f"{short(self.lo)}–{short(self.hi)}"


def count_rate(k: int, n: int) -> Rate:
    """k of n with its exact (Clopper-Pearson) interval."""
    lo, hi = clopper_pearson(k, n)
    return Rate(k / n if n else 0.0, lo, hi, n, k)


def mean_rate(values: Sequence[float], seed: int = 0) -> Rate:
    """The mean of per-record scores: exact binomial where every score is 0 or 1,
    else a seeded percentile bootstrap over the records."""
    vals = [float(v) for v in values]
    if vals and all(v in (0.0, 1.0) for v in vals):
        k = int(sum(vals))
        r = count_rate(k, len(vals))
        return Rate(r.value, r.lo, r.hi, r.n)
    lo, hi = bootstrap_ci(vals, seed=seed)
    return Rate(sum(vals) / len(vals), lo, hi, len(vals), method="bootstrap")


@dataclass
class RunRecords:
    """A run's applied records: key (case id, or ``#seq``) -> scores."""

    run_id: str
    keys: list[Any] = field(default_factory=list)  # in edit order
    seq_key: dict[int, Any] = field(default_factory=dict)
    pre_es: dict[Any, float] = field(default_factory=dict)
    post: dict[Any, Mapping[str, Any]] = field(default_factory=dict)
    final: dict[Any, Mapping[str, Any]] = field(default_factory=dict)

    def needed(self, key: Any) -> bool | None:
        """Did the record need an edit (pre-edit ES < 1)? None where no pre score."""
        es = self.pre_es.get(key)
        return None if es is None else es < 1.0

    def holds(self, key: Any) -> bool:
        return float(self.final[key].get("es") or 0.0) >= 1.0


def run_records(store: Store, run_id: str) -> RunRecords:
    """Every applied edit's scores before, right after and at the end of the stream."""
    rec = RunRecords(run_id)
    for e in store.edits(run_id, applied_only=True):
        key = e.case_id if e.case_id is not None else f"#{e.seq}"
        rec.keys.append(key)
        rec.seq_key[e.seq] = key
        m = e.metrics or {}
        if m:
            rec.post[key] = m
        pre = m.get("pre")
        if isinstance(pre, dict) and isinstance(pre.get("es"), (int, float)):
            rec.pre_es[key] = float(pre["es"])
    for r in store.rescores(run_id):
        if r.seq in rec.seq_key:
            rec.final[rec.seq_key[r.seq]] = r.metrics
    return rec


@dataclass
class RunStats:
    """A run's rates with intervals (None: not recorded)."""

    run_id: str
    n: int = 0  # applied records
    immediate: dict[str, Rate] = field(default_factory=dict)
    final: dict[str, Rate] = field(default_factory=dict)
    hold: Rate | None = None
    needed: int | None = None  # records that needed an edit
    needed_immediate: Rate | None = None  # ES = 1 right after the edit, among them
    needed_hold: Rate | None = None  # holding at the end of the stream, among them
    retention: Rate | None = None  # the last retention pass: how many hold
    retention_scores: dict[str, Rate] = field(default_factory=dict)  # its ES / PS / NS / S
    glue: dict[str, tuple[int, Rate]] = field(default_factory=dict)  # task -> (step, accuracy)
    #: zsRE's teacher-forced accuracies ("es_tf", ...) under "immediate" / "end of stream"
    teacher_forced: dict[str, dict[str, Rate]] = field(default_factory=dict)


def _scores(rows: Sequence[Mapping[str, Any]], key: str) -> list[float]:
    return [float(m[key]) for m in rows if isinstance(m.get(key), (int, float))]


def _harmonic(means: np.ndarray) -> np.ndarray:
    """S of each row of (ES, PS, NS) means: their harmonic mean (0 where one is 0)."""
    with np.errstate(divide="ignore"):
        inv = np.where(means > 0, 1.0 / np.where(means > 0, means, 1.0), np.inf).sum(axis=1)
    return np.where(np.isfinite(inv), means.shape[1] / inv, 0.0)


def _rates(rows: Sequence[Mapping[str, Any]]) -> dict[str, Rate]:
    """ES / PS / NS with their intervals; S (the harmonic mean of the three means) with
    a bootstrap interval over the records that have all three."""
    out = {k: mean_rate(v) for k in SCORES if (v := _scores(rows, k))}
    full = [[float(m[k]) for k in SCORES] for m in rows if all(_is_num(m.get(k)) for k in SCORES)]
    if full:
        value = float(_harmonic(np.asarray(full).mean(axis=0, keepdims=True))[0])
        lo, hi = bootstrap_stat_ci(full, _harmonic)
        out["s"] = Rate(value, lo, hi, len(full), method="bootstrap")
    return out


def _is_num(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)


def glue_rate(c: Checkpoint) -> Rate | None:
    """A GLUE checkpoint's accuracy as k of n with its exact interval."""
    if c.accuracy is None or not c.n:
        return None
    return count_rate(round(c.accuracy * c.n), int(c.n))


def run_stats(store: Store, run_id: str, records: RunRecords | None = None) -> RunStats:
    """The run's rates under every protocol, with intervals."""
    rec = records if records is not None else run_records(store, run_id)
    st = RunStats(run_id, n=len(rec.keys))
    st.immediate = _rates([rec.post[k] for k in rec.keys if k in rec.post])
    final_keys = [k for k in rec.keys if k in rec.final]
    for name, rows in (
        (IMMEDIATE, [rec.post[k] for k in rec.keys if k in rec.post]),
        (END_OF_STREAM, [rec.final[k] for k in final_keys]),
    ):
        tf = {k: mean_rate(v) for k in TEACHER_FORCED_KEYS if (v := _scores(rows, k))}
        if tf:
            st.teacher_forced[name] = tf
    if final_keys:
        st.final = _rates([rec.final[k] for k in final_keys])
        st.hold = count_rate(sum(rec.holds(k) for k in final_keys), len(final_keys))
    needed = [k for k in rec.keys if rec.needed(k)]
    if rec.pre_es:
        st.needed = len(needed)
        post_es = [float(rec.post[k].get("es") or 0.0) >= 1.0 for k in needed if k in rec.post]
        st.needed_immediate = count_rate(sum(post_es), len(post_es))
        fin = [rec.holds(k) for k in needed if k in rec.final]
        if final_keys:
            st.needed_hold = count_rate(sum(fin), len(fin))
    ret = [c for c in store.checkpoints(run_id, task=RETENTION_TASK)]
    if ret:
        last = retention_of(ret[-1])
        st.retention = count_rate(last.n_hold, last.m)
        st.retention_scores = _rates([dict(zip(SCORES, r[1:4], strict=True)) for r in last.records])
        if "es" not in st.retention_scores and last.m and last.es == last.n_hold / last.m:
            # stored as a mean only, but ES is 0 / 1 per record: its mean is the hold rate
            st.retention_scores["es"] = dataclasses.replace(st.retention, k=None)
    for c in store.checkpoints(run_id):
        if c.task not in NON_GLUE_TASKS and (r := glue_rate(c)) is not None:
            st.glue[c.task] = (c.step, r)  # ordered by step: the last one stays
    return st


# --- paired tests ---------------------------------------------------------------------


def p_text(p: float) -> str:
    """A p-value to 3 significant digits (0.0504, not 0.05), below 0.001 to 2."""
    return f"{p:.2g}" if p < 0.001 else f"{p:.3g}"


@dataclass(frozen=True)
class Comparison:
    """One paired test between two runs: what was compared and the test's result."""

    what: str
    a: str  # run ids
    b: str
    test: PairedTest

    @property
    def significant(self) -> bool:
        return self.test.significant(ALPHA)


@dataclass
class RunEvidence:
    """What the paired tests read of a run: its records, which of them held at each
    retention pass, and its GLUE checkpoints (with per-example predictions where stored)."""

    records: RunRecords
    held_at: dict[int, dict[Any, bool]] = field(default_factory=dict)  # step -> key -> holds
    glue: dict[tuple[int, str], Checkpoint] = field(default_factory=dict)  # (step, task)

    @property
    def run_id(self) -> str:
        return self.records.run_id


def run_evidence(store: Store, run_id: str, records: RunRecords | None = None) -> RunEvidence:
    rec = records if records is not None else run_records(store, run_id)
    ev = RunEvidence(rec)
    for c in store.checkpoints(run_id):
        if c.task == RETENTION_TASK:
            r = retention_of(c)
            if r.records:  # the scored seqs, as stored
                first = [int(row[0] or 0) for row in r.records]
            else:  # before they were stored: the first m applied edits
                first = sorted(rec.seq_key)[: r.m]
            lost = set(r.lost)
            ev.held_at[r.step] = {rec.seq_key[q]: q not in lost for q in first if q in rec.seq_key}
        elif c.task not in NON_GLUE_TASKS:
            ev.glue[(c.step, c.task)] = c
    return ev


def _holds_tests(ra: RunRecords, rb: RunRecords) -> list[Comparison]:
    common = [k for k in ra.keys if k in ra.final and k in rb.final]
    out = []
    if common:
        t = mcnemar([ra.holds(k) for k in common], [rb.holds(k) for k in common])
        out.append(Comparison("holds at the end of the stream, all", ra.run_id, rb.run_id, t))
    both = [k for k in common if ra.needed(k) and rb.needed(k)]
    if both:
        t = mcnemar([ra.holds(k) for k in both], [rb.holds(k) for k in both])
        what = "holds at the end, records that needed an edit in both"
        out.append(Comparison(what, ra.run_id, rb.run_id, t))
    return out


def _retention_test(ea: RunEvidence, eb: RunEvidence) -> list[Comparison]:
    steps = sorted(set(ea.held_at) & set(eb.held_at))
    if not steps:
        return []
    step = steps[-1]
    ha, hb = ea.held_at[step], eb.held_at[step]
    common = [k for k in ha if k in hb]
    if not common:
        return []
    t = mcnemar([ha[k] for k in common], [hb[k] for k in common])
    return [Comparison(f"retention after {step} edits", ea.run_id, eb.run_id, t)]


def _glue_tests(ea: RunEvidence, eb: RunEvidence) -> list[Comparison]:
    out = []
    for task in sorted({t for _, t in ea.glue} & {t for _, t in eb.glue}):
        steps = sorted(s for s, t in ea.glue if t == task and (s, task) in eb.glue)
        if not steps:
            continue
        t = _glue_pair(ea.glue[(steps[-1], task)], eb.glue[(steps[-1], task)])
        if t is not None:
            what = f"{task} accuracy after {steps[-1]} edits"
            out.append(Comparison(what, ea.run_id, eb.run_id, t))
    return out


def _glue_pair(x: Checkpoint, y: Checkpoint) -> PairedTest | None:
    px, py = correct_by_example(x.extra), correct_by_example(y.extra)
    if px is not None and py is not None:
        ids = [i for i in px if i in py]
        if ids:
            return paired_bootstrap([float(px[i]) for i in ids], [float(py[i]) for i in ids])
    rx, ry = glue_rate(x), glue_rate(y)
    if rx is None or ry is None or rx.k is None or ry.k is None:
        return None
    return two_proportions(rx.k, rx.n, ry.k, ry.n)


def compare_runs(ea: RunEvidence, eb: RunEvidence) -> list[Comparison]:
    """The paired tests of two runs: holds (all, and needed an edit in both), the last
    common retention pass, GLUE accuracy at the last common checkpoint."""
    return _holds_tests(ea.records, eb.records) + _retention_test(ea, eb) + _glue_tests(ea, eb)


def paired_tests(store: Store, run_ids: Sequence[str]) -> list[Comparison]:
    """Every pair of the runs, on the records (and GLUE examples) they share."""
    ev = {r: run_evidence(store, r) for r in run_ids}
    out: list[Comparison] = []
    for i, a in enumerate(run_ids):
        for b in run_ids[i + 1 :]:
            out += compare_runs(ev[a], ev[b])
    return out


def glue_changes(store: Store, run_id: str) -> list[Comparison]:
    """Each GLUE task's accuracy at the last checkpoint against the first (step 0) of the
    same run: paired over the examples where both stored predictions, else unpaired."""
    by_task: dict[str, list[Checkpoint]] = {}
    for c in store.checkpoints(run_id):
        if c.task not in NON_GLUE_TASKS:
            by_task.setdefault(c.task, []).append(c)
    out = []
    for task, cps in sorted(by_task.items()):
        if len(cps) < 2:
            continue
        t = _glue_pair(cps[-1], cps[0])
        if t is not None:
            what = f"{task} after {cps[-1].step} edits against {cps[0].step}"
            out.append(Comparison(what, run_id, run_id, t))
    return out


# --- replicates -----------------------------------------------------------------------


def replicate_spread(stats: Sequence[RunStats]) -> dict[str, Spread]:
    """A group of runs that differ only by their order, as each headline rate's mean
    and spread across the group (rates that some run of the group lacks are left out)."""
    picks: dict[str, list[float]] = {}

    def put(name: str, r: Rate | None) -> None:
        if r is not None:
            picks.setdefault(name, []).append(r.value)

    for s in stats:
        for k, r in s.immediate.items():
            put(f"immediate {k.upper()}", r)
        for k, r in s.final.items():
            put(f"end of stream {k.upper()}", r)
        put("holds at the end", s.hold)
        put("holds at the end, needed an edit", s.needed_hold)
        put("retention", s.retention)
        for task, (_, r) in s.glue.items():
            put(f"{task} accuracy", r)
    return {k: mean_spread(v) for k, v in picks.items() if len(v) == len(stats)}


__all__ = [
    "Comparison",
    "RunEvidence",
    "compare_runs",
    "run_evidence",
    "Rate",
    "RunRecords",
    "RunStats",
    "count_rate",
    "glue_changes",
    "glue_rate",
    "mean_rate",
    "p_text",
    "paired_tests",
    "replicate_spread",
    "run_records",
    "run_stats",
]
