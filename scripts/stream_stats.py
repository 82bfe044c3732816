"""Runs compared up to the edits they all have, across databases: the statistics for a
run still in progress (the MEMIT_seq ablation) against finished ones, as Markdown.

    python scripts/stream_stats.py MEMIT_seq=00e7139c@docs/results/reference-smollm2.db \\
        MEMIT=2dde8da2@docs/results/family-smollm2.db \\
        AlphaEdit=66febe7f@docs/results/family-smollm2.db

Each database is snapshotted with SQLite's backup API (a consistent copy even while a
replay writes it) into a temporary folder and the copy opened read-only. N is the
largest checkpoint step that every run has. Printed, for the edits 0..N-1 of each run:
the immediate ES / PS / NS with 95 % intervals and paired tests on the same records
(exact McNemar on ES, a paired bootstrap on PS and NS); at every checkpoint up to N,
the retention of the first records (with McNemar on which held), SST-2 (paired where
per-example predictions are stored, else unpaired), perplexity and fluency; the
median update norm per layer per step.
"""

from __future__ import annotations

import argparse
import sqlite3
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from family_stats import table  # scripts/, this script's folder, is on sys.path

from evals.stats import mcnemar, median, paired_bootstrap
from workbench.core.run_stats import (
    RunEvidence,
    _glue_pair,
    mean_rate,
    p_text,
    run_evidence,
)
from workbench.core.summary import layer_figures
from workbench.store import Store


def snapshot(db: Path, into: Path) -> Path:
    """A consistent copy of ``db`` (WAL included), made without writing to it."""
    out = into / f"{len(list(into.iterdir()))}-{db.name}"
    src = sqlite3.connect(f"file:{db}?mode=ro", uri=True)
    dst = sqlite3.connect(out)
    with dst:
        src.backup(dst)
    src.close()
    dst.close()
    return out


class Run:
    def __init__(self, store: Store, run_id: str, label: str) -> None:
        run = store.get_run(run_id)
        self.store, self.id = store, run.id
        self.label = f"{label} {run.id}"
        self.ev: RunEvidence = run_evidence(store, run.id)
        self.steps = {c.step for c in store.checkpoints(run.id)}
        self.edits = store.edits(run.id, applied_only=True)

    def checkpoint(self, step: int, task: str) -> Any:
        return next((c for c in self.store.checkpoints(self.id, task=task) if c.step == step), None)


def immediate(runs: Sequence[Run], n: int) -> None:
    print(f"## Immediate scores, edits 0-{n - 1}\n")
    keys = [runs[0].ev.records.seq_key[s] for s in range(n)]
    rows = []
    for r in runs:
        post = r.ev.records.post
        cells = [mean_rate([float(post[k][s]) for k in keys]).text() for s in ("es", "ps", "ns")]
        rows.append([r.label, *cells])
    table(("run", "ES", "PS", "NS"), rows)
    rows = []
    for i, a in enumerate(runs):
        for b in runs[i + 1 :]:
            pa, pb = a.ev.records.post, b.ev.records.post
            es = mcnemar([pa[k]["es"] >= 1 for k in keys], [pb[k]["es"] >= 1 for k in keys])
            cells = [f"{es.b_only} / {es.c_only}, {p_text(es.p)}"]
            for s in ("ps", "ns"):
                t = paired_bootstrap([pa[k][s] for k in keys], [pb[k][s] for k in keys])
                assert t.ci is not None  # a bootstrap always has its interval
                cells.append(f"{t.difference:+.3f} [{t.ci[0]:+.3f}, {t.ci[1]:+.3f}], {p_text(t.p)}")
            rows.append([f"{a.label} vs {b.label}", *cells])
    table(("A vs B", "ES: A only / B only, p", "PS: A − B [95 %], p", "NS: A − B, p"), rows)


def checkpoints(runs: Sequence[Run], steps: Sequence[int]) -> None:
    print("## Every checkpoint\n")
    rows = []
    for s in steps:
        for r in runs:
            held = r.ev.held_at.get(s)
            sst, ppl, flu = (r.checkpoint(s, t) for t in ("sst2", "perplexity", "fluency"))
            rows.append(
                [
                    s,
                    r.label,
                    f"{sum(held.values())}/{len(held)}" if held else "-",
                    f"{sst.accuracy:.3f}" if sst else "-",
                    f"{(ppl.extra or {}).get('perplexity', float('nan')):.2f}" if ppl else "-",
                    f"{flu.value:.2f}" if flu else "-",
                ]
            )
    table(("edits", "run", "first records holding", "SST-2", "perplexity", "fluency"), rows)
    rows = []
    for s in steps:
        for i, a in enumerate(runs):
            for b in runs[i + 1 :]:
                ha, hb = a.ev.held_at.get(s), b.ev.held_at.get(s)
                cells = [s, f"{a.label} vs {b.label}"]
                if ha and hb:
                    ks = [k for k in ha if k in hb]
                    t = mcnemar([ha[k] for k in ks], [hb[k] for k in ks])
                    cells.append(f"{t.b_only} / {t.c_only}, {p_text(t.p)}")
                else:
                    cells.append("-")
                x, y = a.checkpoint(s, "sst2"), b.checkpoint(s, "sst2")
                g = _glue_pair(x, y) if x and y else None
                cells.append(f"{g.test}, {p_text(g.p)}" if g else "-")
                rows.append(cells)
    table(("edits", "A vs B", "retention: A only / B only, p", "SST-2: test, p"), rows)


def norms(runs: Sequence[Run], n: int) -> None:
    print(f"## Update norms per step, edits 0-{n - 1}: median ‖ΔW‖ per layer\n")
    rows = []
    for r in runs:
        part = [e for e in r.edits if e.seq < n]
        per = [f"{f.layer}: {median(f.step_norms):.1f}" for f in layer_figures(part)]
        steps = {e.step_index: e.update_norm for e in part if e.update_norm is not None}
        rows.append([r.label, len(steps), f"{median(list(steps.values())):.1f}", ", ".join(per)])
    table(("run", "steps", "median ‖ΔW‖ of a step", "per layer"), rows)


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("runs", nargs="+", help="LABEL=RUN@DATABASE")
    a = ap.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        runs = []
        for spec in a.runs:
            label, _, rest = spec.rpartition("=")
            run_id, _, db = rest.partition("@")
            if not db or not Path(db).is_file():
                print(f"error: {spec!r} is not LABEL=RUN@DATABASE with a file", file=sys.stderr)
                return 2
            store = Store.open(snapshot(Path(db), Path(tmp)), access="read")
            runs.append(Run(store, run_id, label or run_id))
        steps = sorted(set.intersection(*(r.steps for r in runs)))
        n = steps[-1]
        firsts = [[r.ev.records.seq_key.get(s) for s in range(n)] for r in runs]
        if any(f != firsts[0] for f in firsts):
            print(
                "error: the runs did not edit the same records in the same order", file=sys.stderr
            )
            return 2
        print(f"{len(runs)} runs, compared over their first {n} edits\n")
        immediate(runs, n)
        checkpoints(runs, steps)
        norms(runs, n)
        for r in runs:
            r.store.close()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
