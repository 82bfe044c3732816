"""Edit latency on smollm2-135m (CPU by default): the engine against its speed-ups switched off.

Prints the median seconds per edit and per phase for each key mode, for
  fast: keys stop at the layer; v* runs the upper layers only, logits where read,
        parameters frozen (the default path);
  off:  the whole model for keys and at every v* step, logits everywhere,
        parameters requiring grad (what the published code does);
  bf16: the fast path with bf16 autocast in the v* loop;
as ratios measured in one run on the same requests. Templates and the
covariance factor are prepared once beforehand (both paths cache them).

    python benchmarks/edit_latency.py [--model smollm2-135m] [--n 3] [--device cpu]
"""

from __future__ import annotations

import argparse
import statistics
import time

from evals.counterfact import load_counterfact
from rome import MODES, Editor, load_model


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--n", type=int, default=3, help="requests per mode and path")
    ap.add_argument("--device", default="cpu")
    args = ap.parse_args()

    lm = load_model(args.model, device=args.device)
    ed = Editor(lm.model, lm.tokenizer, lm.hparams)
    ed.prepare()
    bf16 = Editor(lm.model, lm.tokenizer, lm.hparams.replace(v_autocast="bf16"))
    bf16.prepare()
    records = load_counterfact("sample", limit=args.n).records
    reqs = [r.to_request() for r in records]
    print(f"model {lm.name}, layer {lm.hparams.layer}, device {lm.device}, {len(reqs)} requests")
    print(f"{len(ed.templates())} templates, covariance: {ed.factor(lm.hparams.layer).description}")

    rows: dict[tuple[str, str], list[float]] = {}
    phases: dict[tuple[str, str], dict[str, list[float]]] = {}
    efficacy: dict[tuple[str, str], list[float]] = {}
    ed.compute(reqs[0], "rrome")  # warm-up
    for mode in MODES:
        for path in ("fast", "off", "bf16"):
            for req in reqs:
                editor = bf16 if path == "bf16" else ed
                t0 = time.perf_counter()
                res = editor.compute(req, mode, fast=path != "off")
                rows.setdefault((mode, path), []).append(time.perf_counter() - t0)
                for k, v in res.timings.items():
                    phases.setdefault((mode, path), {}).setdefault(k, []).append(v)
                efficacy.setdefault((mode, path), []).append(
                    float(res.p_true_after is not None and res.p_new_after > res.p_true_after)
                )

    print(
        f"\n{'mode':9s}{'path':6s}{'s/edit':>8s}{'keys':>8s}{'v*':>8s}{'score':>8s}"
        f"{'ES':>6s}{'speed-up':>10s}"
    )
    for mode in MODES:
        off = statistics.median(rows[(mode, "off")])
        for path in ("off", "fast", "bf16"):
            med = statistics.median(rows[(mode, path)])
            ph = {k: statistics.median(v) for k, v in phases[(mode, path)].items()}
            es = statistics.mean(efficacy[(mode, path)])
            print(
                f"{mode:9s}{path:6s}{med:8.2f}{ph.get('keys', 0):8.3f}{ph.get('v_star', 0):8.2f}"
                f"{ph.get('scoring', 0):8.2f}{es:6.2f}{off / med:9.2f}x"
            )
    fast_all = statistics.median([t for (m, p), v in rows.items() if p == "fast" for t in v])
    off_all = statistics.median([t for (m, p), v in rows.items() if p == "off" for t in v])
    bf_all = statistics.median([t for (m, p), v in rows.items() if p == "bf16" for t in v])
    print(
        f"\nall modes: fast {off_all / fast_all:.2f}x, bf16 {off_all / bf_all:.2f}x "
        "the switched-off path"
    )


if __name__ == "__main__":
    main()
