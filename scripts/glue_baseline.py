"""GLUE baseline of a model, log-prob scoring with and without contextual calibration.

    python scripts/glue_baseline.py [--model smollm2-135m] [--limit 200]

Prints accuracy, F1 and MCC per task (the bundled 200-row subsets, label-balanced
heads when --limit is smaller), and the share of examples given the majority
prediction, for ``--glue-calibration none`` and ``contextual``.
"""

from __future__ import annotations

import argparse
from collections import Counter

from evals.glue import TASKS, evaluate_glue
from rome import load_model


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--limit", type=int, default=200)
    args = ap.parse_args()
    lm = load_model(args.model, device="cpu")
    print(f"{'task':6s}{'calibration':>13s}{'acc':>7s}{'F1':>7s}{'MCC':>7s}{'one class':>11s}")
    for task in TASKS:
        for cal in ("none", "contextual"):
            r = evaluate_glue(lm.model, lm.tokenizer, [task], args.limit, calibration=cal)[task]
            top = Counter(r.predictions).most_common(1)[0][1] / r.n
            print(f"{task:6s}{cal:>13s}{r.accuracy:7.3f}{r.f1:7.3f}{r.mcc:7.3f}{top:11.2f}")


if __name__ == "__main__":
    main()
