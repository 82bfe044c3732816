"""Norm-anchor scaling (NAS; Liu et al. 2026, arXiv 2602.02543).

Sequential edits feed on themselves: a grown ``W`` gives a larger ``v_init``
at the next edit, hence a larger ``v*`` and a larger update. NAS breaks the
loop by rescaling every solved ``v*`` to a reference norm measured once on
the *unedited* model:

    ρ = mean of ‖v*(r)‖ over a fixed calibration set of requests r, solved on
        the original weights (the largest 5 % left out, as the paper's code does)
    v*_anchored = v* · ρ / ‖v*‖

The direction of ``v*`` (what the edit says) is kept, only its length is
anchored. The calibration requests are fixed and shipped here (common facts
with a counterfactual target, no dataset needed) so the anchor depends only on
the model, the layer and the v* settings, and can be cached. The preset's
``v_norm_anchor_samples`` says how many of them (the first N) the anchor uses.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
from collections.abc import Callable, Sequence
from pathlib import Path

import torch

from .errors import BadRequestError
from .progress import StepProgress
from .request import EditRequest

log = logging.getLogger(__name__)

TRIM_UPPER = 0.05  # share of the largest norms left out of the mean

CALIBRATION_REQUESTS: tuple[EditRequest, ...] = tuple(
    EditRequest(prompt=p, subject=s, target_new=t)
    for p, s, t in (
        ("{} is located in the city of", "The Eiffel Tower", "Rome"),
        ("The capital of {} is", "Japan", "London"),
        ("{} is a company from", "Toyota", "Brazil"),
        ("{} was written by", "Hamlet", "Charles Dickens"),
        ("The native language of {} is", "Angela Merkel", "French"),
        ("{} plays the sport of", "Lionel Messi", "basketball"),
        ("{} is a member of the", "Paul McCartney", "Rolling Stones"),
        ("The official language of {} is", "Brazil", "German"),
        ("{} was developed by", "Windows", "Apple"),
        ("{} is the capital of", "Paris", "Italy"),
        ("The headquarters of {} are in", "Google", "Berlin"),
        ("{} was born in", "Albert Einstein", "Canada"),
        ("{}, who plays the", "Jimi Hendrix", "violin"),
        ("{} is located in the continent of", "Egypt", "Europe"),
        ("{} works in the field of", "Marie Curie", "music"),
        ("The mother tongue of {} is", "Vladimir Putin", "Spanish"),
        ("{} is produced by", "iPhone", "Samsung"),
        ("{} was founded in", "Microsoft", "Italy"),
        ("{} is affiliated with the religion of", "The Pope", "Buddhism"),
        ("{} is a citizen of", "Barack Obama", "Sweden"),
    )
)


def calibration_requests(n: int) -> tuple[EditRequest, ...]:
    """The first ``n`` calibration requests (``v_norm_anchor_samples``)."""
    if not 1 <= n <= len(CALIBRATION_REQUESTS):
        raise BadRequestError(
            f"v_norm_anchor_samples must be 1 to {len(CALIBRATION_REQUESTS)} "
            f"(the calibration requests shipped in rome/anchor.py), not {n}"
        )
    return CALIBRATION_REQUESTS[:n]


def trimmed_mean(values: Sequence[float], upper: float = TRIM_UPPER) -> float:
    """Mean after dropping the largest ``floor(upper · n)`` values."""
    if not values:
        raise ValueError("no values")
    xs = sorted(values)
    drop = int(math.floor(upper * len(xs)))
    kept = xs[: len(xs) - drop] if drop else xs
    return sum(kept) / len(kept)


def anchor_key(fields: dict[str, object]) -> str:
    """A short hash of what decides the calibration v*'s (settings, templates, requests)."""
    blob = json.dumps(fields, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


def reference_norm(
    solve: Callable[[EditRequest], torch.Tensor],
    requests: Sequence[EditRequest],
    cache_file: Path | None = None,
    progress: StepProgress | None = None,
) -> float:
    """ρ from ``solve(request) -> v*`` over ``requests``, cached as JSON when a path is given.

    ``solve`` must run on the unedited model; the caller makes sure it does.
    """
    if cache_file is not None and cache_file.is_file():
        try:
            return float(json.loads(cache_file.read_text())["reference_norm"])
        except (ValueError, KeyError, OSError):
            log.warning("ignoring an unreadable norm-anchor cache %s", cache_file)
    norms = []
    for i, req in enumerate(requests):
        norms.append(float(solve(req).norm()))
        if progress is not None:
            progress(i + 1, len(requests))
    rho = trimmed_mean(norms)
    if cache_file is not None:
        cache_file.parent.mkdir(parents=True, exist_ok=True)
        tmp = cache_file.with_suffix(".tmp")
        tmp.write_text(json.dumps({"reference_norm": rho, "norms": norms}, indent=1))
        tmp.replace(cache_file)
    log.info("norm anchor %.3f from %d calibration edits", rho, len(norms))
    return rho


def anchored(v_star: torch.Tensor, rho: float) -> torch.Tensor:
    """``v*`` rescaled to norm ``rho`` (unchanged when it is zero)."""
    n = v_star.norm()
    return v_star if float(n) == 0.0 else v_star * (rho / n)
