"""Covariance collection speed: the stop-at-layer collector against a full forward pass.

Both collect the same statistics (checked) over the same texts: the bundled
GLUE sentences, so no sampling or network is needed. Prints tokens/second
and the ratio, next to the ideal n_layers / (layer + 1).

    python benchmarks/covariance.py [--model smollm2-135m] [--layer L] [--texts 400]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from rome import load_model
from rome.covariance import collect_moment_sum

GLUE = Path(__file__).resolve().parents[1] / "evals" / "data" / "glue"


def glue_texts(n: int) -> list[str]:
    texts = []
    for f in sorted(GLUE.glob("*.jsonl")):
        for line in f.read_text().splitlines():
            row = json.loads(line)
            texts.append(
                " ".join(str(row[k]) for k in ("sentence", "sentence1", "sentence2") if k in row)
            )
    return texts[:n]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--layer", type=int, default=None)
    ap.add_argument("--texts", type=int, default=400)
    ap.add_argument("--device", default="cpu")
    args = ap.parse_args()
    lm = load_model(args.model, device=args.device, layer=args.layer)
    layer = lm.hparams.layer
    module = lm.hparams.weight_module()
    texts = glue_texts(args.texts)
    collect_moment_sum(lm.model, lm.tokenizer, module, texts[:16], 16)  # warm-up
    out = {}
    for name, stop in (("full forward", False), ("stop at layer", True)):
        t0 = time.perf_counter()
        ms = collect_moment_sum(
            lm.model, lm.tokenizer, module, texts, len(texts), stop_at_layer=stop
        )
        mat, tokens = ms.mean(), ms.n_tokens  # the mean's division is part of the timing
        dt = time.perf_counter() - t0
        out[name] = (mat, tokens, dt)
        print(f"{name:14s} {tokens} tokens in {dt:6.2f} s: {tokens / dt:8.0f} tokens/s")
    same = torch.allclose(out["full forward"][0], out["stop at layer"][0], rtol=1e-4, atol=1e-6)
    ratio = out["full forward"][2] / out["stop at layer"][2]
    ideal = lm.n_layers / (layer + 1)
    print(
        f"speed-up {ratio:.2f}x (ideal n_layers/(layer+1) = {ideal:.2f}x, "
        f"{ratio / ideal:.2f} of ideal); same statistics: {same}"
    )


if __name__ == "__main__":
    main()
