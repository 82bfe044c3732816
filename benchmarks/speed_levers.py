"""The packed-linear and shared-KL-row levers one by one, in one process, interleaved.

    OMP_NUM_THREADS=1 python benchmarks/speed_levers.py [--repeats 3] [--model smollm2-135m]

ROME edits of the Eiffel Tower request (``original`` mode, 21 templates, fp32,
default stopping): all levers on, packed linears off (``ROME_PACKED_LINEAR=0``),
the shared KL row off (``share_kl=False``), one edit of each in turn per repeat
after a warm-up edit of each. Printed: each edit's CPU seconds, then per setting
the median, its ratio to all-on, and ‖ΔW − ΔW_all‖/‖ΔW_all‖.
"""

from __future__ import annotations

import argparse
import functools
import os
import statistics
import sys
import time

import speed
import torch

import rome.methods.rome as rome_method
import rome.optimise as optimise

SETTINGS = ("all", "no-packed", "no-share-kl")


def select(name: str) -> None:
    os.environ["ROME_PACKED_LINEAR"] = "0" if name == "no-packed" else "1"
    share = name != "no-share-kl"
    rome_method.optimise_targets = functools.partial(optimise.optimise_targets, share_kl=share)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--model", default="smollm2-135m")
    args = ap.parse_args()
    if args.repeats < 1:
        raise SystemExit("error: --repeats >= 1")
    from rome import Editor, EditRequest

    torch.set_num_threads(1)
    model, tok, hp = speed.load_ours(args.model)
    ed = Editor(model, tok, hp.replace(v_stop="loss"))
    ed.prepare()
    req = EditRequest(*speed.REQUESTS[0])
    for name in SETTINGS:  # warm-up (packs the weights once)
        select(name)
        ed.compute(req, mode="original", probe_after=False)
    cpu: dict[str, list[float]] = {n: [] for n in SETTINGS}
    delta: dict[str, torch.Tensor] = {}
    for rep in range(args.repeats):
        for name in SETTINGS:
            select(name)
            c0 = time.process_time()
            res = ed.compute(req, mode="original", probe_after=False)
            cpu[name].append(time.process_time() - c0)
            delta[name] = torch.outer(res.v.double(), res.u.double())
            steps = len(res.v_star_trace)
            sys.stdout.write(f"{name} {rep} {cpu[name][-1]:.2f} CPU s, {steps} steps\n")
    base = statistics.median(cpu["all"])
    for name in SETTINGS:
        med = statistics.median(cpu[name])
        d = float((delta[name] - delta["all"]).norm() / delta["all"].norm())
        sys.stdout.write(
            f"{name}: median {med:.2f} CPU s, {med / base:.3f}x all-on, rel dW vs all-on {d:.1e}\n"
        )
    sys.stdout.write(f"load average {os.getloadavg()}\n")


if __name__ == "__main__":
    main()
