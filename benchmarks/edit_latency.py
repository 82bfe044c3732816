"""Edit latency on smollm2-135m (CPU by default): the engine against its speed-ups switched off.

For each path, every request is computed in all three key modes at once
(``Editor.compare``: templates, keys and v* shared), and the script prints
the median seconds per request and per phase, efficacy per mode, and the
speed-up over the switched-off path, all measured in one run:

  off:  the whole model for keys and at every v* step, logits at every
        position, parameters requiring grad (what the published code does);
  fast: keys stop at the layer; v* runs the layers from the edit up, logits
        only where the loss reads them, parameters frozen (the default);
  bf16: the fast path with bf16 autocast in the v* loop.

Templates and the covariance factor are prepared once beforehand (both paths
cache them).

    python benchmarks/edit_latency.py [--model smollm2-135m] [--n 3] [--device cpu]
"""

from __future__ import annotations

import argparse
import statistics
import time

from evals.counterfact import load_counterfact
from rome import MODES, Editor, load_model

PATHS = ("off", "fast", "bf16")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--hparams", default=None)
    ap.add_argument("--n", type=int, default=3, help="requests per path")
    ap.add_argument("--device", default="cpu")
    args = ap.parse_args()

    lm = load_model(args.model, device=args.device, hparams=args.hparams)
    editors = {
        "off": Editor(lm.model, lm.tokenizer, lm.hparams),
        "fast": Editor(lm.model, lm.tokenizer, lm.hparams),
        "bf16": Editor(lm.model, lm.tokenizer, lm.hparams.replace(v_autocast="bf16")),
    }
    for ed in editors.values():
        ed.prepare()
    ed = editors["fast"]
    reqs = [r.to_request() for r in load_counterfact("sample", limit=args.n).records]
    print(f"model {lm.name}, layer {lm.hparams.layer}, device {lm.device}, {len(reqs)} requests")
    print(f"{len(ed.templates())} templates, covariance: {ed.factor(lm.hparams.layer).description}")
    ed.compute(reqs[0], "rrome")  # warm-up

    seconds: dict[str, list[float]] = {p: [] for p in PATHS}
    phases: dict[str, dict[str, list[float]]] = {p: {} for p in PATHS}
    wins: dict[tuple[str, str], list[float]] = {}
    for req in reqs:
        for path in PATHS:
            t0 = time.perf_counter()
            results = editors[path].compare(req, fast=path != "off")
            seconds[path].append(time.perf_counter() - t0)
            last = results[MODES[-1]]
            for k, v in last.timings.items():
                phases[path].setdefault(k, []).append(v)
            for mode, r in results.items():
                ok = r.p_true_after is not None and r.p_new_after > r.p_true_after
                wins.setdefault((path, mode), []).append(float(ok))

    off = statistics.median(seconds["off"])
    print(
        f"\n{'path':6s}{'s/request':>10s}{'keys':>8s}{'v*':>8s}{'scoring':>9s}"
        f"{'ES orig':>9s}{'ES rrome':>9s}{'ES prompt':>10s}{'speed-up':>10s}"
    )
    for path in PATHS:
        med = statistics.median(seconds[path])
        ph = {k: statistics.median(v) for k, v in phases[path].items()}
        es = [statistics.mean(wins[(path, m)]) for m in MODES]
        print(
            f"{path:6s}{med:10.2f}{ph.get('keys', 0):8.3f}{ph.get('v_star', 0):8.2f}"
            f"{ph.get('scoring', 0):9.2f}{es[0]:9.2f}{es[1]:9.2f}{es[2]:10.2f}{off / med:9.2f}x"
        )
    print("(one request = templates, keys and v* once, then the update and scoring per mode)")


if __name__ == "__main__":
    main()
