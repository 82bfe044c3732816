"""Sweep of UltraEdit's modules, layers and lr on SmolLM2 (real CounterFact records).

For each setting, a fresh editor edits the first ``--n`` bundled CounterFact records
(records SmolLM2 knows) in ``--steps`` consecutive batches (the lifelong normaliser
carried from one to the next, as in a replay), then scores every edited record and
gives the weights back. ES = target_new beats target_true on the edit prompt, PS on
the paraphrases, NS = the neighbourhood prompts keep their true answer; |dW|/|W| the
relative change of the edited weights after all steps (mean over the layers); ppl the
perplexity of the bundled held-out text (its first ``--ppl-tokens`` tokens).

    python scripts/ultraedit_sweep.py --modules gate_up,mlp_out --ranges 19-27,11-18 \\
        --lrs 1e-4,1e-3,1e-2 --n 40 --steps 2
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from typing import Any

import torch

from evals.counterfact import load_counterfact
from evals.probes import heldout_ids, perplexity
from rome import Editor, load_model, load_preset
from rome.methods.ultraedit import MODULES
from rome.scoring import score_targets


def score(lm: Any, records: list[Any]) -> tuple[float, float, float]:
    prompts, kinds = [], []
    for rec in records:
        for kind, ps in (
            ("es", [rec.text]),
            ("ps", rec.paraphrase_prompts),
            ("ns", rec.neighborhood_prompts),
        ):
            prompts += [(p, rec) for p in ps]
            kinds += [kind] * len(ps)
    texts = [p for p, _ in prompts]
    s_new = score_targets(lm.model, lm.tokenizer, texts, [r.target_new for _, r in prompts])
    s_true = score_targets(lm.model, lm.tokenizer, texts, [r.target_true for _, r in prompts])
    out: dict[str, list[float]] = {"es": [], "ps": [], "ns": []}
    for kind, a, b in zip(kinds, s_new, s_true, strict=True):
        win = a.mean_nll < b.mean_nll
        out[kind].append(float(not win) if kind == "ns" else float(win))
    return statistics.mean(out["es"]), statistics.mean(out["ps"]), statistics.mean(out["ns"])


def ppl_of(lm: Any, tokens: int) -> float:
    if not tokens:
        return float("nan")
    return perplexity(lm.model, lm.tokenizer, heldout_ids(lm.tokenizer)[:tokens]).perplexity


def run(lm: Any, hp: Any, records: list[Any], steps: int, ppl_tokens: int) -> str:
    ed = Editor(lm.model, lm.tokenizer, hp)
    names = {
        x: [hp.weight_module(x) if m == "mlp_out" else f"{hp.layers_module}.{x}.{m}" for m in mods]
        for x in hp.edited_layers()
        for mods in [MODULES[hp.method_settings["ultraedit"]["modules"]]]
    }
    w0 = {
        x: sum(float(lm.model.get_submodule(n).weight.float().norm()) ** 2 for n in ns) ** 0.5
        for x, ns in names.items()
    }
    t0 = time.perf_counter()
    size = -(-len(records) // steps)
    for i in range(0, len(records), size):
        reqs = [r.to_request() for r in records[i : i + size]]
        ed.apply_step(ed.edit(reqs, "ultraedit"), force=True)
    seconds = time.perf_counter() - t0
    es, ps, ns = score(lm, records)
    rel = statistics.mean(ed.drift(x)[0] / w0[x] for x in ed.edited_layers)
    ppl = ppl_of(lm, ppl_tokens)
    ed.revert_all()
    return f"{es:.2f} | {ps:.2f} | {ns:.2f} | {rel:.4f} | {ppl:.1f} | {seconds:.0f}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--modules", default="gate_up,mlp_out")
    ap.add_argument("--ranges", default="19-27,11-18")
    ap.add_argument("--lrs", default="1e-4,1e-3,1e-2")
    ap.add_argument("--n", type=int, default=40)
    ap.add_argument("--steps", type=int, default=2)
    ap.add_argument("--ppl-tokens", type=int, default=512)
    args = ap.parse_args()
    torch.set_grad_enabled(False)
    lm = load_model("smollm2-135m")
    records = load_counterfact("sample", limit=args.n).records
    base = load_preset("smollm2-135m")
    es, ps, ns = score(lm, records)
    ppl = ppl_of(lm, args.ppl_tokens)
    print(f"base model: ES {es:.2f} PS {ps:.2f} NS {ns:.2f} ppl {ppl:.1f}", flush=True)
    print("| modules | layers | lr | ES | PS | NS | \\|dW\\|/\\|W\\| | ppl | s |")
    print("|---|---|---|---|---|---|---|---|---|")
    for mods in args.modules.split(","):
        for rng in args.ranges.split(","):
            lo, hi = (int(x) for x in rng.split("-"))
            for lr in (float(x) for x in args.lrs.split(",")):
                hp = base.replace(
                    method="ultraedit",
                    layers=list(range(lo, hi + 1)),
                    layer=hi,
                    method_settings={"ultraedit": {"modules": mods, "lr": lr}},
                )
                row = run(lm, hp, records, args.steps, args.ppl_tokens)
                print(f"| {mods} | {lo}–{hi} | {lr:g} | {row} |", flush=True)
    sys.stdout.flush()


if __name__ == "__main__":
    main()
