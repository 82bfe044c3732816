"""Two steps in a row against the NAS repository's methods (SasyaTitech/NAS): our side and
the reference worker, used by ``benchmarks/parity.py`` for ``memit-seq``, ``rect``,
``encore`` and ``nas``.

Each side edits two batches in a row on its own model: the second step runs on the
weights and the carried state its own first step left (cache_c, SEQ_CACHE). Printed
per step and layer: the worst relative difference of the applied ΔW (read as the
weight after minus before, the same float32 subtraction on both sides), of the
method's unrectified ΔW where it has one (RECT), of the keys K, and of z; for RECT
also the number of kept entries on each side and the positions kept on one side
only; for NAS the anchor norms (our calibration against the published
``_compute_vstar_norms_batched`` on the same requests) and, in the edit, the same
anchors injected on both sides.
"""

from __future__ import annotations

import contextlib
import importlib
import io
import json
import sys
import time
from pathlib import Path
from typing import Any

import torch
from reference_side import TorchOnCpu, inject_statistics, load_reference_model, projectors, spy

#: method -> (module of its main, package of its hparams class, class name, apply function)
NAS_MAIN = {
    "memit-seq": (
        "baselines.memit.memit_seq_main",
        "baselines.memit",
        "MEMITHyperParams",
        "apply_memit_seq_to_model",
    ),
    "rect": (
        "baselines.memit.memit_rect_main",
        "baselines.memit",
        "MEMITHyperParams",
        "apply_memit_rect_to_model",
    ),
    "encore": (
        "baselines.encore.encore_main",
        "baselines.encore",
        "ENCOREHyperParams",
        "apply_encore_to_model",
    ),
    "nas": ("NAS.NAS_main", "NAS", "NASHyperParams", "apply_NAS_to_model"),
    "memit-nas": (
        "baselines.memit.memit_main",
        "baselines.memit",
        "MEMITHyperParams",
        "apply_memit_to_model",
    ),
    # PRUNE: jianghoucheng/AlphaEdit, branch MEMIT_prune: MEMIT from its memit package, the
    # restraint from the block of experiments/evaluate.py (read from the checkout, run here)
    "prune": ("memit.memit_main", "memit", "MEMITHyperParams", "apply_memit_to_model"),
}
#: the methods with NAS's anchor, and the published module whose compute_z asks for it
ANCHORED = {"nas": "NAS.compute_z", "memit-nas": "baselines.memit.compute_z"}
#: the line that opens the MEMIT_prune branch's restraint in experiments/evaluate.py
PRUNE_MARK = "if cnt == (dataset_size_limit/num_edits) - 1:"


def _request_dicts(reqs: list[Any], first_id: int) -> list[dict[str, Any]]:
    return [
        {"case_id": first_id + i, "prompt": r.prompt, "subject": r.subject,
         "target_new": {"str": r.target_new}}
        for i, r in enumerate(reqs)
    ]  # fmt: skip


def ours_two_steps(
    args: Any, work: Path, ed: Any, method: Any, templates: Any, c0: Any,
    requests: list[tuple[str, str, str]], hparams: dict[str, Any], options: dict[str, Any],
) -> dict[str, Any]:  # fmt: skip
    """The NAS repository's methods: two batches of ``args.n`` requests in a row."""
    from rome import EditRequest

    batches = [
        [EditRequest(p, s, t) for p, s, t in requests[i * args.n : (i + 1) * args.n]]
        for i in range(2)
    ]
    model, tok = ed.model, ed.tok
    model.save_pretrained(work / "model", safe_serialization=True)  # before any edit
    tok.save_pretrained(work / "model")
    torch.save({k: v.float().cpu() for k, v in c0.items()}, work / "c0.pt")
    ours = run_ours_steps(args, ed, method, batches, options)
    spec: dict[str, Any] = {
        "method": args.method,
        "templates": templates,
        "batches": [_request_dicts(b, i * args.n) for i, b in enumerate(batches)],
        "hparams": hparams,
        "anchor": ours["anchor"],
    }
    (work / "spec.json").write_text(json.dumps(spec, indent=1))
    return ours


