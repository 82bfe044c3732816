"""Whether a computed update looks safe: probes before / after, and the verdict on
one edit of any method (the app's one verdict engine), each key mode of a compare
judged against the others.

The thresholds below are the interactive session's own; the "norm far above
the running median" rule is the replay's (``evals.replay.norm_flag``), applied
to the session's earlier edits.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Protocol

from evals.replay import ReplayConfig, norm_flag
from rome import EditResult

from .format import fprob

#: ‖ΔW‖ / ‖W‖ from which an update is called disabling, as a fraction of the preset's
#: ``max_update_ratio`` (the engine's refusal limit): 0.05 × 10 = 0.5 with the default
#: limit (the Hamlet case on SmolLM2: 1.48; clean edits: about 0.07).
DISABLING_FRACTION = 0.05
#: a mode whose norm is this many times the smallest mode's is called disabling.
MODE_NORM_FACTOR = 4.0
#: cos(k*, k(s)) below this warns that the original mode's denominator is small.
LOW_COS = 0.3


#: the replay's defaults for the running-median rule (factor 4, after 3 edits)
_NORM_RULE = ReplayConfig()


@dataclass(frozen=True)
class Probe:
    """p(target_new) and p(target_true) after one prompt."""

    name: str
    text: str
    p_new: float
    p_true: float | None


@dataclass(frozen=True)
class Verdict:
    """Whether an update looks safe: level ok / warn / bad (disabling) / refused."""

    level: str
    reasons: tuple[str, ...] = ()

    @property
    def disabling(self) -> bool:
        return self.level in ("bad", "refused")

    @property
    def label(self) -> str:
        return {"ok": "ok", "warn": "check", "bad": "DISABLING", "refused": "REFUSED"}[self.level]

    @property
    def summary(self) -> str:
        return "; ".join(self.reasons)


class Judged(Protocol):
    """The figures a verdict reads: a ROME :class:`~rome.EditResult`, or :class:`Figures`."""

    @property
    def mode(self) -> str: ...
    @property
    def update_norm(self) -> float: ...
    @property
    def update_norm_ratio(self) -> float: ...
    @property
    def unsafe_reason(self) -> str | None: ...
    @property
    def cos_kstar_ks(self) -> float: ...
    @property
    def p_new_after_templated(self) -> float: ...


@dataclass(frozen=True)
class Figures:
    """A step's figures for :func:`judge` when its method keeps no rank-one record
    (the batch methods): its name, ‖ΔW‖ and ‖ΔW‖ / ‖W‖ over the edited weights."""

    mode: str
    update_norm: float
    update_norm_ratio: float
    unsafe_reason: str | None = None
    cos_kstar_ks: float = math.nan
    p_new_after_templated: float = math.nan


@dataclass(frozen=True)
class Held:
    """What a row of a comparison table is judged on beside its own figures: the
    smallest update among the rows whose edit holds (its label and ‖ΔW‖; None where
    no other row holds), the fraction of requests won after the update, and the
    fraction it moved (won and p(new) rose: ``MethodOutcome.took``)."""

    yardstick: tuple[str, float] | None
    efficacy: float
    took: float


def judge(
    result: Judged,
    before: Sequence[Probe] = (),
    after: Sequence[Probe] | None = None,
    others: Iterable[EditResult] = (),
    history_norms: Sequence[float] = (),
    disabling_ratio: float = 0.5,
    held: Held | None = None,
) -> Verdict:
    """Say whether an update looks disabling, and why (see the thresholds above): one
    edit of the app or the CLI, or one row of a comparison table (``held``)."""
    if result.unsafe_reason:
        return Verdict("refused", (result.unsafe_reason,))
    bad: list[str] = []
    warn: list[str] = []
    ratio = result.update_norm_ratio
    if ratio >= disabling_ratio:
        bad.append(f"‖ΔW‖ is {ratio:.2f}× ‖W‖")
    if held is not None:
        _judge_row(result, held, bad, warn)
    norms = [o.update_norm for o in others if o.mode != result.mode and o.update_norm > 0]
    if norms and result.update_norm >= MODE_NORM_FACTOR * min(norms):
        low = min((o for o in others if o.mode != result.mode), key=lambda o: o.update_norm)
        bad.append(f"‖ΔW‖ is {result.update_norm / low.update_norm:.1f}× {low.mode}'s")
    if norm_flag(result.update_norm, list(history_norms), _NORM_RULE) is not None:
        med = statistics.median(history_norms)
        bad.append(f"‖ΔW‖ is {result.update_norm / med:.1f}× this session's median")
    if result.mode == "original" and result.cos_kstar_ks < LOW_COS:
        (bad if bad else warn).append(
            f"cos(k*, k(s)) = {result.cos_kstar_ks:.2f} is low: small denominator"
        )
    if after is not None:
        b = {p.name: p for p in before}
        for p in after:
            q = b.get(p.name)
            if p.name == "neighbour" and q and q.p_true is not None and p.p_true is not None:
                if q.p_true > 0.05 and p.p_true < 0.5 * q.p_true:
                    warn.append(f"neighbour p(true) fell {q.p_true:.2f}→{p.p_true:.2f}")
            if p.name == "prompt" and q and p.p_new <= q.p_new:
                warn.append("p(new) on the prompt did not rise")
            elif p.name == "prompt" and p.p_new < 0.5:
                templated = result.p_new_after_templated
                shown = "" if math.isnan(templated) else f" (templated {fprob(templated)})"
                warn.append(f"weak on the bare prompt: p(new) {fprob(p.p_new)}{shown}")
            if p.name == "paraphrase" and p.p_new < 0.1 and (q is None or p.p_new <= 2 * q.p_new):
                warn.append("does not carry over to the paraphrase")
    if bad:
        return Verdict("bad", tuple(bad + warn))
    if warn:
        return Verdict("warn", tuple(warn))
    return Verdict("ok", ())


def _judge_row(result: Judged, held: Held, bad: list[str], warn: list[str]) -> None:
    """A comparison row's rules: far above the smallest update that holds (an update
    that did not take is no yardstick, however small), and whether its edit holds."""
    if held.yardstick is not None:
        label, norm = held.yardstick
        if result.update_norm >= MODE_NORM_FACTOR * norm:
            bad.append(
                f"‖ΔW‖ is {result.update_norm / norm:.1f}× {label}'s, "
                "the smallest update whose edit holds"
            )
    if held.efficacy < 1.0:
        warn.append(f"{held.efficacy:.0%} of the requests hold on the bare prompt")
    elif held.took < 1.0:
        warn.append(
            f"p(new) barely rose on {1 - held.took:.0%} of the requests "
            "(target_new already won before)"
        )
