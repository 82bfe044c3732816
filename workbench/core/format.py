"""Number formatting shared by the panes."""

from __future__ import annotations

import math


def fnum(x: float | None, digits: int = 3) -> str:
    """A compact number: 3 significant digits, '–' for None, 'nan'/'inf' as such."""
    if x is None:
        return "–"
    if isinstance(x, float) and math.isnan(x):
        return "nan"
    if isinstance(x, float) and math.isinf(x):
        return "inf"
    ax = abs(x)
    if ax != 0 and (ax >= 1e5 or ax < 1e-3):
        return f"{x:.{max(1, digits - 1)}e}"
    return f"{x:.{digits}g}"


def fprob(p: float | None) -> str:
    """A probability in 5 characters: '0.123', '<.001', '–'."""
    if p is None:
        return "–"
    if math.isnan(p):
        return "nan"
    if p < 0.001:
        return "<.001"
    return f"{p:.3f}"


def farrow(before: float | None, after: float | None) -> str:
    return f"{fprob(before)}→{fprob(after)}"


def fbytes(n: int | float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"


def fseconds(s: float | None) -> str:
    if s is None:
        return "–"
    if s < 60:
        return f"{s:.1f} s"
    m, sec = divmod(int(round(s)), 60)
    if m < 60:
        return f"{m}m{sec:02d}s"
    h, m = divmod(m, 60)
    return f"{h}h{m:02d}m"


def log10_or_none(x: float | None) -> float | None:
    if x is None or not math.isfinite(x) or x <= 0:
        return None
    return math.log10(x)
