"""Speed against the published code itself: a ROME edit here and in the user's checkout.

    python benchmarks/speed.py --reference-src ~/src/rebuilding-rome --reference-src ~/src/rome
    python benchmarks/speed.py --reference-src ~/src/rebuilding-rome --profile

``--reference-src`` is the user's own checkout of the published ROME code
(scalable-model-editing/rebuilding-rome: r-ROME, compared with this project's
``rrome`` mode; kmeng01/rome: the original, compared with ``original``); it is
imported at run time in a long-lived subprocess (its top-level ``rome``
package would clash with ours), never vendored. Both sides get the same model
(saved to a temporary folder, float32), layer, C (the reference's
``inv_mom2_cache`` is filled with ``torch.inverse(C)``, as its ``get_inv_cov``
computes it), requests and context templates (its ``CONTEXT_TEMPLATES_CACHE``).
The run-time shims are those of ``benchmarks/reference_side.py`` (imported from it).

Edits run interleaved, ours then each reference's, repeat after repeat, so that
load from other processes falls on both sides alike. Printed per thread count
and template count: median wall and CPU seconds per edit on each side, the
ratio, the worst relative difference ‖ΔW − ΔW_ref‖/‖ΔW_ref‖ over the edits,
the v* steps taken, and efficacy (p(target_new) on the bare prompt with the
update applied, measured outside the timing). Ours is ``Editor.compute(req,
mode, probe_after=False)``: it still scores p(target) before the edit (the
``scoring`` phase), which the published code does not. ``--variant`` adds rows
of ours with preset changes that alter the result (``v_stop=most_probable``,
``v_autocast=bf16``): their ΔW agreement and efficacy are in the same table.
``--profile`` prints a torch.profiler breakdown of one of our edits first.
The load (``os.getloadavg``) is printed before and after.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from reference_side import (
    REQUESTS,
    cpu_factories,
    cpu_shim,
    head_name,
    isolate,
    load_reference_model,
    rel,
    z_hparams,
)


# ------------------------------------------------------------------ our side
def load_ours(model_name: str) -> tuple[Any, Any, Any]:
    from rome import load_model

    lm = load_model(model_name, dtype="float32")
    return lm.model, lm.tokenizer, lm.hparams


def reference_hparams(hp: Any, n_layers: int, head: str, kind: str) -> dict[str, Any]:
    """The published ROMEHyperParams for our preset (``kind``: ``rrome`` or ``original``)."""
    out = {
        "layers": [hp.layer],
        **z_hparams(hp, n_layers, head),
        "context_template_length_params": hp.context_template_length_params,
        "mlp_module_tmp": hp.mlp_out_module.rsplit(".", 1)[0],
        "attn_module_tmp": hp.layers_module + ".{}.self_attn",
    }
    if kind == "rrome":
        out.update(
            enable_prompt_keys=False, enable_random_prefix_keys=True, original_implementation=False
        )
    return out


def checkout_kind(src: Path) -> str:
    """``rrome`` for a rebuilding-rome checkout (random-prefix keys), else ``original``."""
    text = (src / "rome" / "rome_hparams.py").read_text()
    return "rrome" if "enable_random_prefix_keys" in text else "original"


class Reference:
    """One published checkout in a long-lived subprocess, driven by JSON lines."""

    def __init__(self, src: Path, work: Path, index: int):
        self.src, self.kind, self.index = src.resolve(), checkout_kind(src), index
        self.name = f"{self.src.name} ({'r-ROME' if self.kind == 'rrome' else 'ROME'})"
        env = dict(os.environ, PYTHONPATH=str(self.src))
        cmd = [sys.executable, str(Path(__file__).resolve()), "--reference-src", str(self.src)]
        cmd += ["--worker", str(work)]
        self.log = open(work / f"reference-{index}.log", "w")  # noqa: SIM115 (closed in close)
        self.proc = subprocess.Popen(
            cmd,
            cwd=self.src,
            env=env,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=self.log,
            text=True,
        )
        self.work = work

    def edit(self, job: dict[str, Any]) -> dict[str, Any]:
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self.proc.stdin.write(json.dumps(job) + "\n")
        self.proc.stdin.flush()
        line = self.proc.stdout.readline()
        if not line:
            self.log.flush()
            tail = (self.work / f"reference-{self.index}.log").read_text()[-3000:]
            raise SystemExit(f"the reference run failed:\n{tail}")
        return json.loads(line)

    def close(self) -> None:
        if self.proc.stdin is not None:
            self.proc.stdin.close()
        self.proc.wait(timeout=60)
        self.log.close()


def prepared(ed: Any) -> Any:
    """The editor with its templates and C⁻¹ factor ready (the reference's are injected)."""
    ed.prepare()
    return ed


def timed_ours(ed: Any, req: Any, mode: str) -> tuple[float, float, Any]:
    t0, c0 = time.perf_counter(), time.process_time()
    res = ed.compute(req, mode=mode, probe_after=False)
    return time.perf_counter() - t0, time.process_time() - c0, res


def efficacy(ed: Any, res: Any) -> float:
    """p(target_new) on the bare prompt with the update applied (then undone)."""
    ed.apply(res, force=True)
    try:
        return float(ed.score_applied(res).p_new_after)
    finally:
        ed.undo()


def delta_of(res: Any) -> torch.Tensor:
    return torch.outer(res.v.double(), res.u.double())


def load_text() -> str:
    one, five, _ = os.getloadavg()
    return f"load average {one:.2f} (1 min), {five:.2f} (5 min) on {os.cpu_count()} CPUs"


# ------------------------------------------------------------------ the run
def parse_variant(text: str) -> tuple[str, dict[str, Any]]:
    """``name:key=value,key=value`` (values JSON, else strings)."""
    name, _, rest = text.partition(":")
    changes: dict[str, Any] = {}
    for item in filter(None, rest.split(",")):
        key, _, value = item.partition("=")
        try:
            changes[key] = json.loads(value)
        except json.JSONDecodeError:
            changes[key] = value
    if not name or not changes:
        raise SystemExit(f"error: --variant {text!r}: use name:key=value[,key=value]")
    return name, changes


def run(args: argparse.Namespace, work: Path) -> list[dict[str, Any]]:
    from rome import Editor, EditRequest

    model, tok, hp = load_ours(args.model)
    hp = hp.replace(v_stop="loss")
    base = Editor(model, tok, hp)
    layer = hp.layer
    all_templates = base.templates()
    c = base.stats(layer).matrix.float()
    model.save_pretrained(work / "model", safe_serialization=True)
    tok.save_pretrained(work / "model")
    torch.save(c, work / "c.pt")
    n_layers = len(base.model.get_submodule(hp.layers_module))
    head = head_name(model)
    refs = [Reference(src, work, i) for i, src in enumerate(args.reference_src)]
    reqs = [EditRequest(p, s, t) for p, s, t in REQUESTS[: args.requests]]
    variants = [parse_variant(v) for v in args.variant]
    rows: list[dict[str, Any]] = []
    try:
        for threads in args.threads:
            for n_templ in args.templates:
                templates = all_templates[:n_templ]
                sides: list[tuple[str, Any, str]] = []  # (label, editor or Reference, mode)
                for ref in refs:
                    sides.append(
                        (
                            f"ours {ref.kind}",
                            prepared(Editor(model, tok, hp, templates=templates)),
                            ref.kind,
                        )
                    )
                    sides.append((ref.name, ref, ref.kind))
                for name, changes in variants:
                    mode = refs[0].kind if refs else "rrome"
                    sides.append(
                        (
                            f"ours {mode} {name}",
                            prepared(
                                Editor(model, tok, hp.replace(**changes), templates=templates)
                            ),
                            mode,
                        )
                    )
                warm = not rows or args.warm_each
                done = run_config(args, sides, reqs, templates, threads, hp, n_layers, head, warm)
                for r in done:  # as they come: a long run that is cut short keeps its rows
                    sys.stdout.write(f"row: {json.dumps(r)}\n")
                sys.stdout.flush()
                rows += done
    finally:
        for ref in refs:
            ref.close()
    return rows


def run_config(
    args: argparse.Namespace,
    sides: list[tuple[str, Any, str]],
    reqs: list[Any],
    templates: list[str],
    threads: int,
    hp: Any,
    n_layers: int,
    head: str,
    warm: bool,
) -> list[dict[str, Any]]:
    """One thread count and template set: with ``warm``, a warm-up edit per side first
    (not recorded); then the repeats, the sides interleaved."""
    torch.set_num_threads(threads)
    stats: dict[str, dict[str, list[Any]]] = {
        label: {"wall": [], "cpu": [], "dw": [], "steps": [], "eff": [], "phases": []}
        for label, _, _ in sides
    }
    for rep in range(-1 if warm else 0, args.repeats):  # rep -1: warm-up, not recorded
        req = reqs[max(rep, 0) % len(reqs)]
        deltas: dict[str, torch.Tensor] = {}
        for label, side, mode in sides:
            if isinstance(side, Reference):
                job = {
                    "threads": threads,
                    "templates": templates,
                    "hparams": reference_hparams(hp, n_layers, head, side.kind),
                    "request": {
                        "prompt": req.prompt,
                        "subject": req.subject,
                        "target_new": {"str": req.target_new},
                    },
                }
                out = side.edit(job)
                wall, cpu = out["wall"], out["cpu"]
                deltas[label] = torch.load(out["delta"])
                steps, eff, phases = out.get("steps"), None, {}
            else:
                wall, cpu, res = timed_ours(side, req, mode)
                deltas[label] = delta_of(res)
                steps, phases = res.v_star_trace and len(res.v_star_trace), res.timings
                eff = efficacy(side, res) if rep >= 0 else None
            if rep >= 0:
                s = stats[label]
                s["wall"].append(wall)
                s["cpu"].append(cpu)
                s["steps"].append(steps)
                s["eff"].append(eff)
                s["phases"].append(phases)
        for label, _, mode in sides:  # agreement with the reference of the same mode
            ref_label = next(
                (lb for lb, sd, md in sides if isinstance(sd, Reference) and md == mode), None
            )
            if rep >= 0 and ref_label is not None and ref_label != label:
                stats[label]["dw"].append(rel(deltas[label], deltas[ref_label]))
    return [summarise(label, threads, len(templates), stats[label]) for label, _, _ in sides]


def summarise(label: str, threads: int, n_templ: int, s: dict[str, list[Any]]) -> dict[str, Any]:
    phases: dict[str, float] = {}
    for p in s["phases"]:
        for k, v in p.items():
            phases[k] = phases.get(k, 0.0) + v / len(s["phases"])
    effs = [e for e in s["eff"] if e is not None]
    return {
        "side": label,
        "threads": threads,
        "templates": n_templ,
        "wall": statistics.median(s["wall"]),
        "cpu": statistics.median(s["cpu"]),
        "n": len(s["wall"]),
        "dw": max(s["dw"]) if s["dw"] else None,
        "steps": "/".join(str(x) for x in s["steps"]),
        "eff": statistics.mean(effs) if effs else None,
        "phases": phases,
    }


def print_table(rows: list[dict[str, Any]]) -> None:
    out = [
        "| threads | templates | side | wall s/edit | CPU s/edit | published / this (wall) "
        "| worst rel ΔW vs published | v* steps | efficacy p(new) |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        ref = next(
            (
                x
                for x in rows
                if x["threads"] == r["threads"]
                and x["templates"] == r["templates"]
                and not x["side"].startswith("ours")
                and r["side"].startswith("ours")
                and x["side"].endswith("r-ROME)") == r["side"].startswith("ours rrome")
            ),
            None,
        )
        ratio = f"{ref['wall'] / r['wall']:.2f}x" if ref else ""
        dw = f"{r['dw']:.1e}" if r["dw"] is not None else ""
        eff = f"{r['eff']:.3f}" if r["eff"] is not None else ""
        out.append(
            f"| {r['threads']} | {r['templates']} | {r['side']} | {r['wall']:.2f} | {r['cpu']:.2f} "
            f"| {ratio} | {dw} | {r['steps']} | {eff} |"
        )
    sys.stdout.write("\n".join(out) + "\n\nour phases (mean wall s per edit):\n")
    for r in rows:
        if r["phases"]:
            ph = ", ".join(f"{k} {v:.2f}" for k, v in r["phases"].items() if v >= 0.005)
            sys.stdout.write(f"  {r['threads']} thr, {r['templates']} templ, {r['side']}: {ph}\n")


def profile(args: argparse.Namespace) -> None:
    """torch.profiler over one whole edit of ours (21 templates, fp32, default stopping)."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as tprofile

    from rome import Editor, EditRequest

    torch.set_num_threads(args.threads[0])
    model, tok, hp = load_ours(args.model)
    ed = Editor(model, tok, hp.replace(v_stop="loss"))
    ed.prepare()
    req = EditRequest(*REQUESTS[0])
    ed.compute(req, mode="rrome", probe_after=False)  # warm-up
    with tprofile(activities=[ProfilerActivity.CPU]) as prof:
        t0, c0 = time.perf_counter(), time.process_time()
        res = ed.compute(req, mode="rrome", probe_after=False)
        wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    phases = ", ".join(f"{k} {v:.2f}" for k, v in res.timings.items() if v >= 0.005)
    sys.stdout.write(
        f"profile: one rrome edit, {len(ed.templates())} templates, {args.threads[0]} thread(s), "
        f"{len(res.v_star_trace)} v* steps, {wall:.2f} s wall, {cpu:.2f} CPU s ({load_text()})\n"
        f"phases (s): {phases}\n"
    )
    sys.stdout.write(
        prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=args.profile_rows) + "\n"
    )


# ------------------------------------------------------------------ the reference side
def reference_worker(work: Path, src: Path) -> None:
    """Runs inside the published checkout (cwd and PYTHONPATH): never imports our package.
    Reads one JSON job per line on stdin, answers one JSON line on stdout; the published
    code's prints go to stderr (the log)."""
    proto = os.fdopen(os.dup(1), "w")
    os.dup2(2, 1)
    isolate(src)
    if not torch.cuda.is_available():
        cpu_shim()
    import importlib

    # (no tuple shim: ROME edits the MLP's output, a tensor under transformers 4 and 5 alike)
    main_mod = importlib.import_module("rome.rome_main")
    hp_cls = importlib.import_module("rome").ROMEHyperParams
    compute_u = importlib.import_module("rome.compute_u")
    if not torch.cuda.is_available():
        cpu_factories(src)
    model, tok = load_reference_model(work / "model")
    c = torch.load(work / "c.pt")
    name = model.config._name_or_path.replace("/", "_")
    for count, line in enumerate(sys.stdin):
        job = json.loads(line)
        torch.set_num_threads(job["threads"])
        hp = hp_cls(**job["hparams"])
        module = hp.rewrite_module_tmp.format(hp.layers[0])
        compute_u.inv_mom2_cache[(name, module)] = torch.inverse(c).float()
        main_mod.CONTEXT_TEMPLATES_CACHE = job["templates"]
        t0, c0 = time.perf_counter(), time.process_time()
        deltas = main_mod.execute_rome(model, tok, job["request"], hp)
        wall, cpu = time.perf_counter() - t0, time.process_time() - c0
        left, right = next(iter(deltas.values()))
        path = work / f"ref-delta-{os.getpid()}-{count}.pt"
        torch.save(torch.outer(right.double(), left.double()), path)
        proto.write(json.dumps({"wall": wall, "cpu": cpu, "delta": str(path)}) + "\n")
        proto.flush()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--reference-src", type=Path, action="append", default=[])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--threads", default="1,2", help="comma-separated thread counts")
    ap.add_argument("--templates", default="11,21", help="comma-separated template counts")
    ap.add_argument("--repeats", type=int, default=3, help="timed edits per side and setting")
    ap.add_argument("--requests", type=int, default=3, help="distinct requests (cycled)")
    ap.add_argument("--warm-each", action="store_true", help="a warm-up edit per setting")
    ap.add_argument("--variant", action="append", default=[], help="name:key=value,...")
    ap.add_argument("--profile", action="store_true", help="profile one of our edits first")
    ap.add_argument("--profile-rows", type=int, default=25)
    ap.add_argument("--json", type=Path, help="also write the rows here")
    ap.add_argument("--worker", type=Path, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker is not None:
        reference_worker(args.worker, args.reference_src[0].resolve())
        return
    try:
        args.threads = [int(x) for x in args.threads.split(",")]
        args.templates = [int(x) for x in args.templates.split(",")]
    except ValueError:
        raise SystemExit("error: --threads and --templates take comma-separated integers") from None
    for src in args.reference_src:
        if not (src / "rome" / "rome_main.py").is_file():
            raise SystemExit(f"error: {src} is not a ROME checkout (no rome/rome_main.py)")
    if not 1 <= args.requests <= len(REQUESTS) or args.repeats < 1:
        raise SystemExit(f"error: --requests 1..{len(REQUESTS)}, --repeats >= 1")
    sys.stdout.write(f"start: {load_text()}\n")
    if args.profile:
        profile(args)
    if not args.reference_src and not args.variant:
        return
    with tempfile.TemporaryDirectory(prefix="speed-") as tmp:
        rows = run(args, Path(tmp))
    sys.stdout.write(f"end: {load_text()}\n")
    print_table(rows)
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
