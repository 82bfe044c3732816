"""The replay's collapse probes against the number of edits: perplexity and fluency.

Perplexity (log scale, left axis, as log10 on a linear axis like the norm
chart) is far more sensitive than GLUE on a small model; the fluency probe's
generation entropy (linear, right axis) falls when generations degenerate.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from workbench.core.format import log10_or_none

from .chart import SeriesChart
from .norm_chart import COLORS, log_ticks, y_range

Points = Sequence[tuple[int, float]]


@dataclass
class ProbeSeries:
    label: str
    perplexity: Points = field(default_factory=list)  # (step, perplexity)
    fluency: Points = field(default_factory=list)  # (step, generation entropy)


class ProbeChart(SeriesChart[ProbeSeries]):
    """One perplexity line (left, log) and one fluency line (right) per run."""

    def __init__(self, title: str = "probes", *, id: str | None = None) -> None:
        super().__init__(title, id=id)

    def draw(self, plt: Any) -> None:
        many = len(self.series) > 1
        logs = self._plot_perplexity(many)
        drew_fluency = self._plot_fluency(many)
        if not logs and not drew_fluency:
            plt.title(f"{self.title}: no checkpoint yet")
            plt.plot([0], [0], color="gray", marker=" ")
        else:
            plt.title("perplexity (log, left) · fluency (right)" if logs else "fluency")
        self.edit_axis(plt, [x for s in self.series for x, _ in (*s.perplexity, *s.fluency)])
        if logs:
            # a tenth of a decade (26 %) at least: a 20 % rise in perplexity is the news
            lo, hi = y_range(logs, min_decades=0.1)
            plt.ylim(lo, hi, yside="left")
            ticks, labels = log_ticks(lo, hi)
            plt.yticks(ticks, labels, yside="left")

    def _plot_perplexity(self, many: bool) -> list[float]:
        """Draw the perplexity lines; the log10 values drawn."""
        drawn: list[float] = []
        for i, s in enumerate(self.series):
            pts = [(x, y) for x, v in s.perplexity if (y := log10_or_none(v)) is not None]
            if not pts:
                continue
            drawn += [y for _, y in pts]
            label = f"{s.label} ppl" if many else "perplexity"
            self._line(pts, label, COLORS[i % len(COLORS)], "braille", "left")
        return drawn

    def _plot_fluency(self, many: bool) -> bool:
        drew = False
        for i, s in enumerate(self.series):
            pts = list(s.fluency)
            if not pts:
                continue
            drew = True
            label = f"{s.label} fluency" if many else "fluency"
            self._line(pts, label, COLORS[(i + 3) % len(COLORS)], "dot", "right")
        return drew

    def _line(
        self, pts: Sequence[tuple[int, float]], label: str, color: str, marker: str, side: str
    ) -> None:
        xs = [p[0] for p in pts]
        ys = [p[1] for p in pts]
        if len(pts) == 1:
            self.plt.scatter(xs, ys, label=label, color=color, marker="dot", yside=side)
        else:
            self.plt.plot(xs, ys, label=label, color=color, marker=marker, yside=side)
