"""Every statistic docs/results/README.md states about a comparison of runs, from the
database, printed as Markdown: rates with 95 % intervals, "needed an edit", paired
tests, the floor of the first block, holds by block (early against late), SST-2 and its
swings, fluency's swings, true medians of the updates, and the wall times from the
database's own ``created_at`` stamps.

    python scripts/family_stats.py 66febe7f 2dde8da2 d1167cd9 28566aae \\
        --db docs/results/family-smollm2.db

The database is copied to a temporary folder and the copy opened: the file named is
never opened, so a committed database is not touched.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
from collections.abc import Sequence
from datetime import datetime, timedelta
from pathlib import Path

from evals.spec import RunSpec
from evals.stats import holm, median, two_proportions
from workbench.core.run_stats import (
    count_rate,
    glue_rate,
    p_text,
    paired_tests,
    run_records,
    run_stats,
)
from workbench.core.summary import layer_figures
from workbench.store import Store


def table(head: Sequence[str], rows: Sequence[Sequence[object]]) -> None:
    print("| " + " | ".join(head) + " |")
    print("|" + "---|" * len(head))
    for r in rows:
        print("| " + " | ".join(str(c) for c in r) + " |")
    print()


def name(store: Store, run_id: str) -> str:
    run = store.get_run(run_id)
    return f"{RunSpec.of(run).method} {run_id}"


def rates(store: Store, ids: Sequence[str]) -> None:
    print("## Rates with 95 % intervals\n")
    rows = []
    for r in ids:
        st = run_stats(store, r)
        imm = " / ".join(st.immediate[k].text() for k in ("es", "ps", "ns"))
        fin = " / ".join(st.final[k].text() for k in ("es", "ps", "ns"))
        sst = [c for c in store.checkpoints(r, task="sst2")]
        rows.append(
            [
                name(store, r),
                imm,
                fin,
                st.hold.text() if st.hold else "-",
                f"{st.needed} of {st.n}",
                st.needed_hold.text() if st.needed_hold else "-",
                st.retention.text() if st.retention else "-",
                f"{glue_rate(sst[0]).text()} -> {glue_rate(sst[-1]).text()}" if sst else "-",
            ]
        )
    table(
        (
            "run",
            "immediate ES / PS / NS",
            "end of stream ES / PS / NS",
            "hold, all",
            "needed an edit",
            "hold, needed an edit",
            "first 100 holding at the end",
            "SST-2 start -> end",
        ),
        rows,
    )


def tests(store: Store, ids: Sequence[str]) -> None:
    print("## Paired tests (records paired by case id)\n")
    rows = []
    found = paired_tests(store, ids)
    family: dict[str, list[int]] = {}  # what was compared -> its tests over the pairs
    for i, c in enumerate(found):
        family.setdefault(c.what.split(" after ")[0], []).append(i)
    adjusted = [0.0] * len(found)
    for members in family.values():
        for i, q in zip(members, holm([found[i].test.p for i in members]), strict=True):
            adjusted[i] = q
    for c, q in zip(found, adjusted, strict=True):
        t = c.test
        detail = f"{t.b_only} / {t.c_only}" if t.test.startswith("McNemar") else "-"
        rows.append(
            [
                name(store, c.a),
                name(store, c.b),
                c.what,
                t.test,
                f"{t.a:.3f}",
                f"{t.b:.3f}",
                detail,
                p_text(t.p),
                "yes" if c.significant else "no",
                p_text(q),
            ]
        )
    head = ("A", "B", "compared", "test", "A", "B", "A only / B only", "p", "p < 0.05")
    table((*head, "Holm over the pairs"), rows)


def _unedited_needed(store: Store, ids: Sequence[str], size: int) -> list[object]:
    """The first block's records that needed an edit on the unedited model: a batch run's
    first batch is scored before any edit (the first run with batches of ``size`` or more)."""
    for r in ids:
        cfg = RunSpec.of(store.get_run(r)).stored_replay
        if int(cfg.get("batch_size") or 1) >= size:
            rec = run_records(store, r)
            return [k for k in rec.keys[:size] if rec.needed(k)]
    return []


def first_block(store: Store, ids: Sequence[str], size: int = 100) -> None:
    print(f"## The first {size} records: the floor\n")
    base = _unedited_needed(store, ids, size)
    rows = []
    for r in ids:
        rec = run_records(store, r)
        first = rec.keys[:size]
        already = [k for k in first if rec.needed(k) is False]
        needed = [k for k in first if rec.needed(k)]
        ret = [c for c in store.checkpoints(r, task="retention")]
        from evals.retention import retention_of

        last = retention_of(ret[-1])
        lost = set(last.lost)
        held = {rec.seq_key[s]: s not in lost for s in sorted(rec.seq_key)[:size]}
        k = sum(held[x] for x in needed)
        kb = sum(held[x] for x in base if x in held)
        rows.append(
            [
                name(store, r),
                f"{len(already)} of {len(first)}",
                f"{k}/{len(needed)} {count_rate(k, len(needed)).interval()}",
                f"{kb}/{len(base)} {count_rate(kb, len(base)).interval()}" if base else "-",
                f"{last.n_hold}/{last.m}",
                f"{sum(held[x] for x in already)}/{len(already)}",
            ]
        )
    table(
        (
            "run",
            "pre-edit ES = 1",
            f"needed an edit (its own pre-edit score): holding after {last.step}",
            "needed an edit on the unedited model: holding",
            "all holding",
            "already held: holding",
        ),
        rows,
    )


def blocks(store: Store, ids: Sequence[str], size: int = 100) -> None:
    print(f"## Holds at the end by block of {size}; first 400 against last 400\n")
    rows = []
    for r in ids:
        rec = run_records(store, r)
        hold = [rec.holds(k) for k in rec.keys]
        per = [sum(hold[i : i + size]) for i in range(0, len(hold), size)]
        early, late = sum(hold[:400]), sum(hold[-400:])
        t = two_proportions(early, 400, late, 400)
        rows.append(
            [name(store, r), " ".join(map(str, per)), f"{early}/400", f"{late}/400", p_text(t.p)]
        )
    table(("run", "blocks", "first 400", "last 400", "p (two-proportion)"), rows)


def glue_swings(store: Store, ids: Sequence[str]) -> None:
    print("## SST-2 per checkpoint (200 examples), neighbouring swings, end against start\n")
    rows = []
    for r in ids:
        cps = store.checkpoints(r, task="sst2")
        acc = [c.accuracy or 0.0 for c in cps]
        swing = max(abs(b - a) for a, b in zip(acc, acc[1:], strict=False))
        s0, s1 = glue_rate(cps[0]), glue_rate(cps[-1])
        assert s0 is not None and s1 is not None and s0.k is not None and s1.k is not None
        p = two_proportions(s1.k, s1.n, s0.k, s0.n).p
        se = (s1.value * (1 - s1.value) / s1.n) ** 0.5
        rows.append(
            [
                name(store, r),
                " ".join(f"{a:.3f}" for a in acc),
                f"{swing:.3f}",
                f"{se:.3f}",
                p_text(p),
            ]
        )
    table(
        (
            "run",
            "accuracy by step",
            "largest neighbouring swing",
            "SE at the end",
            "p end vs start (unpaired)",
        ),
        rows,
    )


def fluency(store: Store, ids: Sequence[str]) -> None:
    print("## Fluency (generation entropy) per checkpoint\n")
    rows = []
    for r in ids:
        v = [c.value or 0.0 for c in store.checkpoints(r, task="fluency")]
        d = [b - a for a, b in zip(v, v[1:], strict=False)]
        rows.append(
            [name(store, r), " ".join(f"{x:.2f}" for x in v), f"{min(d):+.2f}", f"{max(d):+.2f}"]
        )
    table(("run", "by step", "largest fall", "largest rise"), rows)


def medians(store: Store, ids: Sequence[str]) -> None:
    print("## Update norms per step: true median (upper median as shown before)\n")
    rows = []
    for r in ids:
        edits = store.edits(r)
        steps = {e.step_index: e.update_norm for e in edits if e.update_norm is not None}
        ns = sorted(steps.values())
        per = [
            f"{f.layer}: {median(f.step_norms):.1f} ({upper(f.step_norms):.1f})"
            for f in layer_figures(edits)
        ]
        rows.append(
            [
                name(store, r),
                f"{median(ns):.2f} ({ns[len(ns) // 2]:.2f})",
                f"{sum(ns):.1f}",
                "; ".join(per),
            ]
        )
    table(("run", "median ‖ΔW‖ of a step, all layers", "Σ ‖ΔW‖", "per layer: median (upper)"), rows)


def upper(xs: Sequence[float]) -> float:
    """The upper median, ``sorted(x)[n // 2]``: what the report showed before."""
    return sorted(xs)[len(xs) // 2]


def stamp(s: str) -> datetime:
    return datetime.fromisoformat(s)


def times(store: Store, ids: Sequence[str]) -> None:
    print("## Times from the database (UTC)\n")
    rows = []
    for r in ids:
        run = store.get_run(r)
        edits = store.edits(r)
        res = store.rescores(r)
        steps: dict[int, tuple[str, dict[str, float]]] = {}
        for e in edits:
            steps.setdefault(e.step_index, (e.created_at, e.timings or {}))
        secs = sorted(
            sum(v for v in t.values() if isinstance(v, (int, float))) for _, t in steps.values()
        )
        at0, t0 = steps[min(steps)]
        began = stamp(at0) - timedelta(
            seconds=sum(v for v in t0.values() if isinstance(v, (int, float)))
        )
        rows.append(
            [
                name(store, r),
                run.created_at[:19],
                edits[0].created_at[:19],
                began.isoformat()[:19],
                edits[-1].created_at[:19],
                res[-1].created_at[:19] if res else "-",
                f"{secs[0] / 60:.1f} / {median(secs) / 60:.1f} / {secs[-1] / 60:.1f}",
            ]
        )
    table(
        (
            "run",
            "created",
            "first step stored",
            "first step began (stored − timed)",
            "last edit stored",
            "re-scoring done",
            "min / median / max minutes per step (timed)",
        ),
        rows,
    )


def window_times(store: Store, run_id: str, cuts: Sequence[int]) -> None:
    print(f"## {name(store, run_id)}: seconds per edit by stretch of the stream\n")
    edits = store.edits(run_id)
    rows = []
    for lo, hi in zip(cuts, cuts[1:], strict=False):
        part = [e for e in edits if lo <= e.seq < hi]
        timed = [
            sum(v for v in (e.timings or {}).values() if isinstance(v, (int, float))) for e in part
        ]
        gaps = [
            (stamp(b.created_at) - stamp(a.created_at)).total_seconds()
            for a, b in zip(part, part[1:], strict=False)
        ]
        run_gaps = [g for g in gaps if g < 600]  # a pause between sessions is not an edit
        q = sorted(timed)
        rows.append(
            [
                f"{lo}-{hi - 1}",
                f"{part[0].created_at[5:16]} to {part[-1].created_at[5:16]}",
                f"{sum(timed) / len(timed):.1f} ({median(q):.1f}; "
                f"{q[len(q) // 10]:.1f}-{q[-len(q) // 10 - 1]:.1f})",
                f"{sum(run_gaps) / len(run_gaps):.1f}",
                f"{len(gaps) - len(run_gaps)}",
            ]
        )
    table(
        (
            "edits",
            "stored (MM-DD HH:MM)",
            "timed s per edit: mean (median; 10th-90th percentile)",
            "wall s between stored edits",
            "pauses > 10 min",
        ),
        rows,
    )


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("run_ids", nargs="+")
    ap.add_argument("--db", required=True, type=Path)
    ap.add_argument("--windows", default="0,100,200,300,424,845,1000", help="r-ROME stretches")
    a = ap.parse_args(argv)
    if not a.db.is_file():
        print(f"error: no database at {a.db}", file=sys.stderr)
        return 2
    with tempfile.TemporaryDirectory() as tmp:
        copy = Path(tmp) / a.db.name
        shutil.copyfile(a.db, copy)
        store = Store.open(copy)
        ids = [store.get_run(r).id for r in a.run_ids]
        for part in (rates, tests, first_block, blocks, glue_swings, fluency, medians, times):
            part(store, ids)
        for r in ids:
            if store.get_run(r).mode == "rrome":
                window_times(store, r, [int(x) for x in a.windows.split(",")])
        store.close()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
