"""What the scripts that run a published checkout beside ours share (``parity.py``,
``parity_steps.py``, ``parity_ultraedit.py``, ``speed.py``): starting the reference
process, the published hparams fields every locate-then-edit method reads, and, inside
the reference process, its ``sys.path``, the model it loads and the run-time shims.

The shims live only in the reference process (nothing in the checkout is changed):
on a machine without CUDA, ``"cuda"`` devices become the CPU (the published code
hard-codes ``"cuda"``); under transformers 5 a decoder block returns a bare tensor, so
the reference's ``nethook`` sees it as a one-element tuple (its edit functions and
``.output[0]`` assume the tuple of transformers 4); ``config.n_embd`` is set to
``hidden_size`` for Llama-family models (kmeng01/memit reads ``n_embd``).

This module never imports our package: the reference process imports it before it
drops our tree from its path.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import torch

HERE = Path(__file__).resolve().parent
#: the requests both sides edit, (prompt, subject, target_new), in this order
REQUESTS = [
    ("{} is located in the city of", "The Eiffel Tower", "Rome"),
    ("The capital of {} is", "Japan", "London"),
    ("{} was written by", "Hamlet", "Charles Dickens"),
    ("{} is a company from", "Toyota", "Brazil"),
    ("The mother tongue of {} is", "Danielle Darrieux", "English"),
    ("{} plays the sport of", "Lionel Messi", "basketball"),
]


# ------------------------------------------------------------------ our side
def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    """‖a − b‖ / ‖b‖ in float64."""
    return float((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30))


def head_name(model: Any) -> str:
    """The LM head's module name; the input embedding's when tied (no lm_head.weight then)."""
    head, emb = model.get_output_embeddings(), model.get_input_embeddings()
    target = emb if head.weight is emb.weight else head
    return next(n for n, m in model.named_modules() if m is target)


def z_hparams(hp: Any, n_layers: int, head: str) -> dict[str, Any]:
    """The published hparams fields of z / v*, the edited module and C₀ for our preset
    (the ROME, MEMIT and later repositories name them alike)."""
    return {
        "fact_token": "subject_last",
        "v_num_grad_steps": hp.v_num_grad_steps,
        "v_lr": hp.v_lr,
        "v_loss_layer": n_layers - 1 if hp.v_loss_layer is None else hp.v_loss_layer,
        "v_weight_decay": hp.v_weight_decay,
        "clamp_norm_factor": hp.clamp_norm_factor,
        "kl_factor": hp.kl_factor,
        "mom2_adjustment": True,
        "rewrite_module_tmp": hp.mlp_out_module,
        "layer_module_tmp": hp.layers_module + ".{}",
        "ln_f_module": hp.final_norm_module,
        "lm_head_module": head,
        "mom2_dataset": hp.mom2_dataset,
        "mom2_n_samples": hp.mom2_n_samples,
        "mom2_dtype": "float32",
    }


def run_worker(script: Path, method: str, src: Path, work: Path) -> dict[str, Any]:
    """Run ``script --worker work`` inside the checkout ``src`` (its cwd and PYTHONPATH)
    and read back the ``reference.pt`` it leaves in ``work``; its output goes to
    ``work/reference.log``, whose tail is printed when it fails."""
    env = dict(os.environ, PYTHONPATH=str(src.resolve()))
    cmd = [sys.executable, str(script), "--method", method]
    cmd += ["--reference-src", str(src), "--worker", str(work)]
    with open(work / "reference.log", "w") as log:
        done = subprocess.run(cmd, cwd=src, env=env, stdout=log, stderr=log)
    if done.returncode != 0:
        sys.stdout.write((work / "reference.log").read_text()[-4000:])
        raise SystemExit(f"the reference run failed (exit {done.returncode})")
    return torch.load(work / "reference.pt")


# ------------------------------------------------------------------ the reference side
def isolate(src: Path) -> None:
    """The checkout first on ``sys.path`` and our tree off it (its top-level ``rome``
    package would clash with ours)."""
    drop = ("", str(HERE), str(HERE.parent))
    sys.path[:] = [str(src)] + [p for p in sys.path if p not in drop]


def load_reference_model(path: Path) -> tuple[Any, Any]:
    """The saved model (float32, eval) and its tokenizer as the published code expects
    them: ``n_embd`` present, padding on the right with a pad token."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    if not hasattr(model.config, "n_embd"):
        model.config.n_embd = model.config.hidden_size
    tok = AutoTokenizer.from_pretrained(path)
    tok.padding_side = "right"
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return model, tok