def dsets_shim() -> None:
    """The NAS repository's ``dsets`` imports scipy (its TF-IDF statistics) at import time;
    where scipy is missing, a stand-in ``dsets`` whose datasets refuse to load (the edit
    functions never read them: NAS's anchors are injected)."""
    import types

    try:
        importlib.import_module("dsets")
    except ImportError:
        stub = types.ModuleType("dsets")

        class _NoDataset:
            def __init__(self, *a: Any, **k: Any) -> None:
                raise RuntimeError("dsets is a parity stand-in here (scipy is not installed)")

        stub.MultiCounterFactDataset = _NoDataset  # type: ignore[attr-defined]
        sys.modules["dsets"] = stub


def weights_of(ed: Any, layers: list[int]) -> dict[int, torch.Tensor]:
    from rome.update import weight_out_in

    return {x: weight_out_in(ed.module(x)).detach().clone() for x in layers}


def run_ours_steps(
    args: Any, ed: Any, method: Any, batches: list[list[Any]], options: dict[str, Any]
) -> dict[str, Any]:
    """Our two steps (``options``: the method's settings): per step the applied ΔW, K per
    layer, z."""
    layers = ed.hp.edited_layers()
    seen: list[Any] = []
    solve = method.solve

    def spy(ctx: Any, lc: Any, settings: Any) -> Any:
        seen.append(lc)
        return solve(ctx, lc, settings)

    anchor_info = _our_anchor(ed, method, options) if args.method in ANCHORED else None
    method.solve = spy
    steps: list[dict[str, Any]] = []
    seconds = 0.0
    try:
        for reqs in batches:
            seen.clear()
            before = weights_of(ed, layers)
            t0 = time.process_time()
            upd = ed.edit(reqs, args.method, **options)
            seconds += time.process_time() - t0
            ed.apply_step(upd)
            after = weights_of(ed, layers)
            steps.append(
                {
                    "applied": {x: (after[x].double() - before[x].double()) for x in layers},
                    "keys": {c.layer: c.keys.double().cpu() for c in seen},
                    "z": torch.stack([r["z"] for r in upd.results]).double(),
                    "per_layer": upd.options["per_layer"],
                    "records": upd.records,
                }
            )
    finally:
        del method.solve
    return {"steps": steps, "layers": layers, "seconds": seconds, "anchor": anchor_info}


def _our_anchor(ed: Any, method: Any, options: dict[str, Any]) -> dict[str, Any]:
    """Our calibration norms on the unedited model; their trimmed mean becomes ρ."""
    from rome import anchor
    from rome.methods.nas import calibration_norms, use_anchor

    st = method.settings(ed.hp, options)
    layer = ed.hp.edited_layers()[-1]
    reqs = list(anchor.calibration_requests(st.anchor_samples))
    norms = calibration_norms(ed.context(method), layer, reqs, st.anchor_batch)
    rho = anchor.trimmed_mean(norms)
    use_anchor(ed, layer, rho)
    return {
        "layer": layer,
        "batch": st.anchor_batch,
        "norms": norms,
        "rho": rho,
        "requests": [
            {"prompt": r.prompt, "subject": r.subject, "target_new": {"str": " " + r.target_new}}
            for r in reqs
        ],
    }


