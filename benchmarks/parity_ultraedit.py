"""UltraEdit's parity with the published code (``benchmarks/parity.py --method ultraedit``).

    python benchmarks/parity.py --method ultraedit --reference-src ~/src/UltraEdit

``--reference-src`` is a checkout of XiaojieGu/UltraEdit, imported at run time in a
subprocess, never vendored. Both sides get the same model (saved to a temporary
folder, float32), the same modules, lr and requests, and make two steps in a row,
the second on the first's weights and normaliser. The published side runs its own
``ULTRAEDIT.cache`` (forward and backward with its ``TracerDict``, the normaliser
update) and ``predict_param_shifts`` (the (in × in) float32 ridge solve) on the
tuples its ``ZSREDataset.tok_tuples`` builds, then its ``edit_model``; ours runs
``Editor.edit`` / ``Editor.apply_step`` with ``normaliser: published``. Printed per
step: the worst relative difference ‖a − b‖/‖b‖ of ΔW per edited module, and of the
normaliser's mean, variance and standard deviation.

Run-time shims in the reference process only: ``wandb`` and ``omegaconf`` (imported,
not used by this path) are empty modules when missing; the config is a namespace
with the fields ``ULTRAEDIT`` reads; its cache folder is a temporary one.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import types
from pathlib import Path
from typing import Any

import torch
from reference_side import REQUESTS, isolate, rel, run_worker

STEPS = [REQUESTS[:3], REQUESTS[3:]]


def _model(name: str) -> tuple[Any, Any, Any]:
    from rome import load_model, load_preset

    lm = load_model(name)
    try:
        hp = load_preset(f"{name}-ultraedit")
    except Exception:  # noqa: BLE001  (a model without an UltraEdit preset: its defaults)
        hp = lm.hparams.replace(method="ultraedit")
    return lm.model.float(), lm.tokenizer, hp


def run_ours(args: argparse.Namespace, work: Path) -> dict[str, Any]:
    from rome import Editor, EditRequest
    from rome.methods import get_method

    model, tok, hp = _model(args.model)
    ours = {**hp.method_settings.get("ultraedit", {}), "normaliser": "published"}
    if args.lr:
        ours["lr"] = args.lr
    if args.modules:
        ours["modules"] = args.modules
    changes: dict[str, Any] = {"method_settings": {**hp.method_settings, "ultraedit": ours}}
    if args.layers:
        layers = [int(x) for x in args.layers.split(",")]
        changes.update(layers=layers, layer=layers[-1])
    hp = hp.replace(**changes)
    model.save_pretrained(work / "model", safe_serialization=True)
    tok.save_pretrained(work / "model")
    ed = Editor(model, tok, hp)
    layers = hp.edited_layers()
    from rome.methods.ultraedit import MODULES

    settings = get_method("ultraedit").settings(hp)
    modules = [
        hp.weight_module(x) if m == "mlp_out" else f"{hp.layers_module}.{x}.{m}"
        for m in MODULES[settings.modules]
        for x in layers
    ]
    out: dict[str, Any] = {"steps": [], "layers": layers, "modules": modules}
    for step in STEPS[: args.steps]:
        upd = ed.edit([EditRequest(p, s, t) for p, s, t in step], "ultraedit")
        deltas = {}
        for lu in upd.layers:
            for name, _, r0, r1 in ed.targets(lu):  # None: the preset's edited weight
                key = name or hp.weight_module(lu.layer)
                deltas[key] = (lu.V[r0:r1].double() @ lu.U.double()).cpu()
        ed.apply_step(upd)
        state = {str(k): v for k, v in ed.method_state["ultraedit"].items()}
        out["steps"].append({"delta": deltas, "norm": state})
    spec = {
        "modules": modules,
        "lr": settings.lr,
        "steps": [[{"prompt": p.format(s), "answer": t} for p, s, t in st] for st in STEPS],
        "n_steps": args.steps,
    }
    (work / "spec.json").write_text(json.dumps(spec, indent=1))
    return out


def report(args: argparse.Namespace, ours: dict[str, Any], ref: dict[str, Any]) -> None:
    lines = [
        f"method ultraedit, model {args.model}, layers {ours['layers']}, "
        f"modules {len(ours['modules'])}, {args.steps} steps of {len(STEPS[0])}"
    ]
    for i, (o, r) in enumerate(zip(ours["steps"], ref["steps"], strict=True)):
        worst = max(rel(o["delta"][m], r["delta"][m]) for m in ours["modules"])
        per = "  ".join(
            f"{m.split('.')[-3]}.{m.split('.')[-1]} {rel(o['delta'][m], r['delta'][m]):.1e}"
            for m in ours["modules"]
        )
        lines.append(f"step {i + 1}: dW rel per module: {per}")
        for shape, norm in o["norm"].items():
            rn = r["norm"][shape]
            figs = {
                "mean": rel(norm.mean, rn["mean"]),
                "var": rel(norm.var, rn["var"]),
                "std": rel(norm.std, rn["std"]),
            }
            n_ok = "equal" if norm.n == float(rn["n"]) else f"{norm.n} vs {float(rn['n'])}"
            lines.append(
                f"step {i + 1}: normaliser {shape} n {n_ok}; mean rel {figs['mean']:.2e}  "
                f"var rel {figs['var']:.2e}  std rel {figs['std']:.2e}"
            )
        lines.append(f"step {i + 1}: worst dW rel {worst:.2e}")
    sys.stdout.write("\n".join(lines) + "\n")


def main(args: argparse.Namespace, script: Path) -> None:
    with tempfile.TemporaryDirectory(prefix="parity-ultraedit-") as tmp:
        work = Path(tmp)
        ours = run_ours(args, work)
        ref = run_worker(script, "ultraedit", args.reference_src, work)
    report(args, ours, ref)


# ------------------------------------------------------------------ the reference side
def _ns(**k: Any) -> types.SimpleNamespace:
    return types.SimpleNamespace(**k)


def reference_worker(work: Path, src: Path) -> None:
    """Runs inside the published checkout (cwd and PYTHONPATH): never imports our package."""
    isolate(src)
    import importlib.machinery

    import transformers.integrations.accelerate  # noqa: F401  (before the stubs: it probes wandb)

    for stub in ("wandb", "omegaconf"):
        try:
            __import__(stub)
        except ImportError:
            mod = types.ModuleType(stub)
            mod.DictConfig = dict  # type: ignore[attr-defined]
            mod.__spec__ = importlib.machinery.ModuleSpec(stub, None)
            sys.modules[stub] = mod
    spec = json.loads((work / "spec.json").read_text())
    from transformers import AutoModelForCausalLM, AutoTokenizer

    ultra = __import__("editor.ultraedit", fromlist=["ULTRAEDIT"])
    zsre = __import__("data.zsre", fromlist=["ZSREDataset"])
    model = AutoModelForCausalLM.from_pretrained(work / "model", dtype=torch.float32).eval()
    for p in model.parameters():  # as its make_model: only the edited weights need grads
        p.requires_grad = False
    for name in spec["modules"]:
        model.get_submodule(name).weight.requires_grad = True
    config = _config(spec, work)
    editor = ultra.ULTRAEDIT(config, model)
    tok = AutoTokenizer.from_pretrained(work / "model")
    data = zsre.ZSREDataset.__new__(zsre.ZSREDataset)
    data.tok = tok
    out: dict[str, Any] = {"steps": []}
    for step in spec["steps"][: spec["n_steps"]]:
        tuples = [data.tok_tuples(r["prompt"], r["answer"]) for r in step]
        batch = {
            k: torch.nn.utils.rnn.pad_sequence(
                [t[k].squeeze(0) for t in tuples], batch_first=True,
                padding_value=-100 if k == "labels" else 0,
            )
            for k in tuples[0]
        }  # fmt: skip
        editor.cache([batch])
        shifts = editor.predict_param_shifts()
        delta = {}
        for name, shift in shifts.items():
            # (in, out) for a Linear (transposed on write) and a Conv1D alike: ΔW is its T
            delta[name] = shift.T.detach().double().cpu()
        editor.edit_model(shifts, False)
        model.zero_grad()
        norms = {
            k: {x: getattr(v, x).detach().clone().cpu() for x in ("n", "mean", "var", "std")}
            for k, v in editor.lifelong_normalizer.items()
        }
        out["steps"].append({"delta": delta, "norm": norms})
    torch.save(out, work / "reference.pt")


def _config(spec: dict[str, Any], work: Path) -> types.SimpleNamespace:
    """The fields of its hydra config that ``ULTRAEDIT`` reads on this path."""
    n = len(spec["steps"][0])
    config = _ns(
        model=_ns(edit_modules=spec["modules"], name="parity", name_or_path=str(work / "model")),
        editor=_ns(
            name="ultraedit", lr=spec["lr"], batch_size=128, token="ans",
            cache_dir=str(work / "cache"),
        ),
        dataset=_ns(name="parity", n_edits=n, batch_size=n),
        num_seq=spec["n_steps"], editor_device="cpu", model_device="cpu",
    )  # fmt: skip
    return config
