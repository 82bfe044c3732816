"""Layer sweep on real CounterFact records: edit and paraphrase success per layer.

For each layer and record, v* is computed once; the rank-one update is then
built for ``original`` and for ``rrome`` with ``uniform`` and ``grouped`` key
averaging, applied for a moment, and scored: ES (p_new > p_true on the bare
prompt), templated efficacy (mean over the prefixed prompts), PS (on the
paraphrase), NS (neighbourhood keeps its true answer). Prints one table.

    python scripts/layer_sweep.py --layers 3,5,7,9 --n 20 [--hparams FILE]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from evals.counterfact import load_counterfact
from rome import Editor, load_model
from rome.keys import average_keys, keys_at_subject
from rome.scoring import score_targets
from rome.update import add_update, rank_one, restore
from rome.vstar import compute_v_star

VARIANTS = ("original/uniform", "rrome/uniform", "rrome/grouped")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--hparams", default=None)
    ap.add_argument("--layers", default="3,5,7,9")
    ap.add_argument("--n", type=int, default=20)
    args = ap.parse_args()
    lm = load_model(args.model, hparams=args.hparams)
    records = load_counterfact("sample", limit=args.n).records
    print(f"{lm.name}: {len(records)} bundled CounterFact records", flush=True)
    header = (
        f"{'layer':>5s} {'variant':18s}{'ES':>6s}{'ES-tpl':>8s}{'PS':>6s}{'NS':>6s}{'|dW|':>8s}"
    )
    rows = []
    for layer in [int(x) for x in args.layers.split(",")]:
        hp = lm.hparams.replace(layer=layer)
        ed = Editor(lm.model, lm.tokenizer, hp)
        ed.prepare(layer)
        templates = ed.templates()
        module = ed.module(layer)
        factor = ed.factor(layer)
        stats: dict[str, list[tuple[float, float, float, float, float]]] = {v: [] for v in VARIANTS}
        t0 = time.perf_counter()
        for rec in records:
            req = rec.to_request()
            prompts = [t.format(req.prompt) for t in templates]
            keys = keys_at_subject(
                lm.model, lm.tokenizer, hp.weight_module(layer), prompts, req.subject
            )
            vs = compute_v_star(lm.model, lm.tokenizer, hp, req, templates, layer)
            k_s = keys[0]
            for variant in VARIANTS:
                mode, averaging = variant.split("/")
                k_star = average_keys(keys, averaging)
                k_u, k_v = (k_star, k_s) if mode == "original" else (k_star, k_star)
                r1 = rank_one(module, factor, k_u, k_v, vs.v_star)
                saved = add_update(module, r1.u, r1.v)
                try:
                    stats[variant].append(score(lm, rec, templates) + (r1.norm,))
                finally:
                    restore(module, saved)
        for variant in VARIANTS:
            cols = list(zip(*stats[variant], strict=True))
            means = [statistics.mean(c) for c in cols]
            cells = "".join(f"{m:6.2f}" for m in means[:4]) + f"{means[4]:8.1f}"
            rows.append(f"{layer:5d} {variant:18s}{cells}")
        print(header if len(rows) == len(VARIANTS) else "", flush=True)
        print(
            "\n".join(rows[-len(VARIANTS) :]), f"   ({time.perf_counter() - t0:.0f} s)", flush=True
        )
    print("\n" + header + "\n" + "\n".join(rows))


@torch.no_grad()
def score(lm, rec, templates) -> tuple[float, float, float, float]:
    bare = rec.text
    tpl = [t.format(rec.prompt).replace("{}", rec.subject, 1) for t in templates[1:]]
    para = rec.paraphrase_prompts[:1]
    neigh = rec.neighborhood_prompts[:1]
    prompts = [bare, *tpl, *para, *neigh]
    s_new = score_targets(lm.model, lm.tokenizer, prompts, [rec.target_new] * len(prompts))
    s_true = score_targets(lm.model, lm.tokenizer, prompts, [rec.target_true] * len(prompts))
    win = [a.mean_nll < b.mean_nll for a, b in zip(s_new, s_true, strict=True)]
    es = float(win[0])
    es_tpl = statistics.mean(win[1 : 1 + len(tpl)])
    ps = float(win[1 + len(tpl)]) if para else float("nan")
    ns = float(not win[-1]) if neigh else float("nan")
    return es, es_tpl, ps, ns


if __name__ == "__main__":
    main()