def report_steps(args: Any, ours: dict[str, Any], ref: dict[str, Any], rel: Any) -> list[str]:
    """The lines to print; ``rel`` is the script's relative difference ‖a − b‖/‖b‖."""
    lines = []
    worst = {"dW": 0.0, "K": 0.0, "z": 0.0}
    for s, (mine, theirs) in enumerate(zip(ours["steps"], ref["steps"], strict=True)):
        m = len(ours["layers"])
        for i, layer in enumerate(ours["layers"]):
            d = rel(mine["applied"][layer], theirs["applied"][i])
            k = rel(mine["keys"][layer], theirs["keys"][i])
            worst["dW"], worst["K"] = max(worst["dW"], d), max(worst["K"], k)
            extra = ""
            if args.method == "rect":  # a hard cutoff: float noise flips entries at its edge
                a, b = mine["applied"][layer] != 0, theirs["applied"][i] != 0
                both = rel(mine["applied"][layer][a & b], theirs["applied"][i][a & b])
                worst["both"] = max(worst.get("both", 0.0), both)
                extra = (
                    f"  kept ours {int(a.sum())} published {int(b.sum())}, on one side only "
                    f"{int((a ^ b).sum())}, dW rel on the entries kept on both {both:.2e}"
                )
            lines.append(f"step {s + 1} layer {layer}: dW rel {d:.2e}  K rel {k:.2e}{extra}")
        assert len(theirs["keys"]) == m
        z = max(rel(mine["z"][j], theirs["z"][j]) for j in range(mine["z"].shape[0]))
        worst["z"] = max(worst["z"], z)
        ours_steps = [r["z_steps"] for r in mine["records"]]
        lines.append(
            f"step {s + 1} z rel (worst request) {z:.2e}  z forwards per request: ours "
            f"{ours_steps}, published {theirs['z_steps']}"
        )
    lines.append(
        f"worst over both steps: dW {worst['dW']:.2e}  K {worst['K']:.2e}  z {worst['z']:.2e}"
        + (f"  dW on entries kept on both sides {worst['both']:.2e}" if "both" in worst else "")
    )
    if ours.get("anchor"):
        a, b = ours["anchor"], ref["anchor"]
        worst_norm = max(abs(x - y) / y for x, y in zip(a["norms"], b["norms"], strict=True))
        lines.append(
            f"anchor (layer {a['layer']}, {len(a['norms'])} calibration requests, batches of "
            f"{a['batch']}): rho ours {a['rho']:.6f} published {b['rho']:.6f} rel "
            f"{abs(a['rho'] - b['rho']) / b['rho']:.2e}; worst per-request norm rel "
            f"{worst_norm:.2e} (the edit then injects ours on both sides)"
        )
    for line in ref.get("notes", []):
        lines.append(line)
    return lines


# ------------------------------------------------------------------ the reference side
def reference_steps(work: Path, spec: dict[str, Any], main_mod: Any, hparams: Any) -> None:
    """Runs inside the published checkout: the two steps with its own apply function."""
    method = spec["method"]
    model, tok = load_reference_model(work / "model")
    c0 = torch.load(work / "c0.pt")
    inject_statistics(main_mod, model, hparams, spec["templates"], c0, preserved=False)
    rec: dict[str, list[Any]] = {"keys": [], "z": []}
    spy(main_mod, "compute_ks", lambda out: rec["keys"].append(out.T.double().cpu()))
    rec["z_steps"] = []
    compute_z = main_mod.compute_z

    def z_spy(*a: Any, **k: Any) -> Any:
        """z, and its forward count: the published loop prints one "loss ..." line a step."""
        buf = io.StringIO()
        with contextlib.redirect_stdout(buf):
            out = compute_z(*a, **k)
        rec["z_steps"].append(sum(x.startswith("loss ") for x in buf.getvalue().splitlines()))
        rec["z"].append((out[0] if isinstance(out, tuple) else out).detach().double())
        return out

    main_mod.compute_z = z_spy
    apply = getattr(main_mod, NAS_MAIN[method][3])
    m = len(hparams.layers)
    width = c0[hparams.layers[0]].shape[0]
    cache_c = torch.zeros((m, width, width))
    extra: dict[str, Any] = {}
    anchor_out = None
    if method == "prune" and not torch.cuda.is_available():  # its block names "cuda"
        extra["cuda_torch"] = TorchOnCpu()
    if method == "nas":
        extra["P"] = projectors(c0, hparams)
    if method in ANCHORED:
        anchor_out = _reference_anchor(spec, model, tok, importlib.import_module(ANCHORED[method]))
    steps, notes = [], []
    t0 = time.process_time()
    for batch in spec["batches"]:
        for v in rec.values():
            v.clear()
        before = {x: _weight(model, hparams, x) for x in hparams.layers}
        if method in ("memit-seq", "nas"):
            model, cache_c = apply(model, tok, batch, hparams, cache_c=cache_c, **extra)
        elif method == "prune":
            _prune_step(work, spec, model, tok, batch, hparams, apply, extra)
        else:
            apply(model, tok, batch, hparams)
        after = {x: _weight(model, hparams, x) for x in hparams.layers}
        steps.append(
            {
                "applied": [after[x].double() - before[x].double() for x in hparams.layers],
                "keys": rec["keys"][:m],
                "z": torch.stack([z.cpu() for z in rec["z"]]),
                "z_steps": list(rec["z_steps"]),
            }
        )
    notes += extra.get("notes", [])
    out = {"steps": steps, "seconds": time.process_time() - t0, "notes": notes}
    out["anchor"] = anchor_out
    torch.save(out, work / "reference.pt")


