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

import importlib
import json
import time
from pathlib import Path
from typing import Any

import torch

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
}


def weights_of(ed: Any, layers: list[int]) -> dict[int, torch.Tensor]:
    from rome.update import weight_out_in

    return {x: weight_out_in(ed.module(x)).detach().clone() for x in layers}


def run_ours_steps(args: Any, ed: Any, method: Any, batches: list[list[Any]]) -> dict[str, Any]:
    """Our two steps: per step the applied ΔW, the unrectified ΔW, K per layer, z."""
    layers = ed.hp.edited_layers()
    seen: list[Any] = []
    solve = method.solve

    def spy(ctx: Any, lc: Any, settings: Any) -> Any:
        seen.append(lc)
        return solve(ctx, lc, settings)

    method.solve = spy
    steps: list[dict[str, Any]] = []
    seconds = 0.0
    try:
        for reqs in batches:
            seen.clear()
            before = weights_of(ed, layers)
            t0 = time.process_time()
            upd = ed.edit(reqs, args.method)
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
    return {"steps": steps, "layers": layers, "seconds": seconds}


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
            if args.method == "rect":
                a, b = mine["applied"][layer] != 0, theirs["applied"][i] != 0
                extra = (
                    f"  kept ours {int(a.sum())} published {int(b.sum())}, on one side only "
                    f"{int((a ^ b).sum())}"
                )
            lines.append(f"step {s + 1} layer {layer}: dW rel {d:.2e}  K rel {k:.2e}{extra}")
        assert len(theirs["keys"]) == m
        z = max(rel(mine["z"][j], theirs["z"][j]) for j in range(mine["z"].shape[0]))
        worst["z"] = max(worst["z"], z)
        lines.append(f"step {s + 1} z rel (worst request) {z:.2e}")
    lines.append(
        f"worst over both steps: dW {worst['dW']:.2e}  K {worst['K']:.2e}  z {worst['z']:.2e}"
    )
    for line in ref.get("notes", []):
        lines.append(line)
    return lines


# ------------------------------------------------------------------ the reference side
def reference_steps(work: Path, spec: dict[str, Any], main_mod: Any, hparams: Any) -> None:
    """Runs inside the published checkout: the two steps with its own apply function."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    method = spec["method"]
    model = AutoModelForCausalLM.from_pretrained(work / "model", dtype=torch.float32).eval()
    if not hasattr(model.config, "n_embd"):
        model.config.n_embd = model.config.hidden_size
    tok = AutoTokenizer.from_pretrained(work / "model")
    tok.padding_side = "right"
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    main_mod.CONTEXT_TEMPLATES_CACHE = [["{}"], spec["templates"][1:]]
    c0 = torch.load(work / "c0.pt")
    name = model.config._name_or_path.replace("/", "_")
    for layer in hparams.layers:
        main_mod.COV_CACHE[(name, hparams.rewrite_module_tmp.format(layer))] = c0[layer]
    rec: dict[str, list[Any]] = {"keys": [], "z": []}
    spy(main_mod, "compute_ks", lambda out: rec["keys"].append(out.T.double().cpu()))
    spy(
        main_mod,
        "compute_z",
        lambda out: rec["z"].append((out[0] if isinstance(out, tuple) else out).detach().double()),
    )
    apply = getattr(main_mod, NAS_MAIN[method][3])
    m = len(hparams.layers)
    width = c0[hparams.layers[0]].shape[0]
    cache_c = torch.zeros((m, width, width))
    extra: dict[str, Any] = {}
    if method == "nas":
        extra["P"] = projectors(c0, hparams)
    steps, notes = [], []
    t0 = time.process_time()
    for batch in spec["batches"]:
        rec["keys"].clear()
        rec["z"].clear()
        before = {x: _weight(model, hparams, x) for x in hparams.layers}
        if method in ("memit-seq", "nas"):
            model, cache_c = apply(model, tok, batch, hparams, cache_c=cache_c, **extra)
        else:
            apply(model, tok, batch, hparams)
        after = {x: _weight(model, hparams, x) for x in hparams.layers}
        steps.append(
            {
                "applied": [after[x].double() - before[x].double() for x in hparams.layers],
                "keys": rec["keys"][:m],
                "z": torch.stack([z.cpu() for z in rec["z"]]),
            }
        )
    out = {"steps": steps, "seconds": time.process_time() - t0, "notes": notes}
    torch.save(out, work / "reference.pt")


def _weight(model: Any, hparams: Any, layer: int) -> torch.Tensor:
    """The weight as (out, in), whatever its storage (GPT-2's Conv1D is (in, out))."""
    module = model.get_submodule(hparams.rewrite_module_tmp.format(layer))
    w = module.weight.detach().clone()
    return w.T if type(module).__name__ == "Conv1D" else w


def projectors(c0: dict[int, torch.Tensor], hparams: Any) -> torch.Tensor:
    """AlphaEdit's rule (the published get_project), computed here from the same C₀."""
    ps = []
    for layer in hparams.layers:
        u, s, _ = torch.linalg.svd(c0[layer].cpu(), full_matrices=False)
        keep = (s < hparams.nullspace_threshold).nonzero(as_tuple=True)[0]
        ps.append(u[:, keep] @ u[:, keep].T)
    return torch.stack(ps)


def spy(module: Any, name: str, record: Any) -> None:
    fn = getattr(module, name)

    def wrapped(*a: Any, **k: Any) -> Any:
        res = fn(*a, **k)
        record(res)
        return res

    setattr(module, name, wrapped)


def load_reference(method: str, spec_hparams: dict[str, Any]) -> tuple[Any, Any]:
    mod_name, pkg, cls, _ = NAS_MAIN[method]
    main_mod = importlib.import_module(mod_name)
    hparams = getattr(importlib.import_module(pkg), cls)(**spec_hparams)
    return main_mod, hparams


def dump_spec(work: Path, spec: dict[str, Any]) -> None:
    (work / "spec.json").write_text(json.dumps(spec, indent=1))
