"""GLUE baseline of a model, log-prob scoring with and without contextual calibration.

    python scripts/glue_baseline.py [--model smollm2-135m] [--limit 200]

Prints accuracy, F1 and MCC per task (the bundled 200-row subsets, label-balanced
heads when --limit is smaller), and the share of examples given the majority
prediction, for ``--glue-calibration none`` and ``contextual``. Each task's label
log-probabilities are computed once; the calibrated prediction subtracts the
content-free log prior from the same scores, exactly as ``predict`` does.
"""

from __future__ import annotations

import argparse
import time
from collections import Counter

from evals.glue import TASKS, content_free_logprior, glue_result, label_logprobs, load_glue, task_of
from rome import load_model


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--limit", type=int, default=200)
    args = ap.parse_args()
    lm = load_model(args.model, device="cpu")
    print(f"model {lm.name}, {args.limit} examples per task, log-prob scoring")
    print(f"{'task':6s}{'calibration':>13s}{'acc':>7s}{'F1':>7s}{'MCC':>7s}{'one class':>11s}")
    for name in TASKS:
        t0 = time.perf_counter()
        task = task_of(name)
        examples = load_glue(task.name, None, args.limit)
        gold = [e.label for e in examples]
        scores = label_logprobs(lm.model, lm.tokenizer, task, examples)
        prior = content_free_logprior(lm.model, lm.tokenizer, task)
        for cal in ("none", "contextual"):
            rows = (
                scores
                if cal == "none"
                else [[x - p for x, p in zip(row, prior, strict=True)] for row in scores]
            )
            pred = [task.labels[max(range(len(s)), key=s.__getitem__)] for s in rows]
            r = glue_result(task.name, gold, pred)
            top = Counter(pred).most_common(1)[0][1] / r.n
            print(f"{task.name:6s}{cal:>13s}{r.accuracy:7.3f}{r.f1:7.3f}{r.mcc:7.3f}{top:11.2f}")
        print(f"{'':6s}({time.perf_counter() - t0:.0f} s)", flush=True)


if __name__ == "__main__":
    main()