def _reference_anchor(spec: dict[str, Any], model: Any, tok: Any, z_module: Any) -> dict[str, Any]:
    """The published calibration on the same requests and batches; then our ρ injected
    where the published ``compute_z`` asks for the anchor (a statistic, as C₀ is)."""
    import dataclasses

    vstar_stats = importlib.import_module("util.vstar_stats")
    memit_hp = importlib.import_module("baselines.memit").MEMITHyperParams
    names = {f.name for f in dataclasses.fields(memit_hp)}
    mh = memit_hp(**{k: v for k, v in spec["hparams"].items() if k in names})
    a = spec["anchor"]
    norms: list[float] = []
    reqs = a["requests"]
    for start in range(0, len(reqs), a["batch"]):
        norms += vstar_stats._compute_vstar_norms_batched(
            model=model, tok=tok, requests=reqs[start : start + a["batch"]], hparams=mh,
            layer=a["layer"],
        )  # fmt: skip
    rho, _, _ = vstar_stats._upper_trimmed_mean(norms, upper_quantile=0.95)
    injected = float(a["rho"])
    z_module.get_or_compute_mean_vstar_norm = lambda **_k: injected
    return {"norms": norms, "rho": rho}


def _prune_step(
    work: Path, spec: dict[str, Any], model: Any, tok: Any, batch: Any, hparams: Any,
    apply: Any, extra: dict[str, Any],
) -> None:  # fmt: skip
    """One batch as the branch's evaluate.py runs it: MEMIT applied (the first batch keeps
    the original weights), then its restraint block when this is the last batch."""
    cnt = extra.setdefault("cnt", 0)
    _, copy = apply(model, tok, batch, hparams, return_orig_weights=cnt == 0)
    if cnt == 0:
        extra["weights_copy"] = copy
    scope = {
        "torch": sys.modules["torch"] if "cuda_torch" not in extra else extra["cuda_torch"],
        "nethook": importlib.import_module("util.nethook"),
        "model": model,
        "weights_copy": extra["weights_copy"],
        "upd_matrix": {},
        "cnt": cnt,
        "num_edits": len(batch),
        "dataset_size_limit": len(batch) * len(spec["batches"]),
    }
    exec(_prune_block(Path.cwd() / "experiments" / "evaluate.py"), scope)  # noqa: S102
    if scope["upd_matrix"]:
        extra.setdefault("notes", []).append(
            f"published restraint block ran after batch {cnt + 1} on "
            f"{len(scope['upd_matrix'])} weight(s)"
        )
    extra["cnt"] = cnt + 1


def _prune_block(path: Path) -> str:
    """The published ``if cnt == ...:`` statement and its body, dedented."""
    import textwrap

    lines = path.read_text().splitlines()
    start = next(i for i, x in enumerate(lines) if x.strip() == PRUNE_MARK)
    indent = len(lines[start]) - len(lines[start].lstrip())
    body = [lines[start]]
    for x in lines[start + 1 :]:
        if x.strip() and len(x) - len(x.lstrip()) <= indent and not x.lstrip().startswith("#"):
            break
        body.append(x)
    return textwrap.dedent("\n".join(body)) + "\n"


def _weight(model: Any, hparams: Any, layer: int) -> torch.Tensor:
    """The weight as (out, in), whatever its storage (GPT-2's Conv1D is (in, out))."""
    module = model.get_submodule(hparams.rewrite_module_tmp.format(layer))
    w = module.weight.detach().clone()
    return w.T if type(module).__name__ == "Conv1D" else w
