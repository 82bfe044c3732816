"""Choose the bundled CounterFact sample: records the embedded model knows.

A record qualifies when, on its edit prompt (subject written in), the model
gives the true object a lower mean per-token NLL than the counterfactual one
(p(true) > p(new), targets scored with a leading space), and the record loads
cleanly. A seeded random choice of ``--n`` qualified records is written,
unchanged and in file order, in the input's own format.

    python scripts/choose_counterfact_sample.py \\
        --source ../shared/data/counterfact/counterfact-val.json \\
        --out evals/data/counterfact/sample.json --n 200 --seed 0

``--keep FILE`` keeps the records of an earlier sample first, in its order
(so runs made on it replay the same sequence), and adds a seeded choice of
the other qualified records after them, in file order.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from evals.counterfact import parse_record  # noqa: E402
from rome.scoring import score_targets  # noqa: E402


def load(model_path: str | None):
    """(model, tokenizer): the engine's loader, or a local converted copy."""
    if model_path is None:
        try:
            from rome.models import load_model

            lm = load_model("smollm2-135m")
            return lm.model, lm.tokenizer
        except ImportError:
            sys.exit("rome.models is not available: pass --model-path")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32).eval()
    return model, AutoTokenizer.from_pretrained(model_path)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--source", default="../shared/data/counterfact/counterfact-val.json")
    ap.add_argument("--out", default="evals/data/counterfact/sample.json")
    ap.add_argument("--n", type=int, default=200)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--model-path", default=None, help="local model dir (default: smollm2-135m)")
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--keep", default=None, help="an earlier sample to keep first")
    args = ap.parse_args()

    rows = json.loads(Path(args.source).read_text(encoding="utf-8"))
    usable = []
    for i, raw in enumerate(rows):
        try:
            usable.append((raw, parse_record(raw, i)))
        except ValueError as err:
            print(f"case {raw.get('case_id')}: not loadable ({err})")
    model, tok = load(args.model_path)
    t0 = time.perf_counter()
    prompts = [rec.text for _, rec in usable]
    with torch.no_grad():
        new = score_targets(model, tok, prompts, [r.target_new for _, r in usable], args.batch_size)
        true = score_targets(
            model, tok, prompts, [r.target_true for _, r in usable], args.batch_size
        )
    known = [
        raw for (raw, _), n, t in zip(usable, new, true, strict=True) if t.mean_nll < n.mean_nll
    ]
    print(
        f"{len(rows)} records, {len(usable)} loadable, {len(known)} known "
        f"(p_true > p_new) [{time.perf_counter() - t0:.1f} s scoring]"
    )
    if len(known) < args.n:
        sys.exit(f"only {len(known)} qualified records, fewer than --n {args.n}")
    kept: list = []
    if args.keep:
        kept = json.loads(Path(args.keep).read_text(encoding="utf-8"))
        known_ids = {r["case_id"] for r in known}
        missing = [r["case_id"] for r in kept if r["case_id"] not in known_ids]
        if missing:
            sys.exit(f"kept records no longer qualify: {missing[:10]}")
    kept_ids = {r["case_id"] for r in kept}
    rest = [r for r in known if r["case_id"] not in kept_ids]
    chosen_ids = {id(r) for r in random.Random(args.seed).sample(rest, args.n - len(kept))}
    chosen = kept + [r for r in rows if id(r) in chosen_ids]  # file order, records unchanged
    Path(args.out).write_text(json.dumps(chosen, indent=4, ensure_ascii=True) + "\n")
    print(f"wrote {len(chosen)} records to {args.out}")


if __name__ == "__main__":
    main()
