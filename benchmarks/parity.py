"""Parity with the published code: MEMIT, EMMET, AlphaEdit, MEMIT_seq, RECT, ENCORE, NAS.

    python benchmarks/parity.py --method memit --reference-src ~/src/memit
    python benchmarks/parity.py --method emmet --reference-src ~/src/unified-model-editing
    python benchmarks/parity.py --method alphaedit --reference-src ~/src/AlphaEdit
    python benchmarks/parity.py --method memit-seq --reference-src ~/src/NAS   (also rect,
        encore, nas: SasyaTitech/NAS; two steps in a row, see parity_steps.py)
    python benchmarks/parity.py --method prune --reference-src ~/src/AlphaEdit-MEMIT_prune \
        --settings '{"rule": "published", "when": "end", "end_step": 2}'
    python benchmarks/parity.py --method ultraedit --reference-src ~/src/UltraEdit

(UltraEdit is not locate-then-edit: its comparison is ``benchmarks/parity_ultraedit.py``.)

``--reference-src`` is the user's own checkout of the published repository
(kmeng01/memit, scalable-model-editing/unified-model-editing,
jianghoucheng/AlphaEdit); it is imported at run time, in a subprocess (its
top-level ``rome`` package would clash with ours), never vendored. Both sides
get the same model (saved to a temporary folder), the same 6 context templates
(sampled once here and injected into the reference's template cache), the same
C₀ per layer (injected into its covariance cache), the same requests and
settings. Printed: the worst relative difference ‖a − b‖/‖b‖ of ΔW per layer,
of the keys K per layer, and of z over the requests; for AlphaEdit also the
kept-direction count of each projector on both sides; and the CPU seconds of
the batch's edit on each side (one thread each: run with OMP_NUM_THREADS=1).

Run-time shims in the reference subprocess (nothing in the checkout is changed): those
of ``benchmarks/reference_side.py`` ("cuda" mapped to the CPU, a block's bare tensor
shown as a tuple, ``n_embd``). For AlphaEdit the projector comes from the
reference's ``experiments.evaluate.get_project`` when that module imports, else
from the same rule computed in the subprocess (said in the output).
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from parity_steps import NAS_MAIN, dsets_shim, ours_two_steps, reference_steps, report_steps
from reference_side import (
    REQUESTS,
    cpu_factories,
    cpu_shim,
    head_name,
    inject_statistics,
    isolate,
    load_reference_model,
    projectors,
    rel,
    run_worker,
    spy,
    tuple_shim,
    z_hparams,
)

MAIN = {
    "memit": ("memit.memit_main", "memit", "MEMITHyperParams"),
    "emmet": ("emmet.emmet_main", "emmet", "EMMETHyperParams"),
    "alphaedit": ("AlphaEdit.AlphaEdit_main", "AlphaEdit", "AlphaEditHyperParams"),
}
MAIN.update({m: (v[0], v[1], v[2]) for m, v in NAS_MAIN.items()})


# ------------------------------------------------------------------ our side
def _model(name: str, seed: int) -> tuple[Any, Any, Any]:
    """(model, tokenizer, preset) for ``tiny-gpt2``, ``gpt2-small-random`` or ``smollm2-135m``."""
    from rome import load_model, load_preset
    from rome.testing import tiny_tokenizer

    if name == "gpt2-small-random":
        from transformers import GPT2Config, GPT2LMHeadModel

        tok = tiny_tokenizer()
        torch.manual_seed(seed)
        cfg = GPT2Config(vocab_size=len(tok), n_positions=1024, n_embd=768, n_layer=12, n_head=12)
        model = GPT2LMHeadModel(cfg).eval()
        hp = load_preset("tiny-gpt2-family").replace(
            name="gpt2-small-random",
            model="gpt2-small-random",
            layers=[3, 4, 5],
            layer=5,
            mom2_n_samples=256,  # 8k tokens: C₀ of rank 3,072
        )
        return model, tok, hp
    lm = load_model(name)
    preset = "tiny-gpt2-family" if name == "tiny-gpt2" else f"{name}-memit"
    return lm.model, lm.tokenizer, load_preset(preset)


def _reference_hparams(
    hp: Any, method: str, settings: Any, n_layers: int, head: str
) -> dict[str, Any]:
    from rome.methods import get_method

    # AlphaEdit's published hparams carry MEMIT's λ too (its C₀ weight; unused by its solve)
    weight = getattr(settings, "mom2_update_weight", None)
    if weight is None:
        weight = get_method("memit").settings(hp).mom2_update_weight
    out = {
        "layers": hp.edited_layers(),
        "layer_selection": "all",
        **z_hparams(hp, n_layers, head),
        "mom2_update_weight": weight,
        "mlp_module_tmp": hp.layers_module + ".{}.mlp",
        "attn_module_tmp": hp.layers_module + ".{}.attn",
    }
    if method == "emmet":
        out.update(
            calculate_objective_value=False,
            update_norm_lambda=settings.update_norm_lambda,
            emmet_lambda=settings.emmet_lambda,
        )
    if method in ("alphaedit", "nas"):
        out.update(
            nullspace_threshold=settings.nullspace_threshold,
            L2=settings.alphaedit_l2,
            model_name=hp.name,
        )
    if method in NAS_MAIN:
        out["model_name"] = hp.name
    if method == "memit-nas":
        out["use_nas"] = True
    if method == "encore":
        out.update(
            calculate_objective_value=False,
            add_prev_edits=settings.add_prev_edits,
            update_norm_lambda=settings.norm_lambda,
            emmet_lambda=0.1,
            prob_cutoff=settings.prob_cutoff,
            norm_control=0,
            dynamic_multiplier=5,
            random_vector_preservation=False,
        )
    return out


def _our_hparams(args: argparse.Namespace) -> tuple[Any, Any, Any, dict[str, Any]]:
    """(model, tokenizer, hparams, the method's options) as the flags ask."""
    from rome import load_preset

    model, tok, hp = _model(args.model, args.seed)
    if args.method in NAS_MAIN and args.model == "smollm2-135m":
        hp = load_preset(f"smollm2-135m-{args.method}")
    # kmeng01/memit counts the subject's tokens separately; every later repository joins
    changes: dict[str, Any] = {"subject_index": "separate" if args.method == "memit" else "joined"}
    if args.layers:
        layers = [int(x) for x in args.layers.split(",")]
        changes.update(layers=layers, layer=layers[-1])
    if args.steps:
        changes["v_num_grad_steps"] = args.steps
    options: dict[str, Any] = {}
    if args.threshold is not None:
        options["nullspace_threshold"] = args.threshold
    if args.settings:  # the method's declared settings, as a JSON object
        options.update(json.loads(args.settings))
    return model, tok, hp.replace(**changes, v_stop="loss"), options


def _timed_edit(
    ed: Any, method: Any, name: str, reqs: list[Any], options: dict[str, Any]
) -> tuple[Any, list[Any], float, float]:
    """The batch's edit with the solver spied on: (update, each layer's solve context,
    CPU seconds, wall seconds)."""
    seen: list[Any] = []
    solve = method.solve

    def spy(ctx: Any, lc: Any, settings: Any) -> Any:
        seen.append(lc)
        return solve(ctx, lc, settings)

    method.solve = spy
    try:
        t0, w0 = time.process_time(), time.perf_counter()
        upd = ed.edit(reqs, name, **options)
        seconds, wall = time.process_time() - t0, time.perf_counter() - w0
    finally:
        del method.solve
    return upd, seen, seconds, wall


def _write_reference_inputs(
    work: Path, name: str, model: Any, tok: Any, templates: Any, reqs: list[Any], hparams: Any
) -> None:
    """The model, the spec (templates, requests, the reference's hparams) into ``work``."""
    model.save_pretrained(work / "model", safe_serialization=True)
    tok.save_pretrained(work / "model")
    spec = {
        "method": name,
        "templates": templates,
        "requests": [
            {
                "case_id": i,
                "prompt": r.prompt,
                "subject": r.subject,
                "target_new": {"str": r.target_new},
            }
            for i, r in enumerate(reqs)
        ],
        "hparams": hparams,
    }
    (work / "spec.json").write_text(json.dumps(spec, indent=1))


def run_ours(args: argparse.Namespace, work: Path) -> dict[str, Any]:
    """Our update, keys and z; writes the reference's inputs into ``work``."""
    import rome.methods
    from rome import Editor
    from rome.methods.family import family_templates, moment

    model, tok, hp, options = _our_hparams(args)
    ed = Editor(model, tok, hp)
    reqs = batch_requests(args.n)
    templates = family_templates(ed)
    c0 = {layer: moment(ed, layer) for layer in hp.edited_layers()}
    method = rome.methods.get_method(args.method)
    settings = method.settings(hp, options)
    method.prepare(ed.context(method), hp.edited_layers(), settings)  # type: ignore[attr-defined]
    if args.method in NAS_MAIN:
        n_layers = len(model.get_submodule(hp.layers_module))
        hparams = _reference_hparams(hp, args.method, settings, n_layers, head_name(model))
        return ours_two_steps(args, work, ed, method, templates, c0, REQUESTS, hparams, options)
    upd, seen, seconds, wall = _timed_edit(ed, method, args.method, reqs, options)
    n_layers = len(ed.model.get_submodule(hp.layers_module))
    hparams = _reference_hparams(hp, args.method, settings, n_layers, head_name(model))
    _write_reference_inputs(work, args.method, model, tok, templates, reqs, hparams)
    torch.save({k: v.float().cpu() for k, v in c0.items()}, work / "c0.pt")
    return {
        "delta": {lu.layer: (lu.V.double() @ lu.U.double()).cpu() for lu in upd.layers},
        "keys": {ctx.layer: ctx.keys.double().cpu() for ctx in seen},
        "z": torch.stack([r["z"] for r in upd.results]).double(),
        "kept": {x["layer"]: x.get("kept_directions") for x in upd.options["per_layer"]},
        "layers": hp.edited_layers(),
        "seconds": seconds,
        "wall": wall,
    }


def batch_requests(n: int) -> list[Any]:
    """The first ``n`` of :data:`REQUESTS`; past six, the first ``n`` bundled CounterFact
    records (the sample the speed rows use) instead."""
    from rome import EditRequest

    if n <= len(REQUESTS):
        return [EditRequest(p, s, t) for p, s, t in REQUESTS[:n]]
    from evals.counterfact import load_counterfact

    records = load_counterfact("sample", limit=n).records
    if len(records) < n:
        raise SystemExit(f"error: --n {n}: the bundled sample has {len(records)} records")
    return [r.to_request() for r in records]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--method", choices=sorted([*MAIN, "ultraedit"]), required=True)
    ap.add_argument("--reference-src", type=Path, required=True)
    ap.add_argument(
        "--model", default="tiny-gpt2", help="tiny-gpt2, gpt2-small-random, smollm2-135m"
    )
    ap.add_argument(
        "--layers", default="", help="comma-separated edited layers (default: preset's)"
    )
    ap.add_argument(
        "--n",
        type=int,
        default=3,
        help="requests in the batch (past 6: bundled CounterFact records)",
    )
    ap.add_argument(
        "--steps", type=int, default=0, help="z steps (default: preset's); ultraedit: steps (2)"
    )
    ap.add_argument("--lr", type=float, default=0.0, help="UltraEdit lr (default: preset's)")
    ap.add_argument("--modules", default="", help="UltraEdit modules: gate_up, gate, up, mlp_out")
    ap.add_argument("--threshold", type=float, default=None, help="AlphaEdit nullspace_threshold")
    ap.add_argument(
        "--settings", default="", help='the method\'s settings as JSON, e.g. {"prob_cutoff": -2}'
    )
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--worker", type=Path, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.method == "ultraedit":
        sys.path.insert(0, str(Path(__file__).resolve().parent))
        import parity_ultraedit as ultra

        args.steps = args.steps or 2
        if args.worker is not None:
            ultra.reference_worker(args.worker, args.reference_src.resolve())
        else:
            ultra.main(args, Path(__file__).resolve())
        return
    if args.worker is not None:
        reference_worker(args.worker, args.reference_src.resolve())
        return
    with tempfile.TemporaryDirectory(prefix="parity-") as tmp:
        work = Path(tmp)
        ours = run_ours(args, work)
        ref = run_worker(Path(__file__).resolve(), args.method, args.reference_src, work)
    report(args, ours, ref)


def report(args: argparse.Namespace, ours: dict[str, Any], ref: dict[str, Any]) -> None:
    lines = [f"method {args.method}, model {args.model}, n {args.n}, layers {ours['layers']}"]
    if args.method in NAS_MAIN:
        lines += report_steps(args, ours, ref, rel)
        lines.append(
            f"CPU s for both steps: ours {ours['seconds']:.1f}, published {ref['seconds']:.1f}"
        )
        sys.stdout.write("\n".join(lines) + "\n")
        return
    worst = {"dW": 0.0, "K": 0.0}
    for i, layer in enumerate(ours["layers"]):
        d = rel(ours["delta"][layer], ref["delta"][i])
        k = rel(ours["keys"][layer], ref["keys"][i])
        worst["dW"], worst["K"] = max(worst["dW"], d), max(worst["K"], k)
        extra = ""
        if args.method == "alphaedit":
            extra = f"  kept directions ours {ours['kept'][layer]} reference {ref['kept'][i]}"
        lines.append(f"layer {layer}: dW rel {d:.2e}  K rel {k:.2e}{extra}")
    z = max(rel(ours["z"][j], ref["z"][j]) for j in range(ours["z"].shape[0]))
    lines.append(f"z rel (worst request) {z:.2e}")
    lines.append(f"worst: dW {worst['dW']:.2e}  K {worst['K']:.2e}  z {z:.2e}")
    if "seconds" in ref:
        lines.append(
            f"CPU s for the batch (templates, C0 and projector prepared): ours "
            f"{ours['seconds']:.1f}, published {ref['seconds']:.1f}, "
            f"{ref['seconds'] / ours['seconds']:.2f}x"
        )
    if "wall" in ref and "wall" in ours:
        lines.append(
            f"wall s for the batch: ours {ours['wall']:.1f}, published {ref['wall']:.1f}, "
            f"{ref['wall'] / ours['wall']:.2f}x ({_load()})"
        )
    if ref.get("projector_source"):
        lines.append(f"reference projector: {ref['projector_source']}")
    sys.stdout.write("\n".join(lines) + "\n")


def _load() -> str:
    one, five, _ = os.getloadavg()
    return f"load average {one:.2f} (1 min), {five:.2f} (5 min) on {os.cpu_count()} CPUs"


# ------------------------------------------------------------------ the reference side
def reference_worker(work: Path, src: Path) -> None:
    """Runs inside the published checkout (cwd and PYTHONPATH): never imports our package."""
    isolate(src)
    spec = json.loads((work / "spec.json").read_text())
    method = spec["method"]
    if not torch.cuda.is_available():
        cpu_shim()
    tuple_shim(importlib.import_module("util.nethook"))
    mod_name, pkg, hp_cls = MAIN[method]
    if method in NAS_MAIN:
        dsets_shim()
    main_mod = importlib.import_module(mod_name)
    hparams = getattr(importlib.import_module(pkg), hp_cls)(**spec["hparams"])
    if not torch.cuda.is_available():
        cpu_factories(src)
    if method in NAS_MAIN:
        reference_steps(work, spec, main_mod, hparams)
        return
    model, tok = load_reference_model(work / "model")
    c0 = torch.load(work / "c0.pt")
    inject_statistics(main_mod, model, hparams, spec["templates"], c0, preserved=True)
    rec: dict[str, list[Any]] = {"keys": [], "z": [], "upd": []}
    spy(main_mod, "compute_ks", lambda out: rec["keys"].append(out.T.double().cpu()))
    spy(main_mod, "compute_z", lambda out: rec["z"].append(out.detach().double().cpu()))
    orig_match = main_mod.upd_matrix_match_shape

    def match(matrix: torch.Tensor, shape: Any) -> torch.Tensor:
        rec["upd"].append(matrix.detach().double().cpu())
        return orig_match(matrix, shape)

    main_mod.upd_matrix_match_shape = match
    requests = spec["requests"]
    out: dict[str, Any] = {}
    t0, w0 = time.process_time(), time.perf_counter()
    if method == "memit":
        main_mod.execute_memit(model, tok, requests, hparams)
    elif method == "emmet":
        main_mod.execute_emmet(model, tok, requests, hparams)
    else:
        p, kept, source = _projectors(model, tok, hparams, c0)
        width = c0[hparams.layers[0]].shape[0]
        cache_c = torch.zeros((len(hparams.layers), width, width))
        t0, w0 = time.process_time(), time.perf_counter()  # P prepared, as ours is
        main_mod.apply_AlphaEdit_to_model(model, tok, requests, hparams, cache_c=cache_c, P=p)
        rec["upd"] = [u.T for u in rec["upd"]]  # AlphaEdit solves for (in, out)
        out.update(kept=kept, projector_source=source)
    out["seconds"], out["wall"] = time.process_time() - t0, time.perf_counter() - w0
    m = len(hparams.layers)
    out.update(delta=rec["upd"][:m], keys=rec["keys"][:m], z=torch.stack(rec["z"]))
    torch.save(out, work / "reference.pt")


def _projectors(model: Any, tok: Any, hparams: Any, c0: dict[int, torch.Tensor]) -> Any:
    try:
        from experiments.evaluate import get_project

        ps = [get_project(model, tok, layer, hparams) for layer in hparams.layers]
        source = "experiments.evaluate.get_project"
    except Exception as exc:  # its imports (GLUE, baselines) may not all be installed
        ps = list(projectors(c0, hparams))
        source = f"the same rule in the subprocess (get_project did not import: {exc!r:.80})"
    kept = [round(float(p.trace())) for p in ps]
    return torch.stack([p.cpu() for p in ps]), kept, source


if __name__ == "__main__":
    main()
