"""zsRE scoring parity with the published code: per-token verdicts, ours against
kmeng01/memit's ``experiments/py/eval_utils_zsre.py``, on the same models and records.

    OMP_NUM_THREADS=1 python benchmarks/zsre_parity.py --reference-src ~/src/memit \\
        [--model tiny-gpt2] [--n 5] [--method rome] [--json-out parity.json]

``--reference-src`` is the user's own checkout of kmeng01/memit. Our side loads the
model, reads the first N records of the zsRE file (``--data``, default the bundled
800) with ``evals.zsre``, saves the unedited model, edits the N records with
``--method`` (rome: one at a time in r-ROME's key mode; memit / emmet / alphaedit:
one batch), saves the edited model, and scores every record on both models with
``evals.zsre_scoring.zsre_metrics``. A subprocess then runs inside the checkout
(cwd and PYTHONPATH; it never imports this project): it builds the N requests with
the published ``dsets.zsre.MENDQADataset`` from the same file, and scores each on
the same two saved models with the published ``compute_rewrite_quality_zsre``.

Printed: the records whose requests differ (prompt, subject, targets, paraphrase,
neighbourhood prompts and targets), and for each model the per-token verdicts
compared (edit prompt, paraphrase and neighbourhood tokens) and how many disagree.
The target is 0 disagreements.

Run-time shims, in the reference subprocess only (nothing in the checkout changes):
on a machine without CUDA the published ``.to("cuda")`` of a tokenizer batch goes to
the CPU; where scikit-learn or SciPy is not installed, ``dsets`` (which imports them
for the TF-IDF of the CounterFact generation metrics, unused by zsRE scoring) gets
empty stand-ins; the tokenizer pads on the right with its end-of-text token, as
MEMIT's ``experiments/evaluate.py`` sets it (GPT-2's own padding side).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import torch

GROUPS = {  # ours -> the published result's key
    "rewrite": "rewrite_prompts_correct",
    "paraphrase": "paraphrase_prompts_correct",
    "neighborhood": "neighborhood_prompts_correct",
}
MODELS = ("unedited", "edited")


# ------------------------------------------------------------------ our side
def _edit(lm: Any, records: list[Any], method: str) -> None:
    """Apply ``method``'s edits of ``records`` to ``lm.model`` (kept applied)."""
    from rome import Editor
    from rome.hparams import method_preset

    ed = Editor(lm.model, lm.tokenizer, method_preset(lm.hparams, method), keep_undo=False)
    reqs = [r.to_request() for r in records]
    groups = [[r] for r in reqs] if method == "rome" else [reqs]
    for group in groups:
        opts = {"mode": "rrome"} if method == "rome" else {}
        ed.apply_step(ed.edit(group, method, **opts), force=True)


def _requests(lm: Any, records: list[Any]) -> list[dict[str, Any]]:
    """Our requests as the published record dicts have them (for the comparison)."""
    from evals.zsre_scoring import neighborhood_queries

    tok = lm.tokenizer
    return [
        {
            "prompt": r.prompt,
            "subject": r.subject,
            "target_new": r.target_new,
            "target_true": r.target_true,
            "paraphrase": r.paraphrase_prompts,
            "neighborhood": [[p, t] for p, t in neighborhood_queries(tok, r)],
        }
        for r in records
    ]


def run_ours(args: argparse.Namespace, work: Path) -> dict[str, Any]:
    from evals.datasets import load_records
    from evals.zsre_scoring import zsre_metrics
    from rome import load_model

    lm = load_model(args.model)
    loaded = load_records(args.data, limit=args.n, tokenizer=lm.tokenizer)
    if loaded.kind != "zsRE":
        raise SystemExit(f"error: {args.data} is not a zsRE file")
    records = loaded.records
    out: dict[str, Any] = {"case_ids": [r.case_id for r in records]}
    out["requests"] = _requests(lm, records)
    out["attn"] = lm.model.config._attn_implementation
    for name in MODELS:
        if name == "edited":
            _edit(lm, records, args.method)
        lm.model.save_pretrained(work / name, safe_serialization=True)
        lm.tokenizer.save_pretrained(work / name)
        out[name] = [zsre_metrics(lm.model, lm.tokenizer, r).tokens for r in records]
    data = Path(args.data) if Path(args.data).is_file() else None
    if data is None:
        from evals.datasets import NAMED_SOURCES

        data = NAMED_SOURCES[args.data]
    (work / "data").mkdir()
    (work / "data" / "zsre_mend_eval.json").symlink_to(data.resolve())
    (work / "spec.json").write_text(json.dumps({"n": len(records), "attn": out["attn"]}))
    return out


