"""Replay throughput on smollm2-135m: the reference settings against the speed-ups, one run.

The same bundled CounterFact records are replayed (GLUE every 10 edits,
limit 20 per task, the perplexity probe, the pre-edit metrics and the
retention protocol's pass over the first 100 edits at every checkpoint on) with:

  reference:     fp32 v*, the reference stopping rule (loss < 0.05);
  bf16:          bf16 autocast in the v* loop;
  most_probable: ENCORE's most-probable early stopping;
  fast:          the ``smollm2-135m-fast`` fields: MPES and bf16 where the hardware has it.

Each setting starts from the base weights (the model is loaded afresh) and
writes to a throwaway database. Printed per setting: edits per hour
(checkpoints included), the share of each phase in the time, the mean v*
steps, mean ES / PS / NS at edit time (the immediate protocol), and the ratio of edits per hour to
the reference settings'.

    python benchmarks/replay.py [--n 20] [--mode rrome] [--glue-every 10] [--glue-limit 20]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch

from evals.protocols import RETENTION_TASK
from evals.replay import CheckpointDone, EditDone, ReplayConfig, replay
from rome import Editor, load_model
from rome.vstar import resolve_autocast
from workbench.store import Store

SETTINGS = {
    "reference": {},
    "bf16": {"v_autocast": "bf16"},
    "most_probable": {"v_stop": "most_probable"},
    "fast": {"v_autocast": "auto", "v_stop": "most_probable"},  # the smollm2-135m-fast fields
}


def parse_args() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--n", type=int, default=20)
    ap.add_argument("--mode", default="rrome")
    ap.add_argument("--glue-every", type=int, default=10)
    ap.add_argument("--glue-limit", type=int, default=20)
    ap.add_argument("--settings", default=",".join(SETTINGS))
    return ap.parse_args()


def timed_replay(lm, store: Store, cfg: ReplayConfig, hp) -> tuple[list[EditDone], float, float]:
    """One replay: its edit events, its seconds, and the seconds of its checkpoints."""
    t0 = time.perf_counter()
    edits: list[EditDone] = []
    checkpoint_s = 0.0
    last = time.perf_counter()
    for ev in replay(lm, store, cfg, hparams=hp):
        now = time.perf_counter()
        if isinstance(ev, EditDone):
            edits.append(ev)
        elif isinstance(ev, CheckpointDone):
            checkpoint_s += now - last
        last = now
    return edits, time.perf_counter() - t0, checkpoint_s


def row_of(store: Store, edits: list[EditDone], total: float, checkpoint_s: float) -> dict:
    """Edits per hour, the phases' shares, mean v* steps and ES / PS / NS of the stored run."""
    run_id = store.list_runs()[0].id
    run_edits = store.edits(run_id)
    phases: dict[str, float] = {}
    for e in run_edits:
        for k, v in e.timings.items():
            phases[k] = phases.get(k, 0.0) + float(v)
    # the retention protocol's pass (M records re-scored per checkpoint), apart
    retention_s = sum(
        float(c.extra.get("seconds", 0.0)) for c in store.checkpoints(run_id, task=RETENTION_TASK)
    )
    phases["retention"] = retention_s
    phases["checkpoints"] = checkpoint_s - retention_s
    steps = [len(e.record.get("v_star_trace", [])) for e in run_edits]
    return {
        "per_hour": len(edits) / total * 3600,
        "shares": {k: v / total for k, v in phases.items()},
        "steps": statistics.mean(steps) if steps else 0.0,
        **{k: _mean(ev.metrics.get(k) for ev in edits) for k in ("es", "ps", "ns")},
    }


def print_tables(lm, args: argparse.Namespace, rows: dict[str, dict]) -> None:
    ref = rows.get("reference", next(iter(rows.values())))["per_hour"]
    print(f"\nmodel {lm.name}, layer {lm.hparams.layer}, {args.n} edits, mode {args.mode}")
    print(f"{'setting':14s}{'edits/h':>9s}{'ratio':>7s}{'steps':>7s}{'ES':>6s}{'PS':>6s}{'NS':>6s}")
    for name, r in rows.items():
        print(
            f"{name:14s}{r['per_hour']:9.1f}{r['per_hour'] / ref:6.2f}x{r['steps']:7.1f}"
            f"{r['es']:6.2f}{r['ps']:6.2f}{r['ns']:6.2f}"
        )
    print("\nshare of the time per phase")
    keys = ["v_star", "keys", "scoring", "pre_metrics", "post_metrics", "checkpoints", "retention"]
    print(f"{'setting':14s}" + "".join(f"{k:>13s}" for k in keys))
    for name, r in rows.items():
        print(f"{name:14s}" + "".join(f"{r['shares'].get(k, 0.0):13.1%}" for k in keys))


def main() -> None:
    args = parse_args()
    lm = load_model(args.model, device="cpu")
    Editor(lm.model, lm.tokenizer, lm.hparams).prepare()  # templates and covariance cached
    rows: dict[str, dict] = {}
    with tempfile.TemporaryDirectory() as tmp:
        store = Store.open(Path(tmp) / "bench.db")
        resolved: dict[tuple[str | None, str], str] = {}
        for name in args.settings.split(","):
            hp = lm.hparams.replace(**SETTINGS[name])
            key = (resolve_autocast(hp.v_autocast, torch.device("cpu")), hp.v_stop)
            if key in resolved:  # e.g. "fast" on a CPU without bf16 units is most_probable
                twin = resolved[key]
                print(f"{name}: the same computation as {twin} on this hardware", flush=True)
                rows[name] = {**rows[twin], "same_as": twin}
                continue
            resolved[key] = name
            cfg = ReplayConfig(
                n_edits=args.n,
                mode=args.mode,
                glue_every=args.glue_every,
                glue_limit=args.glue_limit,
                rescore=False,
            )
            lm = load_model(args.model, device="cpu")
            edits, total, checkpoint_s = timed_replay(lm, store, cfg, hp)
            rows[name] = r = row_of(store, edits, total, checkpoint_s)
            store.delete_run(store.list_runs()[0].id)
            print(
                f"{name}: autocast {key[0] or 'fp32'}, stop {key[1]}: {len(edits)} edits in "
                f"{total:.0f} s, {r['per_hour']:.1f} edits/h, {r['steps']:.1f} v* steps, "
                f"ES {r['es']:.2f} PS {r['ps']:.2f} NS {r['ns']:.2f}",
                flush=True,
            )
    print_tables(lm, args, rows)


def _mean(xs) -> float:
    vals = [x for x in xs if x is not None]
    return statistics.mean(vals) if vals else float("nan")


if __name__ == "__main__":
    main()
