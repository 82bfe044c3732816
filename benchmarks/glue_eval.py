"""GLUE scoring speed: batched label log-probs vs one-at-a-time generate-and-match.

All methods see the same examples (``--limit`` per task, label-balanced) of
SST-2, MRPC, CoLA and RTE on SmolLM2-135M (CPU by default), with the same
token ids. The baseline is the published protocol: one example at a time, the
full few-shot prompt, ``model.generate`` of 3 greedy tokens, substring match.
The workbench's own generate path (``scoring="generate"``, batch 1) is timed
too. Methods are timed task by task, interleaved, so that load from other
processes hits them alike. Target: ratio >= 10.

    python benchmarks/glue_eval.py --limit 24
    python benchmarks/glue_eval.py --limit 200 --no-generate   # baseline accuracy
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from evals.glue import (  # noqa: E402
    GEN_TOKENS,
    GLUE_TASKS,
    TASKS,
    encode,
    glue_result,
    load_glue,
    match_label,
    predict,
)
from rome.batching import prompt_ids  # noqa: E402


@torch.no_grad()
def hf_generate_one_by_one(model, tok, task, examples) -> list[int]:
    """The published protocol: ``model.generate`` per example, substring match."""
    prefix = prompt_ids(tok, task.prefix())
    device = next(model.parameters()).device
    pred = []
    for e in examples:
        ids = torch.tensor([prefix + encode(tok, task, e)], device=device)
        out = model.generate(
            ids,
            attention_mask=torch.ones_like(ids),
            max_new_tokens=GEN_TOKENS,
            do_sample=False,
            pad_token_id=tok.pad_token_id or tok.eos_token_id,
        )
        pred.append(match_label(tok.decode(out[0, ids.shape[1] :]), task.label_words))
    return pred


@torch.no_grad()
def published_loop(model, tok, task, examples) -> list[int]:
    """The published per-example loop: generate-and-match, then one full forward
    (logits at every position) per label word to read its probability."""
    pred = hf_generate_one_by_one(model, tok, task, examples)
    prefix = prompt_ids(tok, task.prefix())
    device = next(model.parameters()).device
    for e in examples:
        for y in task.labels:
            lab = tok(task.label_words[y], add_special_tokens=False)["input_ids"]
            ids = torch.tensor([prefix + encode(tok, task, e) + lab], device=device)
            model(ids).logits.log_softmax(-1)
    return pred


def load(model_path: str | None, device: str):
    """(model, tokenizer): the engine's loader, or a local converted copy."""
    if model_path is None:
        try:
            from rome.models import load_model

            lm = load_model("smollm2-135m", device=device)
            return lm.model.eval(), lm.tokenizer
        except ImportError:
            sys.exit("rome.models is not available yet: pass --model-path (e.g. /tmp/smol)")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32)
    return model.to(device).eval(), AutoTokenizer.from_pretrained(model_path)


def bf16(fn, model, *args):
    """``fn(model, *args)`` under bf16 autocast (not the default: fp32 is)."""
    with torch.autocast(next(model.parameters()).device.type, dtype=torch.bfloat16):
        return fn(model, *args)


def parse_args() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model-path", default=None)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    ap.add_argument("--limit", type=int, default=24, help="examples per task")
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--tasks", nargs="+", default=list(TASKS))
    ap.add_argument("--no-generate", action="store_true", help="log-prob scoring only")
    ap.add_argument("--bf16", action="store_true", help="also time log-prob under bf16 autocast")
    ap.add_argument(
        "--published-loop",
        action="store_true",
        help="also time the published loop (generate + a full forward per label word)",
    )
    return ap.parse_args()


def scorers(model, tok, args: argparse.Namespace) -> dict[str, Callable]:
    """The timed methods, by name: each maps (task, examples) to predictions."""
    methods = {"logprob": lambda t, ex: predict(model, tok, t, ex, "logprob", args.batch_size)}
    if args.bf16:
        methods["logprob bf16"] = lambda t, ex: bf16(
            predict, model, tok, t, ex, "logprob", args.batch_size
        )
    if not args.no_generate:
        methods["generate x1"] = lambda t, ex: hf_generate_one_by_one(model, tok, t, ex)
    if args.published_loop:
        methods["published x1"] = lambda t, ex: published_loop(model, tok, t, ex)
    return methods


def print_totals(methods: dict, secs: dict[str, float], cpu: dict[str, float], n: int) -> None:
    for method, dt in secs.items():
        print(
            f"{method:14s} {n / dt:7.2f} examples/s wall, {n / cpu[method]:7.2f} "
            f"per CPU-second, over {n} examples"
        )
    for slow in (m for m in methods if "x1" in m):
        for fast in (m for m in methods if m.startswith("logprob")):
            print(
                f"ratio {fast} vs {slow}: {secs[slow] / secs[fast]:.1f}x wall, "
                f"{cpu[slow] / cpu[fast]:.1f}x CPU time (target >= 10x)"
            )


def main() -> None:
    args = parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    model, tok = load(args.model_path, args.device)
    print(f"torch threads: {torch.get_num_threads()}, device: {args.device}")
    methods = scorers(model, tok, args)
    secs = dict.fromkeys(methods, 0.0)
    cpu = dict.fromkeys(methods, 0.0)  # process CPU time: steadier on a shared machine
    n_total = 0
    for name in args.tasks:
        task = GLUE_TASKS[name]
        examples = load_glue(name, limit=args.limit)
        gold = [e.label for e in examples]
        n_total += len(examples)
        methods["logprob"](task, examples[:2])  # warm-up
        for method, run in methods.items():
            t0, c0 = time.perf_counter(), time.process_time()
            pred = run(task, examples)
            dt = time.perf_counter() - t0
            secs[method] += dt
            cpu[method] += time.process_time() - c0
            r = glue_result(name, gold, pred, method)
            print(
                f"{name:5s} {method:14s} n={r.n:3d} {r.n / dt:7.2f} ex/s  acc {r.accuracy:.3f}"
                f"  f1 {r.f1:.3f}  mcc {r.mcc:+.3f}  invalid {r.invalid}",
                flush=True,
            )
    print_totals(methods, secs, cpu, n_total)


if __name__ == "__main__":
    main()
