"""The report's statistics sections, as Markdown lines: "needed an edit" beside all
records, the paired tests between runs (which differences are differences at 0.05 and
which are not), and groups of order replicates as mean ± spread."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from evals.stats import ALPHA
from workbench.store import Run, Store

from .run_stats import (
    Comparison,
    RunStats,
    glue_changes,
    p_text,
    paired_tests,
    replicate_spread,
    run_stats,
)


def _table(head: Sequence[str], rows: Sequence[Sequence[str]]) -> list[str]:
    out = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    out += ["| " + " | ".join(str(c).replace("|", "\\|") for c in row) + " |" for row in rows]
    return out


def needed_section(runs: Sequence[Run], stats: Mapping[str, RunStats]) -> list[str]:
    """Holds among all records and among those that needed an edit, per run."""
    rows = []
    for r in runs:
        st = stats[r.id]
        if st.needed is None:
            continue
        rows.append(
            [
                r.label,
                f"{st.needed} of {st.n}",
                st.needed_immediate.text() if st.needed_immediate else "-",
                st.needed_hold.text() if st.needed_hold else "-",
                st.hold.text() if st.hold else "-",
            ]
        )
    if not rows:
        return []
    lines = ["", "### Records that needed an edit", ""]
    lines += _table(
        (
            "run",
            "needed an edit (pre-edit ES < 1)",
            "ES = 1 right after the edit, among them",
            "hold at the end, among them",
            "hold at the end, all",
        ),
        rows,
    )
    lines += [
        "",
        "A record *needed an edit* when its edit prompt did not already prefer the new "
        "object just before its edit (pre-edit ES < 1, scored on the model as the sequence "
        'left it). The others hold without any edit, so "hold, all" counts them for every '
        "method. Intervals: exact binomial (Clopper-Pearson), 95 %.",
    ]
    return lines


def _comparison_row(c: Comparison, label: Mapping[str, str]) -> list[str]:
    t = c.test
    if t.test.startswith("McNemar"):
        a, b = f"{round(t.a * t.n)}/{t.n}", f"{round(t.b * t.n)}/{t.n}"
        detail = f"{t.b_only} / {t.c_only}"
    else:
        a, b = f"{t.a:.3f}", f"{t.b:.3f}"
        detail = f"{t.difference:+.3f} [{t.ci[0]:+.3f}, {t.ci[1]:+.3f}]" if t.ci else "-"
    verdict = "yes" if c.significant else "no: within noise"
    return [label[c.a], label[c.b], c.what, t.test, a, b, detail, p_text(t.p), verdict]


def paired_section(store: Store, runs: Sequence[Run]) -> list[str]:
    """Every pair of runs tested on the records and examples they share."""
    if len(runs) < 2:
        return []
    tests = paired_tests(store, [r.id for r in runs])
    if not tests:
        return []
    label = {r.id: r.label for r in runs}
    lines = ["", "## Differences between runs: paired tests", ""]
    lines += _table(
        (
            "run A",
            "run B",
            "compared",
            "test",
            "A",
            "B",
            "A only / B only (McNemar); A − B [95 %] (bootstrap)",
            "p",
            "a difference at 0.05?",
        ),
        [_comparison_row(c, label) for c in tests],
    )
    noise = [c for c in tests if not c.significant]
    lines += [
        "",
        "Records are paired by CounterFact case id (the same record in both runs); holds by "
        "the exact McNemar test (two-sided binomial on the discordant records), GLUE "
        "accuracy at the last checkpoint both runs have by a paired bootstrap over the "
        "examples (10,000 resamples, seed 0) where both stored per-example predictions, "
        "else by an unpaired two-proportion test (conservative on the same examples). A "
        f"difference is called one only where p < {ALPHA}; the p-values are not adjusted "
        "for the number of pairs.",
    ]
    if noise:
        lines += [
            "",
            f"**Not a difference at {ALPHA}** ({len(noise)} of {len(tests)}): "
            + "; ".join(
                f"{label[c.a]} vs {label[c.b]}, {c.what} (p = {p_text(c.test.p)})" for c in noise
            )
            + ".",
        ]
    return lines


def glue_change_section(store: Store, runs: Sequence[Run]) -> list[str]:
    """Per run: each GLUE task at its last checkpoint against its start, tested."""
    rows = []
    for r in runs:
        for c in glue_changes(store, r.id):
            t = c.test
            ci = f" [{t.ci[0]:+.3f}, {t.ci[1]:+.3f}]" if t.ci else ""
            verdict = "yes" if c.significant else "no: within noise"
            rows.append(
                [
                    r.label,
                    c.what,
                    t.test,
                    f"{t.b:.3f}",
                    f"{t.a:.3f}",
                    f"{t.difference:+.3f}{ci}",
                    p_text(t.p),
                    verdict,
                ]
            )
    if not rows:
        return []
    lines = ["", "### GLUE: the end against the start of each run", ""]
    lines += _table(
        ("run", "compared", "test", "start", "end", "end − start [95 %]", "p", "a change at 0.05?"),
        rows,
    )
    lines += [
        "",
        "Paired bootstrap over the examples where both checkpoints stored each example's "
        "prediction; else an unpaired two-proportion test (conservative).",
    ]
    return lines


def groups_section(store: Store, groups: Mapping[str, Sequence[str]]) -> list[str]:
    """Groups of runs that differ only by order, each rate as mean ± sample standard
    deviation across the group (and its range)."""
    spreads = {
        name: replicate_spread([run_stats(store, r) for r in ids]) for name, ids in groups.items()
    }
    spreads = {k: v for k, v in spreads.items() if v}
    if not spreads:
        return []
    rates: list[str] = []
    for sp in spreads.values():
        rates += [k for k in sp if k not in rates]
    lines = ["", "## Order replicates: mean ± spread", ""]
    rows = [
        [
            k,
            *(
                (sp[k].text() + f" [{sp[k].lo:.3f}, {sp[k].hi:.3f}]") if k in sp else "-"
                for sp in spreads.values()
            ),
        ]
        for k in rates
    ]
    lines += _table(("rate", *spreads), rows)
    lines += [
        "",
        "Each group: the runs that differ only by the order of the stream. Mean ± the "
        "sample standard deviation across the orders (n = runs), [lowest, highest].",
    ]
    return lines


__all__ = ["glue_change_section", "groups_section", "needed_section", "paired_section"]
