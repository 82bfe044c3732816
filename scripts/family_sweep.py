"""Sweep of the family's edited-layer range and λ on real CounterFact records (one batch).

For each layer range and λ, MEMIT edits ``--n`` bundled CounterFact records
(records SmolLM2 knows) as one batch; the update is applied, scored and undone.
z depends only on the range's last layer, so it is computed once per z-layer
and reused. Also scored: AlphaEdit on each range (the preset's threshold and
L2) and EMMET on the single last layer of each range for each ``--emmet-w``.
ES = target_new beats target_true on the edit prompt, PS on the paraphrase, NS
= the neighbourhood prompt keeps its true answer; |dW|/|W| the mean over the
edited layers; resid = ‖z − cur_z‖ after the edit over ‖z − target_init‖.

    python scripts/family_sweep.py --ranges 4-6,3-7,5-7 --lambdas 1e3,1e4,1.5e4 --n 12
"""

from __future__ import annotations

import argparse
import hashlib
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch

import rome.methods.family.loop as loop
from evals.counterfact import load_counterfact
from rome import Editor, load_model, load_preset
from rome.methods import get_method
from rome.methods.family import family_templates, use_templates
from rome.scoring import score_targets
from rome.update import weight_out_in


def cached_z(folder: Path | None) -> None:
    """Compute z once per (z-layer, requests, templates): every λ and method reuses it,
    and a rerun with ``--z-cache DIR`` reads it from disk."""
    memo: dict[Any, Any] = {}
    compute = loop.compute_zs

    def wrapped(model, tok, reqs, templates, layer, block, hp, cb=None):  # type: ignore[no-untyped-def]
        key = (layer, tuple(reqs), tuple(templates))
        digest = hashlib.sha256(repr(key).encode()).hexdigest()[:16]
        path = folder / f"z_{layer}_{digest}.pt" if folder is not None else None
        if key not in memo and path is not None and path.is_file():
            memo[key] = torch.load(path, weights_only=False)
        if key not in memo:

            def tick(done: int, total: int) -> None:
                print(f"  z at layer {layer}: {done}/{total}", file=sys.stderr, flush=True)

            memo[key] = compute(model, tok, reqs, templates, layer, block, hp, tick)
            if path is not None:
                path.parent.mkdir(parents=True, exist_ok=True)
                torch.save(memo[key], path)
        return memo[key]

    loop.compute_zs = wrapped  # type: ignore[assignment]


@torch.no_grad()
def score(lm: Any, records: list[Any]) -> tuple[float, float, float]:
    prompts, kinds = [], []
    for rec in records:
        for kind, ps in (
            ("es", [rec.text]),
            ("ps", rec.paraphrase_prompts),
            ("ns", rec.neighborhood_prompts),
        ):
            for p in ps:
                prompts.append((p, rec))
                kinds.append(kind)
    s_new = score_targets(
        lm.model, lm.tokenizer, [p for p, _ in prompts], [r.target_new for _, r in prompts]
    )
    s_true = score_targets(
        lm.model, lm.tokenizer, [p for p, _ in prompts], [r.target_true for _, r in prompts]
    )
    out = {"es": [], "ps": [], "ns": []}  # type: dict[str, list[float]]
    for kind, a, b in zip(kinds, s_new, s_true, strict=True):
        win = a.mean_nll < b.mean_nll
        out[kind].append(float(not win) if kind == "ns" else float(win))
    return statistics.mean(out["es"]), statistics.mean(out["ps"]), statistics.mean(out["ns"])


def run(lm: Any, ed: Editor, method: str, reqs: list[Any], records: list[Any], **opts: Any) -> str:
    t0 = time.perf_counter()
    upd = ed.edit(reqs, method, **opts)
    ratios = [
        lu.norm / float(weight_out_in(ed.module(lu.layer)).detach().float().norm())
        for lu in upd.layers
    ]
    resid = statistics.mean(r["residual_after"] / max(r["delta_norm"], 1e-9) for r in upd.records)
    ed.apply_step(upd, force=True)
    try:
        es, ps, ns = score(lm, records)
    finally:
        ed.undo()
    extra = ""
    if method == "alphaedit":
        extra = " kept " + "/".join(str(x["kept_directions"]) for x in upd.options["per_layer"])
    return (
        f"{es:6.2f}{ps:6.2f}{ns:6.2f}{statistics.mean(ratios):9.4f}{resid:7.2f}"
        f"   ({time.perf_counter() - t0:.0f} s){extra}"
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--preset", default="smollm2-135m-memit")
    ap.add_argument("--ranges", default="4-6,3-7,5-7")
    ap.add_argument("--lambdas", default="1e3,1e4,1.5e4")
    ap.add_argument("--emmet-w", default="1,1000")
    ap.add_argument("--n", type=int, default=12)
    ap.add_argument("--z-cache", type=Path, default=None, help="folder keeping z between runs")
    args = ap.parse_args()
    lm = load_model(args.model)
    records = load_counterfact("sample", limit=args.n).records
    reqs = [r.to_request() for r in records]
    cached_z(args.z_cache)
    es, ps, ns = score(lm, records)
    print(
        f"{lm.name}: {len(records)} records, one batch. "
        f"Base model: ES {es:.2f} PS {ps:.2f} NS {ns:.2f}"
    )
    print(
        f"{'method':10s}{'layers':>8s}{'setting':>12s}{'ES':>6s}{'PS':>6s}{'NS':>6s}{'|dW|/|W|':>9s}{'resid':>7s}",
        flush=True,
    )
    base = load_preset(args.preset)
    l2 = get_method("alphaedit").settings(base).alphaedit_l2
    mu = get_method("emmet").settings(base).emmet_lambda
    templates: list[str] | None = None
    for rng in args.ranges.split(","):
        lo, hi = (int(x) for x in rng.split("-"))
        layers = list(range(lo, hi + 1))
        ed = Editor(lm.model, lm.tokenizer, base.replace(layers=layers, layer=hi))
        if templates is None:
            templates = family_templates(ed)
        else:
            use_templates(ed, templates)
        for lam in (float(x) for x in args.lambdas.split(",")):
            row = run(lm, ed, "memit", reqs, records, mom2_update_weight=lam)
            print(f"{'memit':10s}{rng:>8s}{f'λ {lam:g}':>12s}{row}", flush=True)
        row = run(lm, ed, "alphaedit", reqs, records)
        print(
            f"{'alphaedit':10s}{rng:>8s}{f'L2 {l2:g}':>12s}{row}",
            flush=True,
        )
        one = Editor(lm.model, lm.tokenizer, base.replace(layers=[hi], layer=hi))
        use_templates(one, templates)
        for w in (float(x) for x in args.emmet_w.split(",")):
            row = run(lm, one, "emmet", reqs, records, mom2_update_weight=w)
            print(
                f"{'emmet':10s}{hi:>8d}{f'w {w:g} μ {mu:g}':>12s}{row}",
                flush=True,
            )


if __name__ == "__main__":
    main()
