"""ENCORE (Gupta et al. 2025; SasyaTitech/NAS ``baselines/encore/encore_main.py``,
``compute_z.py``, ``hparams/ENCORE``).

MEMIT's layer loop with three changes, all float64 in the solve:

- the solve is (w·C₀ + ν·I + SEQ + K Kᵀ) A = K, Δ = R Aᵀ, with w =
  ``mom2_update_weight``, ν = ``norm_lambda`` (the Frobenius-norm penalty on ΔW)
  and SEQ = Σ K Kᵀ over the earlier steps (``add_prev_edits``);
- SEQ sums the keys as each layer's solve used them (the published
  ``SEQ_CACHE``), in float64. MEMIT_seq and AlphaEdit re-read them after the
  step, in float32; the keys are the same (a layer's input does not depend on
  its own or later layers' weights), the sums' precision is not. Here the state
  is folded in when a step is applied (``fold``; the published code folds
  it when it computes: the same for a stream whose every step is applied), from
  the keys stored with the step, so a resume rebuilds it;
- z stops early by the most-probable rule (MPES, ``prob_cutoff``): negative, the
  optimisation of a request stops at the ``|prob_cutoff|``-th step at which the
  argmax at exactly 5 target positions of its rewriting rows after the bare one
  is the target (as published: ``num_correct == 5``, which for one-token targets
  and 6 templates is "every prefixed prompt predicts the target"); positive, it
  stops once the mean over its rewriting rows of exp(−NLL) exceeds it; 0, off.

``dynamic_multiplier``, ``norm_control`` and ``random_vector_preservation`` are
in the published hparams files but read by none of its code: not settings here.
With ν = 0, no earlier keys and ``prob_cutoff`` 0 it is MEMIT (tests).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from ..context import EditContext
from ..errors import BadRequestError
from ..optimise import StepFacts, StopRule, ZStop
from .base import Update, setting
from .family import FamilyMethod, LayerContext, Solved
from .family.loop import FamilySettings
from .memit import accumulated, add_keys, solve_layer


@dataclass(frozen=True)
class EncoreSettings(FamilySettings):
    mom2_update_weight: float = setting(
        15000.0, "w, the weight of C₀", low=0, inclusive=False, legacy="mom2_update_weight"
    )
    norm_lambda: float = setting(10.0, "ν: the weight of ‖ΔW‖²_F in the objective", low=0.0)
    add_prev_edits: bool = setting(True, "add Σ K Kᵀ of the earlier steps' keys to the solve")
    prob_cutoff: float = setting(
        -4.0,
        "z's early stop: -n, the n-th most-probable step; p in (0, 1), mean probability; 0 off",
        low=-1000.0,
        high=1.0,
    )


#: the published rule counts exactly this many target positions (rows after the bare one)
MPES_CORRECT = 5


def _check_cutoff(values: Any) -> Any:
    cut = values.prob_cutoff
    if (cut < 0 and cut != int(cut)) or cut == 1:
        raise BadRequestError(
            f"encore: setting prob_cutoff must be a negative whole number (a count of "
            f"most-probable steps), 0, or a probability below 1, not {cut!r}"
        )
    return values


def mpes_rule(prob_cutoff: float) -> StopRule:
    """The published early stop for one optimisation (a counter per request)."""
    counters: dict[int, int] = {}

    def rule(facts: StepFacts) -> list[bool]:
        out = []
        facts_per_request = zip(
            facts.requests, facts.correct_after_first, facts.p_target, strict=True
        )
        for r, correct, p in facts_per_request:
            stop = False
            if prob_cutoff < 0 and correct == MPES_CORRECT:
                counters[r] = counters.get(r, 0) + 1
                stop = counters[r] == abs(int(prob_cutoff))
            if prob_cutoff > 0 and p > prob_cutoff:
                stop = True
            out.append(stop)
        return out

    return rule


class Encore(FamilyMethod):
    """ENCORE: ``norm_lambda``, ``add_prev_edits``, ``prob_cutoff``; λ = ``mom2_update_weight``."""

    name = "encore"
    summary = "memit with a norm penalty, earlier keys and an early z stop"
    Settings = EncoreSettings
    keys_on = "loop"

    def settings(self, hp: Any, overrides: Any = None) -> Any:
        return _check_cutoff(super().settings(hp, overrides))

    def stores_keys(self, settings: Any) -> bool:
        return True

    def z_stop(self, settings: Any) -> ZStop | None:
        cut = settings.prob_cutoff
        return None if cut == 0 else (lambda: mpes_rule(cut))

    def solve(self, ctx: EditContext, lc: LayerContext, settings: Any) -> Solved:
        prev = accumulated(ctx, lc.layer) if settings.add_prev_edits else None  # float64
        return solve_layer(
            ctx, lc, settings.mom2_update_weight, prev, settings.norm_lambda, "previous_keys"
        )

    def fold(self, state: Any, update: Update) -> Any:
        return add_keys(state, update, torch.float64)
