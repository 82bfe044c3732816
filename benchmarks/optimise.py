"""The v* loop on the same model, templates and requests: the published per-request structure,
today's fast path, prefix reuse, and prefix reuse with many requests in one optimisation.

A breakdown of the levers, not a comparison with the published code: "published" here is
this project's re-implementation of the published loop's structure, which runs slower
than the published code itself. ``benchmarks/speed.py --reference-src DIR`` times the
published code (kmeng01/rome, rebuilding-rome) beside this project's edit.

  published: ``compute_v_star(fast=False)``: the whole model at every step, logits at
             every position, parameters requiring grad (the published code's structure,
             re-implemented here);
  fast:      ``compute_v_star``: blocks from the edited layer up, logits only where read;
  reuse:     ``optimise_targets``, one request: blocks from the edited layer up over the
             positions from the subject's last token on (the prefix computed once);
  batch B:   ``optimise_targets`` over B requests at once, with prefix reuse;
  padded:    the same with every row padded to the batch's longest suffix
             (``v_length_buckets=False``; the default runs groups of one length each).

Printed per path: v* seconds per request, request-steps per second, tokens the upper
blocks run per request-step, the speed-up over the previous path and over the
published one, and the largest relative δ disagreement with the published path (on
the requests it ran) and with the fast path. ``--edit`` also times a whole ROME edit
(``Editor.compute``) with everything on against the published structure.

    OMP_NUM_THREADS=1 python benchmarks/optimise.py --n 16 --n-fast 4 --n-published 2 \
        --batches 4,16 --padded-batches --edit
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Sequence

import torch

from evals.counterfact import load_counterfact
from rome import Editor, load_model
from rome.hparams import EditHparams
from rome.optimise import optimise_targets
from rome.request import EditRequest
from rome.upper import build_rows
from rome.vstar import VStar, compute_v_star


def tokens_per_step(
    tok, reqs: Sequence[EditRequest], templates: list[str], reuse: bool, buckets: bool
) -> float:
    """Tokens the upper blocks run per request-step (padding included) for one batch."""
    rows = build_rows(tok, reqs, [templates] * len(reqs))
    lens = [len(s) - (c if reuse else 0) for s, c in zip(rows.seqs, rows.subject, strict=True)]
    if not reuse:  # compute_v_star: the rows padded to the longest
        return len(lens) * max(lens) / len(reqs)
    return (sum(lens) if buckets else len(lens) * max(lens)) / len(reqs)


def run_path(
    lm, hp, reqs, templates, path: str, batch: int = 1
) -> tuple[float, float, list[VStar]]:
    """(wall seconds, CPU seconds of this process, results)."""
    t0, c0 = time.perf_counter(), time.process_time()
    out: list[VStar] = []
    if path in ("published", "fast"):
        for r in reqs:
            out.append(
                compute_v_star(
                    lm.model, lm.tokenizer, hp, r, templates, hp.layer, fast=path == "fast"
                )
            )
    else:
        for i in range(0, len(reqs), batch):
            chunk = reqs[i : i + batch]
            out += optimise_targets(
                lm.model, lm.tokenizer, hp, chunk, [templates] * len(chunk), hp.layer
            )
    return time.perf_counter() - t0, time.process_time() - c0, out


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30))


PathSpec = tuple[str, str, int, list[EditRequest], EditHparams]  # label, path, batch, requests, hp
Results = dict[str, tuple[float, list[VStar], int]]  # label: seconds compared, results, requests


def parse_args() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--n", type=int, default=16, help="requests for fast / reuse / batches")
    ap.add_argument(
        "--n-published", type=int, default=2, help="requests for the published path (0: skip)"
    )
    ap.add_argument(
        "--n-fast", type=int, default=None, help="requests for the fast path (default --n; 0: skip)"
    )
    ap.add_argument("--batches", default="16", help="comma-separated batch sizes (e.g. 16,100)")
    ap.add_argument("--edit", action="store_true", help="also time whole edits (Editor.compute)")
    ap.add_argument(
        "--clock",
        choices=("cpu", "wall"),
        default="cpu",
        help="seconds compared: this process's CPU time (one thread) or wall time (threads)",
    )
    ap.add_argument(
        "--padded-batches", action="store_true", help="also each batch with padded rows"
    )
    return ap.parse_args()


def plan(args: argparse.Namespace, hp: EditHparams, reqs: list[EditRequest]) -> list[PathSpec]:
    """The paths to time, in the printed order; those given no requests left out."""
    batches = [int(b) for b in args.batches.split(",") if b]
    padded = hp.replace(v_length_buckets=False)
    n_fast = len(reqs) if args.n_fast is None else args.n_fast
    paths: list[PathSpec] = [
        ("published", "published", 1, reqs[: args.n_published], hp),
        ("fast", "fast", 1, reqs[:n_fast], hp),
        ("reuse padded", "reuse", 1, reqs, padded),
        ("reuse", "reuse", 1, reqs, hp),
    ]
    paths = [p for p in paths if p[3]]
    for b in batches:
        if args.padded_batches:
            paths.append((f"batch {b} padded", "reuse", b, reqs, padded))
        paths.append((f"reuse+batch {b}", "reuse", b, reqs, hp))
    return paths


def measure(
    lm, paths: list[PathSpec], templates: list[str], clock: str
) -> tuple[Results, dict[str, float]]:
    """Each path run once: (the seconds ``clock`` compares, results, requests) per label, and
    the wall seconds per request."""
    results: Results = {}
    walls: dict[str, float] = {}
    for label, path, batch, rs, php in paths:
        wall, secs, out = run_path(lm, php, rs, templates, path, batch)
        results[label] = (wall if clock == "wall" else secs, out, len(rs))
        walls[label] = wall / len(rs)
    return results, walls


def print_table(
    tok, paths: list[PathSpec], templates: list[str], results: Results, walls: dict[str, float]
) -> None:
    """One row per path: speed, tokens per step, speed-ups and δ agreement."""
    pub = results["published"][1] if "published" in results else []
    fast = results["fast"][1] if "fast" in results else []
    print(
        f"\n{'path':16s}{'requests':>9s}{'s/request':>11s}{'steps/s':>9s}{'tokens/step':>12s}"
        f"{'vs prev':>9s}{'vs publ.':>9s}{'max dδ publ.':>14s}{'max dδ fast':>13s}{'steps eq':>9s}"
        f"{'wall s/req':>11s}"
    )
    prev = None
    for label, path, batch, rs, php in paths:
        secs, out, n = results[label]
        per = secs / n
        steps = sum(v.steps for v in out)
        tps = (
            sum(
                tokens_per_step(
                    tok, rs[i : i + batch], templates, path == "reuse", php.v_length_buckets
                )
                * len(rs[i : i + batch])
                for i in range(0, n, batch)
            )
            / n
        )
        d_pub = max((rel(a.delta, b.delta) for a, b in zip(out, pub, strict=False)), default=0)
        d_fast = max((rel(a.delta, b.delta) for a, b in zip(out, fast, strict=False)), default=0)
        same = sum(a.steps == b.steps for a, b in zip(out, fast, strict=False))
        ratio = f"{prev / per:8.2f}x" if prev else f"{'':9s}"
        if pub:
            pub_per = results["published"][0] / results["published"][2]
            vs_pub = f"{pub_per / per:8.2f}x"
        else:
            vs_pub = f"{'-':>9s}"
        print(
            f"{label:16s}{n:9d}{per:11.2f}{steps / secs:9.2f}{tps:12.0f}{ratio}"
            f"{vs_pub}{d_pub:14.1e}{d_fast:13.1e}{same:>5d}/{min(n, len(fast)):<3d}"
            f"{walls[label]:11.2f}"
        )
        prev = per


def main() -> None:
    args = parse_args()
    lm = load_model(args.model, device="cpu")
    hp = lm.hparams
    ed = Editor(lm.model, lm.tokenizer, hp)
    templates = ed.templates()
    reqs = [r.to_request() for r in load_counterfact("sample", limit=args.n).records]
    paths = plan(args, hp, reqs)
    print(
        f"model {lm.name} ({lm.dtype}), layer {hp.layer}, {len(templates)} templates, "
        f"{len(reqs)} requests, {hp.v_num_grad_steps} steps max, "
        f"{torch.get_num_threads()} thread(s)"
    )
    run_path(lm, hp, reqs[:1], templates[:3], "reuse")  # warm-up
    results, walls = measure(lm, paths, templates, args.clock)
    print(
        f"\nseconds compared: {args.clock} (--clock). CPU seconds of this process\n"
        "(time.process_time): with one thread a shared machine's load does not enter them;\n"
        "with more threads use --clock wall on an otherwise idle machine"
    )
    print_table(lm.tokenizer, paths, templates, results, walls)
    if args.edit:
        edit_times(lm, reqs[: args.n_published])


def edit_times(lm, reqs: list[EditRequest]) -> None:
    """A whole ROME edit (keys, v*, update, scoring) with everything on vs the published
    structure, on the same requests; templates and covariance prepared beforehand."""
    ed = Editor(lm.model, lm.tokenizer, lm.hparams)
    ed.prepare()
    out = {}
    for fast in (False, True):
        t0 = time.process_time()
        for r in reqs:
            ed.compute(r, fast=fast)
        out[fast] = (time.process_time() - t0) / len(reqs)
    print(
        f"\nwhole edit (Editor.compute, rrome, CPU s): re-implemented published structure "
        f"{out[False]:.2f} s, "
        f"fast + prefix reuse {out[True]:.2f} s: {out[False] / out[True]:.2f}x"
    )


if __name__ == "__main__":
    main()
