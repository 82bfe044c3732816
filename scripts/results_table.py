"""The figures of docs/results/README.md, computed from a replay database.

    python scripts/results_table.py RUN [RUN ...] [--db docs/results/long-smollm2.db]
        [--survival] [--json out.json]

For each run: edits done, the first flagged edit (with cos(k*, k(s)), the
denominator and ||dW||), the cumulative change ||W_n - W_0|| and ||W_n||/||W_0||,
how it grows (the exponent a of ||W_n - W_0|| ~ n^a over the steps, n >= 5 for one
edit per step, next to sqrt(sum ||dW_i||^2), its value if the steps' updates were
orthogonal, and sum ||dW_i||, its value if they were aligned; a step is one edit, or
one batch of a batch method), pre -> post ES/PS/NS at edit time, perplexity,
fluency and GLUE at the first and last checkpoint, and the mean v* steps.

Survival (how many earlier edits still hold, ES = 1, after the last one) comes
from the run's own end-of-run re-scoring when the run finished and stored one
for every applied edit. ``--survival`` computes it for the others (or, with
``--recompute``, for all): it loads the model, rebuilds each run's current
weights from the stored updates (checked against the stored fingerprint, as a
resume does) and re-scores every applied edit's CounterFact record on them.
Nothing is written to the database.
"""

from __future__ import annotations

import argparse
import json
import math
from typing import Any

from evals.metrics import aggregate, record_metrics
from evals.replay import PERPLEXITY_TASK, _record_of
from evals.stats import median
from workbench.store import Store


def growth_exponent(ns: list[int], ys: list[float], n_min: int = 5) -> float | None:
    """Least-squares slope of log y on log n over n >= n_min."""
    pts = [(math.log(n), math.log(y)) for n, y in zip(ns, ys, strict=True) if n >= n_min and y > 0]
    if len(pts) < 3:
        return None
    mx = sum(p[0] for p in pts) / len(pts)
    my = sum(p[1] for p in pts) / len(pts)
    sxx = sum((p[0] - mx) ** 2 for p in pts)
    return sum((p[0] - mx) * (p[1] - my) for p in pts) / sxx if sxx else None


def _series(store: Store, run_id: str, task: str) -> list[tuple[int, Any]]:
    return [(c.step, c) for c in store.checkpoints(run_id, task)]


def run_figures(store: Store, run_id: str) -> dict[str, Any]:
    run = store.get_run(run_id)
    edits = [e for e in store.edits(run_id) if e.applied]
    out: dict[str, Any] = {"run": run.label, "status": run.status, "edits": len(edits)}
    flagged = [e for e in edits if e.flagged]
    if flagged:
        f = flagged[0]
        out["first_flag"] = {
            "seq": f.seq,
            "case_id": f.case_id,
            "reason": f.flag_reason,
            "cos_kstar_ks": f.cos_kstar_ks,
            "denominator": f.denominator,
            "update_norm": f.update_norm,
        }
    out["n_flagged"] = len(flagged)
    # one update per step (an edit, or a batch whose edits share its norm and drift)
    last_of_step = {e.step_index: e for e in edits}
    stepped = list(last_of_step.values())
    out["steps"] = len(stepped)
    norms = [float(e.update_norm or 0.0) for e in stepped]
    drift = [(i + 1, e.metrics.get("w_delta_norm")) for i, e in enumerate(stepped)]
    drift = [(n, float(y)) for n, y in drift if y is not None]
    if drift:
        out["w_delta_norm"] = drift[-1][1]
        out["w_norm_ratio"] = edits[-1].metrics.get("w_norm_ratio")
        out["growth_exponent"] = growth_exponent(
            [n for n, _ in drift],
            [y for _, y in drift],
            n_min=5 if len(stepped) == len(edits) else 1,
        )
        out["if_orthogonal"] = math.sqrt(sum(x * x for x in norms))
        out["if_aligned"] = sum(norms)
        out["median_update_norm"] = median(norms)
        out["max_update_norm"] = max(norms)
    out["post"] = aggregate([e.metrics for e in edits if e.metrics])
    pre = [e.metrics["pre"] for e in edits if e.metrics.get("pre")]
    if pre:
        out["pre"] = aggregate(pre)
    steps = [s for e in edits if (s := e.record.get("v_steps") or e.record.get("z_steps"))]
    out["mean_v_steps"] = sum(steps) / len(steps) if steps else None
    for task in (PERPLEXITY_TASK, "fluency", "sst2", "mrpc", "cola", "rte"):
        pts = _series(store, run_id, task)
        if not pts:
            continue

        def value(c: Any, task: str = task) -> float | None:
            if task == PERPLEXITY_TASK:
                return (c.extra or {}).get("perplexity")
            return c.value if task == "fluency" else c.accuracy

        (s0, c0), (s1, c1) = pts[0], pts[-1]
        out[task] = {"start": value(c0), "start_step": s0, "last": value(c1), "last_step": s1}
        if task in ("mrpc", "cola"):
            out[task].update(start_f1=c0.f1, last_f1=c1.f1, start_mcc=c0.mcc, last_mcc=c1.mcc)
    return out