# ------------------------------------------------------------------ the comparison
def _diff(a: list[int], b: list[Any]) -> int:
    """Positions whose verdicts differ, plus any difference in length."""
    return sum(int(x) != int(y) for x, y in zip(a, b, strict=False)) + abs(len(a) - len(b))


def _request_diffs(ours: list[dict[str, Any]], ref: list[dict[str, Any]], tok: Any) -> list[str]:
    """The records whose request (or neighbourhood queries) differ from the published."""
    from evals.zsre_scoring import first_id

    out = []
    for i, (a, b) in enumerate(zip(ours, ref, strict=True)):
        rw = b["requested_rewrite"]
        near = [[p["prompt"], first_id(tok, p["target"])] for p in b["neighborhood_prompts"]]
        same = (
            a["prompt"] == rw["prompt"]
            and a["subject"] == rw["subject"]
            and a["target_new"] == rw["target_new"]["str"]
            and a["target_true"] == rw["target_true"]["str"]
            and a["paraphrase"] == b["paraphrase_prompts"]
            and a["neighborhood"] == near
        )
        if not same:
            out.append(f"record {i}")
    return out


def compare(ours: dict[str, Any], ref: dict[str, Any], tok: Any) -> dict[str, Any]:
    differ = _request_diffs(ours["requests"], ref["requests"], tok)
    res: dict[str, Any] = {"requests_differ": differ}
    for name in MODELS:
        per = {g: {"tokens": 0, "disagree": 0, "ours_right": 0, "ref_right": 0} for g in GROUPS}
        for mine, theirs in zip(ours[name], ref[name], strict=True):
            for g, key in GROUPS.items():
                a, b = mine[g], theirs[key]
                per[g]["tokens"] += max(len(a), len(b))
                per[g]["disagree"] += _diff(a, b)
                per[g]["ours_right"] += sum(a)
                per[g]["ref_right"] += sum(int(x) for x in b)
        res[name] = per
    res["disagreements"] = sum(p["disagree"] for n in MODELS for p in res[n].values())
    res["tokens"] = sum(p["tokens"] for n in MODELS for p in res[n].values())
    return res


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--reference-src", type=Path, required=True)
    ap.add_argument("--model", default="tiny-gpt2", help="tiny-gpt2, smollm2-135m, ...")
    ap.add_argument("--data", default="zsre", help="'zsre' (bundled) or a MEND-format file")
    ap.add_argument("--n", type=int, default=5, help="records (the file's first)")
    ap.add_argument("--method", default="rome", choices=("rome", "memit", "emmet", "alphaedit"))
    ap.add_argument("--json-out", type=Path, default=None)
    ap.add_argument("--worker", type=Path, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker is not None:
        reference_worker(args.worker)
        return
    src = args.reference_src.resolve()
    if not (src / "experiments" / "py" / "eval_utils_zsre.py").is_file():
        sys.stderr.write(f"error: {src} has no experiments/py/eval_utils_zsre.py (kmeng01/memit)\n")
        raise SystemExit(2)
    with tempfile.TemporaryDirectory(prefix="zsre-parity-") as tmp:
        work = Path(tmp)
        ours = run_ours(args, work)
        env = dict(os.environ, PYTHONPATH=str(src))
        cmd = [sys.executable, str(Path(__file__).resolve()), "--reference-src", str(src)]
        cmd += ["--worker", str(work)]
        with open(work / "reference.log", "w") as log:
            done = subprocess.run(cmd, cwd=src, env=env, stdout=log, stderr=log)
        if done.returncode != 0:
            sys.stdout.write((work / "reference.log").read_text()[-4000:])
            raise SystemExit(f"the reference run failed (exit {done.returncode})")
        ref = json.loads((work / "reference.json").read_text())
        from transformers import AutoTokenizer

        res = compare(ours, ref, AutoTokenizer.from_pretrained(work / "unedited"))
    report(args, ours, res)
    if args.json_out is not None:
        args.json_out.write_text(json.dumps({"args": _args(args), **res}, indent=1))


def _args(args: argparse.Namespace) -> dict[str, Any]:
    return {k: str(v) for k, v in vars(args).items() if k != "worker"}


def report(args: argparse.Namespace, ours: dict[str, Any], res: dict[str, Any]) -> None:
    ids = ", ".join(map(str, ours["case_ids"]))
    lines = [
        f"zsRE scoring parity: model {args.model}, {len(ours['case_ids'])} records "
        f"(case ids {ids}), edited with {args.method}",
        f"requests that differ from the published reader's: {len(res['requests_differ'])}"
        + (f" ({', '.join(res['requests_differ'])})" if res["requests_differ"] else ""),
    ]
    for name in MODELS:
        for g, p in res[name].items():
            lines.append(
                f"{name:8s} {g:12s} tokens {p['tokens']:4d}  top-1 right: ours "
                f"{p['ours_right']:4d} published {p['ref_right']:4d}  disagree {p['disagree']}"
            )
    lines.append(
        f"per-token disagreements: {res['disagreements']} of {res['tokens']} verdicts (target 0)"
    )
    sys.stdout.write("\n".join(lines) + "\n")


# ------------------------------------------------------------------ the reference side
def reference_worker(work: Path) -> None:
    """Runs inside the published checkout (cwd and PYTHONPATH): never imports our package."""
    here = str(Path(__file__).resolve().parent)
    sys.path[:] = [p for p in sys.path if p not in ("", here, str(Path(here).parent))]
    sys.path.insert(0, os.getcwd())
    spec = json.loads((work / "spec.json").read_text())
    import importlib

    from transformers import AutoModelForCausalLM, AutoTokenizer

    _stand_ins()  # after transformers, which looks for the real packages as it imports
    if not torch.cuda.is_available():
        _cpu_batches()

    evaluate = importlib.import_module("experiments.py.eval_utils_zsre")
    zsre = importlib.import_module("dsets.zsre")
    out: dict[str, Any] = {}
    for name in MODELS:
        model = AutoModelForCausalLM.from_pretrained(
            work / name, dtype=torch.float32, attn_implementation=spec["attn"]
        ).eval()
        if torch.cuda.is_available():
            model = model.cuda()
        tok = AutoTokenizer.from_pretrained(work / name)
        tok.pad_token = tok.eos_token  # as MEMIT's experiments/evaluate.py
        tok.padding_side = "right"
        records = zsre.MENDQADataset(str(work / "data"), tok, size=spec["n"])
        if name == MODELS[0]:
            out["requests"] = [records[i] for i in range(len(records))]
        out[name] = [
            {
                k: [int(x) for x in v]
                for k, v in evaluate.compute_rewrite_quality_zsre(
                    model, tok, records[i], None, None
                ).items()
            }
            for i in range(len(records))
        ]
    (work / "reference.json").write_text(json.dumps(out))


def _stand_ins() -> None:
    """Empty modules for scikit-learn and SciPy where they are not installed: ``dsets``
    imports them for CounterFact's TF-IDF, which zsRE scoring never calls."""
    import importlib
    import importlib.machinery
    import types

    for name in ("sklearn.feature_extraction.text", "scipy.sparse"):
        try:
            importlib.import_module(name)
            continue
        except ImportError:
            pass
        parts = name.split(".")
        for i in range(1, len(parts) + 1):
            mod_name = ".".join(parts[:i])
            if mod_name not in sys.modules:
                stub = types.ModuleType(mod_name)
                stub.__spec__ = importlib.machinery.ModuleSpec(mod_name, None)
                sys.modules[mod_name] = stub
            if i > 1:
                setattr(sys.modules[".".join(parts[: i - 1])], parts[i - 1], sys.modules[mod_name])
        if name.startswith("sklearn"):
            sys.modules[name].TfidfVectorizer = type("TfidfVectorizer", (), {})  # type: ignore[attr-defined]


def _cpu_batches() -> None:
    """The published code sends its tokenizer batches ``.to("cuda")``: the CPU here."""
    from transformers.tokenization_utils_base import BatchEncoding

    real = BatchEncoding.to

    def to(self: Any, device: Any, *a: Any, **k: Any) -> Any:
        if str(device).startswith("cuda"):
            device = "cpu"
        return real(self, device, *a, **k)

    BatchEncoding.to = to  # type: ignore[method-assign]


if __name__ == "__main__":
    main()
