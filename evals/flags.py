"""The disabling-edit flags of a replay: an update norm far above the running median,
fluency falling, perplexity rising (each against the run's own start)."""

from __future__ import annotations

import statistics

from .spec import ReplayConfig


def norm_flag(norm: float, history: list[float], cfg: ReplayConfig) -> str | None:
    """Why an update norm looks disabling, measured against the run's running median."""
    if len(history) < cfg.flag_min_history:
        return None
    med = statistics.median(history)
    if med > 0 and norm > cfg.flag_norm_factor * med:
        return f"update norm {norm:.3g} is {norm / med:.1f}x the running median {med:.3g}"
    return None


def fluency_flag(entropy: float, base: float | None, cfg: ReplayConfig) -> str | None:
    """Why a checkpoint's fluency looks broken: its entropy fell under a share of the start's."""
    if base and entropy < cfg.flag_entropy_ratio * base:
        return f"fluency entropy fell to {entropy:.2f} from {base:.2f} at the start"
    return None


def perplexity_flag(ppl: float, base: float | None, cfg: ReplayConfig) -> str | None:
    """Why a checkpoint's perplexity looks broken: it rose over a multiple of the start's."""
    if base and ppl > cfg.flag_ppl_ratio * base:
        return (
            f"perplexity rose to {ppl:.1f} from {base:.1f} at the start "
            f"(over {cfg.flag_ppl_ratio:g}x)"
        )
    return None