def survival(store: Store, run_id: str) -> dict[str, Any]:
    """Re-score every applied edit's record on the run's current weights: its base model
    loaded afresh and its stored steps (edits or batches) applied, fingerprints checked."""
    from rome import load_model
    from workbench.core.save import rebuild, stored_layer

    run = store.get_run(run_id)
    lm = load_model(run.model, device="cpu", layer=stored_layer(run))
    rebuilt = rebuild(store, run_id, lm)
    scored = [
        record_metrics(lm.model, lm.tokenizer, _record_of(e.record["counterfact"]))
        for e in rebuilt.edits
    ]
    held = sum(1 for m in scored if m.es >= 1.0)
    return {"scored": len(scored), "survived": held, "now": aggregate(scored)}


def stored_survival(store: Store, run_id: str) -> dict[str, Any] | None:
    """The finished run's own end-of-run re-scoring, when it covers every applied edit."""
    if store.get_run(run_id).status != "finished":
        return None
    applied = {e.seq for e in store.edits(run_id, applied_only=True)}
    rescored = {r.seq: r.metrics for r in store.rescores(run_id)}
    if not applied or set(rescored) != applied:
        return None
    held = sum(1 for m in rescored.values() if (m.get("es") or 0) >= 1.0)
    return {
        "scored": len(rescored),
        "survived": held,
        "now": aggregate(list(rescored.values())),
        "source": "stored end-of-run re-scoring",
    }


def _fmt(x: Any, nd: int = 3) -> str:
    return "-" if x is None else f"{x:.{nd}f}" if isinstance(x, float) else str(x)


def markdown_row(f: dict[str, Any]) -> str:
    flag = f.get("first_flag")
    flag_s = "none"
    if flag:
        flag_s = f"edit {flag['seq']} (case {flag['case_id']}): "
        if flag["cos_kstar_ks"] is not None:  # ROME's figures of the edit
            flag_s += (
                f"cos {_fmt(flag['cos_kstar_ks'], 2)}, denominator {_fmt(flag['denominator'], 0)}, "
            )
        flag_s += f"‖ΔW‖ {_fmt(flag['update_norm'], 1)}; {flag['reason']}"
    pre, post = f.get("pre") or {}, f["post"]
    es = "/".join(_fmt(pre.get(k), 2) for k in ("es", "ps", "ns"))
    es += " → " + "/".join(_fmt(post.get(k), 2) for k in ("es", "ps", "ns"))

    def span(task: str, nd: int = 3) -> str:
        t = f.get(task)
        if not t:
            return "-"
        start, last = _fmt(t["start"], nd), _fmt(t["last"], nd)
        return f"{start} ({t['start_step']}) → {last} ({t['last_step']})"

    surv = f.get("survival")
    surv_s = f"{surv['survived']}/{surv['scored']}" if surv else "-"
    return (
        f"| {f['run']} | {f['edits']} | {flag_s} | {_fmt(f.get('w_delta_norm'), 1)} | "
        f"{_fmt(f.get('w_norm_ratio'))} | {_fmt(f.get('growth_exponent'), 2)} | {es} | "
        f"{span(PERPLEXITY_TASK, 2)} | {span('fluency', 2)} | {span('sst2', 2)} | {surv_s} | "
        f"{_fmt(f.get('mean_v_steps'), 1)} |"
    )


HEADER = (
    "| run | edits | first flag | ‖W_n − W_0‖ | ‖W_n‖/‖W_0‖ | growth n^a | "
    "ES/PS/NS pre → post | perplexity | fluency | SST-2 | survived | v* steps |\n"
    "|---|---|---|---|---|---|---|---|---|---|---|---|"
)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("runs", nargs="+")
    ap.add_argument("--db", default="docs/results/long-smollm2.db")
    ap.add_argument("--survival", action="store_true", help="compute what is not stored")
    ap.add_argument("--recompute", action="store_true", help="with --survival: every run")
    ap.add_argument("--json", dest="json_out")
    args = ap.parse_args()
    store = Store.open(args.db, create=False)
    figures = [run_figures(store, r) for r in args.runs]
    for r, f in zip(args.runs, figures, strict=True):
        stored = None if args.recompute else stored_survival(store, r)
        if stored is not None:
            f["survival"] = stored
    missing = [(r, f) for r, f in zip(args.runs, figures, strict=True) if "survival" not in f]
    if args.survival:
        for r, f in missing:
            f["survival"] = {**survival(store, r), "source": "re-scored on rebuilt weights"}
    print(HEADER)
    for f in figures:
        print(markdown_row(f))
    print()
    for f in figures:
        median, top = _fmt(f.get("median_update_norm"), 1), _fmt(f.get("max_update_norm"), 1)
        print(
            f"{f['run']}: flagged {f['n_flagged']}; ‖ΔW‖ median {median}, max {top}; "
            f"‖W_n − W_0‖ {_fmt(f.get('w_delta_norm'), 1)} "
            f"against {_fmt(f.get('if_orthogonal'), 1)} if orthogonal, "
            f"{_fmt(f.get('if_aligned'), 1)} if aligned"
        )
        for task in ("mrpc", "cola", "rte"):
            t = f.get(task)
            if t:
                print(f"  {task}: {_fmt(t['start'])} → {_fmt(t['last'])} (accuracy)")
        if f.get("survival"):
            now = f["survival"]["now"]
            print(
                f"  re-scored now: ES {_fmt(now.get('es'))} PS {_fmt(now.get('ps'))} "
                f"NS {_fmt(now.get('ns'))} ({f['survival']['source']})"
            )
    if args.json_out:
        with open(args.json_out, "w") as fh:
            json.dump(figures, fh, indent=1)


if __name__ == "__main__":
    main()
