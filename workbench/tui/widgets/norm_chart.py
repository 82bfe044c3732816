"""Update norm against edit number, as log10 on a linear axis.

Plotext's log-scale axis breaks on repeated redraws, so the chart plots
log10(‖ΔW‖) on a linear axis, with ticks at 1, 2, 5 × 10^k labelled as norms.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from workbench.core.format import log10_or_none

from .chart import SeriesChart

COLORS = ("cyan", "orange", "green", "magenta", "blue", "yellow")


def log_ticks(lo: float, hi: float) -> tuple[list[float], list[str]]:
    """Tick positions (log10 values) at 1, 2, 5 × 10^k inside [lo, hi], labelled as norms."""
    pos: list[float] = []
    for k in range(math.floor(lo) - 1, math.ceil(hi) + 1):
        for m in (1, 2, 5):
            y = k + math.log10(m)
            if lo <= y <= hi:
                pos.append(y)
    if len(pos) > 6:  # keep the decades only
        pos = [y for y in pos if abs(y - round(y)) < 1e-9] or pos[:: len(pos) // 5]
    if len(pos) < 2:  # less than one 1-2-5 step in range: four evenly spaced labels
        pos = [lo + i * (hi - lo) / 3 for i in range(4)]
    return pos, [tick_label(10**y) for y in pos]


def tick_label(v: float) -> str:
    if v >= 1e6:
        return f"{v / 1e6:.3g}M"
    if v >= 1e3:
        return f"{v / 1e3:.3g}k"
    if v >= 1:
        return f"{v:.3g}"
    return f"{v:.2g}"


def y_range(values: Sequence[float], min_decades: float = 0.6) -> tuple[float, float]:
    """A padded range of log10 values, at least ``min_decades`` tall."""
    lo, hi = min(values), max(values)
    pad = max(min_decades / 6, (hi - lo) * 0.1)
    lo, hi = lo - pad, hi + pad
    if hi - lo < min_decades:
        mid = (hi + lo) / 2
        lo, hi = mid - min_decades / 2, mid + min_decades / 2
    return lo, hi


@dataclass
class NormSeries:
    label: str
    points: list[tuple[int, float]]  # (edit number, norm)
    flagged: list[int] = field(default_factory=list)  # edit numbers flagged


class NormChart(SeriesChart[NormSeries]):
    """log10 ‖ΔW‖ per edit for one or more series (runs, or session and cumulative)."""

    def __init__(
        self, title: str = "update norm", *, xlabel: str = "edit", id: str | None = None
    ) -> None:
        super().__init__(title, xlabel=xlabel, id=id)

    def draw(self, plt: Any) -> None:
        plt.title(f"{self.title} (log scale)")
        any_data = False
        for i, s in enumerate(self.series):
            pts = [(x, log10_or_none(y)) for x, y in s.points]
            pts = [(x, y) for x, y in pts if y is not None]
            if not pts:
                continue
            any_data = True
            xs = [p[0] for p in pts]
            ys = [p[1] for p in pts]
            color = COLORS[i % len(COLORS)]
            if len(pts) == 1:
                plt.scatter(xs, ys, label=s.label, color=color, marker="dot")
            else:
                plt.plot(xs, ys, label=s.label, color=color, marker="braille")
            flagged = set(s.flagged)
            fx = [x for x, _ in pts if x in flagged]
            fy = [y for x, y in pts if x in flagged]
            if fx:
                plt.scatter(fx, fy, color="red", marker="x", label="flagged")
        if not any_data:
            plt.title(f"{self.title}: no edits yet")
            plt.plot([0], [0], color="gray", marker=" ")
        else:
            ys_all = [
                y for s in self.series for _, v in s.points if (y := log10_or_none(v)) is not None
            ]
            lo, hi = y_range(ys_all)
            plt.ylim(lo, hi)
            ticks, labels = log_ticks(lo, hi)
            plt.yticks(ticks, labels)
            xs_all = [x for s in self.series for x, _ in s.points]
            self.edit_axis(plt, xs_all)
            if xs_all and max(xs_all) <= 10:
                plt.xticks(list(range(min(xs_all), max(xs_all) + 1)))
                plt.xlim(min(xs_all) - 0.5, max(xs_all) + 0.5)
