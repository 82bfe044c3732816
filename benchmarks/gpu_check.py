"""One-shot GPU check: GPT-2 XL and GPT-J-6B shapes with random weights, no download.

Builds both models from their configs (GPT-2 XL: 48 layers, width 1600, fp32;
GPT-J-6B: 28 layers, width 4096, bf16) with random weights and the locally
trained tokenizer of ``rome.testing``, and prints one table:

- per key mode, the median seconds of 3 edits (GPT-2 XL in fp32 and with bf16
  autocast in v*; GPT-J in bf16), and v* steps per second;
- covariance tokens per second at the preset layer (fp32 and bf16 forward);
- the seconds of a 20-edit replay on GPT-2 XL (GLUE SST-2 at the start and end);
- the family's z for 100 requests (δ on the block output, 6 templates, all
  steps): seconds per request one at a time over whole sequences (the
  published structure), one at a time with prefix reuse, and all 100 in one
  optimisation with prefix reuse; the ratio of the last to one at a time, and
  the δ agreement of the batch with the whole-sequence path;
- peak GPU memory.

It asserts the update's identity (W + ΔW) k_v + b = v* on the device (fp32 to
1e-4 relative; the bf16 model to 2e-2, the rounding of its weights) and that
the device and the CPU agree on a tiny model's update to 1e-4.

    python benchmarks/gpu_check.py                      # one GPU, < 5 min on an H100
    python benchmarks/gpu_check.py --device cpu --small # small shapes, for CI-like runs
    python benchmarks/gpu_check.py --json-out gpu.json  # the figures as JSON too

Random weights give meaningless text: the figures are timings and identities,
not edit quality. Caches go to a temporary folder (``ROME_WORKBENCH_CACHE``).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from gpu_check_models import TEMPLATES, Shape, build, shapes

REQUESTS = [
    ("{} is located in the city of", "The Eiffel Tower", "Rome", "Paris"),
    ("The capital of {} is", "Japan", "Berlin", "Tokyo"),
    ("{} was written by", "Hamlet", "Charles Dickens", "William Shakespeare"),
]
MODES = ("original", "rrome", "prompt")
T0 = time.perf_counter()


def note(what: str) -> None:
    """Progress on stderr, so a slow phase shows where it is."""
    sys.stderr.write(f"[{time.perf_counter() - T0:7.1f} s] {what}\n")
    sys.stderr.flush()


def texts(n: int, seed: int = 0) -> list[str]:
    from rome.testing import _CORPUS

    words = _CORPUS.split()
    rng = random.Random(seed)
    return [" ".join(rng.choice(words) for _ in range(rng.randint(40, 120))) for _ in range(n)]


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def covariance_rate(lm, forward: str, n_texts: int, batch_tokens: int) -> tuple[float, Any]:
    from rome import covariance as cov

    module = lm.hparams.weight_module(lm.hparams.layer)
    sync(lm.device)
    t0 = time.perf_counter()
    ms = cov.collect_moment_sum(
        lm.model,
        lm.tokenizer,
        module,
        texts(n_texts),
        n_texts,
        max_len=128,
        batch_tokens=batch_tokens,
        forward=forward,
    )
    sync(lm.device)
    seconds = time.perf_counter() - t0
    return ms.n_tokens / seconds, ms


def identity_error(lm, res) -> float:
    """‖(W + ΔW) k_v + b − v*‖ / ‖v*‖ with the update applied (on the device)."""
    from rome.nethook import get_module

    module = get_module(lm.model, res.weight_name)
    w = module.weight
    with torch.no_grad():
        out = module(res.k_v.to(w.device, w.dtype).unsqueeze(0)).float().squeeze(0)
    v_star = res.v_star.to(out.device).float()
    return float((out - v_star).norm() / v_star.norm())


def edits(
    lm, autocast: str | None, cov_matrix: torch.Tensor, n: int, steps: int | None = None
) -> dict[str, Any]:
    """Median of ``n`` edits per key mode, v* steps/s, and the identity after each."""
    from rome import Editor, EditRequest

    hp = lm.hparams.replace(v_autocast=autocast)
    if steps is not None:
        hp = hp.replace(v_num_grad_steps=steps)
    ed = Editor(lm.model, lm.tokenizer, hp, cache_dir=None, templates=TEMPLATES)
    ed.set_covariance(hp.layer, cov_matrix, "collected by this check")
    reqs = [EditRequest(*REQUESTS[i % len(REQUESTS)]) for i in range(n)]
    ed.compute(reqs[0], "rrome")  # warm-up (kernels, allocator)
    out: dict[str, Any] = {}
    worst = 0.0
    for mode in MODES:
        secs, rates = [], []
        for req in reqs:
            sync(lm.device)
            t0 = time.perf_counter()
            res = ed.compute(req, mode)
            sync(lm.device)
            secs.append(time.perf_counter() - t0)
            rates.append(len(res.v_star_trace) / max(res.timings.get("v_star", 0.0), 1e-9))
            ed.apply(res, force=True)
            worst = max(worst, identity_error(lm, res))
            ed.undo()
        out[mode] = {
            "median_s": statistics.median(secs),
            "vstar_steps_per_s": statistics.median(rates),
        }
    out["identity_rel_err"] = worst
    return out


SUBJECTS = ("The Eiffel Tower", "Japan", "Hamlet", "Danielle Darrieux", "Toyota", "BBC One",
            "Mount Everest", "The Louvre", "Apple", "Barack Obama")  # fmt: skip
RELATIONS = ("{} is located in the city of", "The capital of {} is", "{} was written by",
             "The mother tongue of {} is", "{} is owned by")  # fmt: skip
TARGETS = ("Rome", "Berlin", "Charles Dickens", "English", "Sega", "Paris", "London")


def z_requests(n: int) -> list[Any]:
    """``n`` distinct requests (subject × relation), the targets cycling."""
    from rome import EditRequest

    pairs = [(r, s) for s in SUBJECTS for r in RELATIONS]
    return [
        EditRequest(pairs[i % len(pairs)][0], pairs[i % len(pairs)][1], TARGETS[i % len(TARGETS)])
        for i in range(n)
    ]


def z_levers(lm, n_batch: int, n_single: int, steps: int | None) -> dict[str, Any]:
    """The family's z (δ on the block output of the preset layer) for ``n_batch`` requests:
    one request at a time over whole sequences (the published structure), one at a time
    with prefix reuse, and all ``n_batch`` in one optimisation with prefix reuse. The
    one-at-a-time paths run ``n_single`` requests (seconds per request)."""
    from rome.optimise import optimise_targets

    hp = lm.hparams.replace(v_stop="loss", v_early_stop_loss=0.0)  # every request: all steps
    if steps is not None:
        hp = hp.replace(v_num_grad_steps=steps)
    block = f"{hp.layers_module}.{hp.layer}"
    reqs = z_requests(n_batch)
    templates = TEMPLATES[:6]

    def run(rs: list[Any], reuse: bool) -> tuple[float, list[Any]]:
        sync(lm.device)
        t0 = time.perf_counter()
        out = optimise_targets(
            lm.model, lm.tokenizer, hp, rs, [templates] * len(rs), hp.layer,
            hook_module_name=block, prefix_reuse=reuse,
        )  # fmt: skip
        sync(lm.device)
        return time.perf_counter() - t0, out

    run(reqs[:1], True)  # warm-up
    whole = [run([r], False) for r in reqs[:n_single]]
    reuse = [run([r], True) for r in reqs[:n_single]]
    t_batch, batched = run(reqs, True)
    per_whole = sum(t for t, _ in whole) / n_single
    per_reuse = sum(t for t, _ in reuse) / n_single
    per_batch = t_batch / n_batch
    agree = max(
        float((b.delta - w[1][0].delta).float().norm() / w[1][0].delta.float().norm())
        for b, w in zip(batched, whole, strict=False)
    )
    return {
        "requests": n_batch,
        "steps": hp.v_num_grad_steps,
        "s_per_request_whole": per_whole,
        "s_per_request_reuse": per_reuse,
        "s_per_request_batch": per_batch,
        "batch_seconds": t_batch,
        "reuse_vs_whole": per_whole / per_reuse,
        "batch_vs_one_at_a_time": per_reuse / per_batch,
        "batch_vs_whole": per_whole / per_batch,
        "delta_rel_diff_batch_vs_whole": agree,
    }


def tiny_agreement(device: torch.device) -> float | None:
    """Max relative difference of (u, v) for one edit on tiny-gpt2: ``device`` vs the CPU."""
    if device.type == "cpu":
        return None
    from rome import Editor, EditRequest, load_model

    req = EditRequest(*REQUESTS[0])
    found = []
    c = None
    for dev in ("cpu", str(device)):
        lm = load_model("tiny-gpt2", device=dev)
        if c is None:
            g = torch.Generator().manual_seed(0)
            a = torch.randn(256, 256, generator=g, dtype=torch.float64)
            c = (a @ a.T / 256 + torch.eye(256, dtype=torch.float64)).float()
        ed = Editor(lm.model, lm.tokenizer, lm.hparams, cache_dir=None, templates=TEMPLATES[:5])
        ed.set_covariance(lm.hparams.layer, c, "fixed")
        res = ed.compute(req, "original")
        found.append((res.u.cpu().double(), res.v.cpu().double()))
    (u0, v0), (u1, v1) = found
    return max(
        float((u1 - u0).abs().max() / u0.abs().max()), float((v1 - v0).abs().max() / v0.abs().max())
    )


def replay_seconds(
    lm, cov_matrix: torch.Tensor, n_edits: int, glue_limit: int, steps: int | None = None
) -> dict[str, Any]:
    """A replay of ``n_edits`` CounterFact edits (GLUE SST-2 at the start and the end)."""
    from evals.replay import EditDone, ReplayConfig, ReplayFinished, replay
    from rome import Editor
    from rome import covariance as cov
    from workbench.store import Store

    ed = Editor(lm.model, lm.tokenizer, lm.hparams)
    path = ed.stats_file(lm.hparams.layer)
    assert path is not None
    meta = cov.StatsMeta(lm.hparams.model, lm.hparams.layer, lm.hparams.weight_module(), "sampled",
                         64, 0, 64, "float32")  # fmt: skip
    cov.save_stats(path, cov.SecondMoment(cov_matrix, meta))  # where the replay's editor reads
    cfg = ReplayConfig(
        n_edits=n_edits,
        mode="rrome",
        glue_every=n_edits,
        glue_tasks=("sst2",),
        glue_limit=glue_limit,
        fluency_tokens=16,
    )
    store = Store.open(Path(tempfile.mkdtemp()) / "gpu_check.db")
    sync(lm.device)
    t0 = time.perf_counter()
    done, status = 0, "?"
    hp = lm.hparams.replace(v_num_grad_steps=steps) if steps else lm.hparams
    for ev in replay(lm, store, cfg, hparams=hp):
        if isinstance(ev, EditDone):
            done += 1
        elif isinstance(ev, ReplayFinished):
            status = ev.status
    sync(lm.device)
    return {"seconds": time.perf_counter() - t0, "edits": done, "status": status}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda", help="cuda (default), cuda:N or cpu")
    ap.add_argument("--small", action="store_true", help="small shapes (for a CPU)")
    ap.add_argument("--edits", type=int, default=None, help="edits per key mode (median; 3)")
    ap.add_argument("--replay-edits", type=int, default=None, help="replay length (20)")
    ap.add_argument("--steps", type=int, default=None, help="v* steps (the preset's 20)")
    ap.add_argument("--cov-texts", type=int, default=None, help="texts for the covariance rate")
    ap.add_argument("--z-requests", type=int, default=None, help="z batch (100; 4 --small)")
    ap.add_argument("--json-out", type=Path, default=None)
    return ap.parse_args(argv)


@dataclass
class Sizes:
    """How much work each phase does: the flags, else the defaults of the device."""

    device: torch.device
    on_gpu: bool
    cpu_small: bool
    n_cov: int
    n_cov16: int
    n_edits: int
    n_replay: int
    steps: int | None
    batch_tokens: int
    n_z: int


def sizes(args: argparse.Namespace, device: torch.device) -> Sizes:
    on_gpu = device.type == "cuda"
    n_cov = args.cov_texts or (512 if on_gpu else 48)
    # On a CPU (--small) the same code runs on less work: bf16 matmuls without
    # avx512_bf16 are some 50x slower than fp32 there, so bf16 gets a token run.
    cpu_small = args.small and not on_gpu
    return Sizes(
        device=device,
        on_gpu=on_gpu,
        cpu_small=cpu_small,
        n_cov=n_cov,
        n_cov16=max(4, n_cov // 12) if cpu_small else n_cov,
        n_edits=args.edits or (1 if cpu_small else 3),
        n_replay=args.replay_edits or (5 if cpu_small else 20),
        steps=args.steps or (5 if cpu_small else None),
        batch_tokens=16384 if on_gpu else 2048,
        n_z=args.z_requests or (4 if cpu_small else 100),
    )


def timed_edits(lm, shape: Shape, sz: Sizes, entry: dict[str, Any]) -> torch.Tensor:
    """Covariance rates, then the edits of each run, their identity asserted; returns the
    (well-conditioned) covariance the edits used."""
    note(f"{shape.name}: covariance")
    rate32, ms = covariance_rate(lm, "float32", sz.n_cov, sz.batch_tokens)
    rate16, _ = covariance_rate(lm, "bf16", sz.n_cov16, sz.batch_tokens)
    entry["cov_tokens_per_s"] = {"float32": rate32, "bf16": rate16}
    c = ms.mean()
    c = c + 1e-3 * float(c.diagonal().mean()) * torch.eye(c.shape[0])  # well conditioned
    runs = (
        {"bf16 weights": None}
        if shape.dtype == torch.bfloat16
        else {"fp32": None, "bf16 autocast": "bf16"}
    )
    entry["edits"] = {}
    for label, ac in runs.items():
        note(f"{shape.name}: edits ({label})")
        entry["edits"][label] = edits(lm, ac, c, sz.n_edits, sz.steps)
    for label, e in entry["edits"].items():
        tol = 1e-4 if label == "fp32" else 2e-2
        assert e["identity_rel_err"] < tol, (
            f"{shape.name} {label}: (W+dW)k_v + b != v* ({e['identity_rel_err']:.2e})"
        )
    return c


def check_shape(shape: Shape, sz: Sizes, first: bool) -> dict[str, Any]:
    """Every figure of one model shape (the replay on the first shape only)."""
    t0 = time.perf_counter()
    note(f"{shape.name}: building")
    lm = build(shape, sz.device)
    entry: dict[str, Any] = {
        "layers": shape.n_layer,
        "width": shape.width,
        "dtype": str(shape.dtype).replace("torch.", ""),
        "layer": shape.layer,
        "params_M": sum(p.numel() for p in lm.model.parameters()) / 1e6,
        "build_s": time.perf_counter() - t0,
    }
    c = timed_edits(lm, shape, sz, entry)
    note(f"{shape.name}: z for {sz.n_z} requests (the two levers)")
    entry["z"] = z_levers(lm, sz.n_z, min(sz.n_z, 2 if sz.cpu_small else 10), sz.steps)
    if first:
        note(f"{shape.name}: a {sz.n_replay}-edit replay")
        entry["replay"] = replay_seconds(lm, c, sz.n_replay, 16 if sz.on_gpu else 4, sz.steps)
    if sz.on_gpu:
        entry["peak_gib"] = torch.cuda.max_memory_allocated(sz.device) / 2**30
    return entry


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    os.environ.setdefault("ROME_WORKBENCH_CACHE", tempfile.mkdtemp(prefix="gpu_check_"))

    from rome.devices import resolve_device

    device = resolve_device(args.device)
    sz = sizes(args, device)
    if sz.on_gpu:
        torch.cuda.reset_peak_memory_stats(device)
    t_start = time.perf_counter()
    report: dict[str, Any] = {"device": str(device), "small": args.small, "models": {}}
    report["settings"] = {
        "edits_per_mode": sz.n_edits,
        "replay_edits": sz.n_replay,
        "v_steps": sz.steps,
    }
    if sz.on_gpu:
        report["gpu"] = torch.cuda.get_device_name(device)

    note("tiny-gpt2: device vs CPU")
    agree = tiny_agreement(device)
    report["tiny_device_vs_cpu_rel_diff"] = agree
    if agree is not None:
        assert agree < 1e-4, f"device and CPU disagree on tiny-gpt2: {agree:.2e}"

    for i, shape in enumerate(shapes(args.small)):
        report["models"][shape.name] = check_shape(shape, sz, i == 0)
        if sz.on_gpu:
            torch.cuda.empty_cache()
    report["total_s"] = time.perf_counter() - t_start
    print_table(report)
    if args.json_out:
        args.json_out.write_text(json.dumps(report, indent=1))
    return 0


def print_table(r: dict[str, Any]) -> None:
    w = sys.stdout.write
    gpu = f" ({r['gpu']})" if r.get("gpu") else ""
    w(f"gpu_check on {r['device']}{gpu}{', small shapes' if r['small'] else ''}\n")
    agree = r["tiny_device_vs_cpu_rel_diff"]
    said = "n/a (the device is the CPU)" if agree is None else f"{agree:.1e} (< 1e-4)"
    w(f"tiny-gpt2 update, device vs CPU: {said}\n")
    st = r["settings"]
    w(
        f"median of {st['edits_per_mode']} edit(s) per mode, v* steps "
        f"{st['v_steps'] or 'as the preset (20)'}, replay of {st['replay_edits']} edits\n"
    )
    head = ("model", "run", "mode", "edit s", "v* steps/s", "identity")
    w("{:26s} {:14s} {:9s} {:>8s} {:>11s} {:>9s}\n".format(*head))
    for name, m in r["models"].items():
        for label, e in m["edits"].items():
            for mode in MODES:
                w(
                    f"{name:26s} {label:14s} {mode:9s} {e[mode]['median_s']:8.3f} "
                    f"{e[mode]['vstar_steps_per_s']:11.1f} {e['identity_rel_err']:9.1e}\n"
                )
    head = ("model", "params M", "layer", "cov tok/s fp32", "cov tok/s bf16", "peak GiB")
    w("{:26s} {:>9s} {:>5s} {:>15s} {:>15s} {:>9s}\n".format(*head))
    for name, m in r["models"].items():
        peak = f"{m['peak_gib']:9.1f}" if "peak_gib" in m else f"{'-':>9s}"
        rates = m["cov_tokens_per_s"]
        w(
            f"{name:26s} {m['params_M']:9.0f} {m['layer']:5d} {rates['float32']:15.0f} "
            f"{rates['bf16']:15.0f} {peak}\n"
        )
    head = ("model", "z requests", "whole s/req", "reuse s/req", "batch s/req", "batch vs 1")
    w("{:26s} {:>10s} {:>12s} {:>12s} {:>12s} {:>11s} {:>9s}\n".format(*head, "dδ"))
    for name, m in r["models"].items():
        z = m["z"]
        w(
            f"{name:26s} {z['requests']:10d} {z['s_per_request_whole']:12.3f} "
            f"{z['s_per_request_reuse']:12.3f} {z['s_per_request_batch']:12.3f} "
            f"{z['batch_vs_one_at_a_time']:10.2f}x {z['delta_rel_diff_batch_vs_whole']:9.1e}\n"
        )
    for name, m in r["models"].items():
        if "replay" in m:
            rp = m["replay"]
            w(f"replay on {name}: {rp['edits']} edits in {rp['seconds']:.1f} s ({rp['status']})\n")
    w(f"total {r['total_s']:.0f} s\n")


if __name__ == "__main__":
    sys.exit(main())