def inject_statistics(
    main_mod: Any, model: Any, hparams: Any, templates: list[str], c0: Any, preserved: bool
) -> None:
    """Our templates into the reference's template cache and our C₀ into its covariance
    cache (``preserved``: also an empty ``preserved_keys`` entry, as AlphaEdit reads)."""
    main_mod.CONTEXT_TEMPLATES_CACHE = [["{}"], templates[1:]]
    name = model.config._name_or_path.replace("/", "_")
    for layer in hparams.layers:
        module = hparams.rewrite_module_tmp.format(layer)
        main_mod.COV_CACHE[(name, module)] = c0[layer]
        if preserved:
            main_mod.COV_CACHE[(name, module, "preserved_keys")] = None


def spy(module: Any, name: str, record: Any) -> None:
    """Wrap ``module.name`` so that ``record`` sees each of its results."""
    fn = getattr(module, name)

    def wrapped(*a: Any, **k: Any) -> Any:
        res = fn(*a, **k)
        record(res)
        return res

    setattr(module, name, wrapped)


def projectors(c0: dict[int, torch.Tensor], hparams: Any) -> torch.Tensor:
    """AlphaEdit's rule (the published ``get_project``), computed here from the same C₀."""
    ps = []
    for layer in hparams.layers:
        u, s, _ = torch.linalg.svd(c0[layer].cpu(), full_matrices=False)
        keep = (s < hparams.nullspace_threshold).nonzero(as_tuple=True)[0]
        ps.append(u[:, keep] @ u[:, keep].T)
    return torch.stack(ps)


def fix_device(dev: Any) -> Any:
    if isinstance(dev, str) and dev.startswith("cuda"):
        return "cpu"
    if isinstance(dev, torch.device) and dev.type == "cuda":
        return torch.device("cpu")
    return dev


class TorchOnCpu:
    """``torch`` as the published modules see it: factories given ``device="cuda"`` make
    CPU tensors. Only those modules get it; replacing ``torch.tensor`` itself with a Python
    wrapper changes transformers' Llama forward (keys 0.86 apart on SmolLM2)."""

    FACTORIES = ("zeros", "ones", "tensor", "eye", "full", "arange", "empty", "randn")

    def __getattr__(self, name: str) -> Any:
        attr = getattr(torch, name)
        if name not in self.FACTORIES:
            return attr

        def factory(*a: Any, **k: Any) -> Any:
            if "device" in k:
                k["device"] = fix_device(k["device"])
            return attr(*a, **k)

        return factory


def cpu_shim() -> None:
    """Map the published code's hard-coded "cuda" to the CPU (no CUDA here): ``.to`` and
    ``.cuda`` of tensors everywhere (transparent for every other device)."""
    orig_to = torch.Tensor.to

    def to(self: torch.Tensor, *a: Any, **k: Any) -> torch.Tensor:
        a = tuple(fix_device(x) for x in a)
        if "device" in k:
            k["device"] = fix_device(k["device"])
        return orig_to(self, *a, **k)

    torch.Tensor.to = to  # type: ignore[method-assign]
    torch.Tensor.cuda = lambda self, *a, **k: self  # type: ignore[method-assign]


def cpu_factories(src: Path) -> None:
    """Give every imported module of the checkout the CPU-mapping ``torch``."""
    proxy = TorchOnCpu()
    for mod in list(sys.modules.values()):
        path = getattr(mod, "__file__", None) or ""
        if path.startswith(str(src)) and getattr(mod, "torch", None) is torch:
            mod.torch = proxy  # type: ignore[attr-defined]


def tuple_shim(nethook: Any) -> None:
    """Under transformers 5 a block returns a tensor: show it to the reference as ``(h,)``."""
    orig_invoke = nethook.invoke_with_optional_args
    orig_copy = nethook.recursive_copy
    depth = [0]

    def invoke(fn: Any, *a: Any, **k: Any) -> Any:
        out = k.get("output")
        if isinstance(out, torch.Tensor):
            k["output"] = (out,)
            res = orig_invoke(fn, *a, **k)
            return res[0] if isinstance(res, tuple) else res
        return orig_invoke(fn, *a, **k)

    def copy(x: Any, *a: Any, **k: Any) -> Any:
        depth[0] += 1
        try:
            y = orig_copy(x, *a, **k)
        finally:
            depth[0] -= 1
        return (y,) if depth[0] == 0 and isinstance(y, torch.Tensor) else y

    nethook.invoke_with_optional_args = invoke
    nethook.recursive_copy = copy
