"""Named lines on a linear axis: the norm growth ‖W_n‖ / ‖W_0‖ and the retention curve."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from .chart import SeriesChart
from .norm_chart import COLORS


@dataclass
class Line:
    label: str
    points: Sequence[tuple[int, float]] = field(default_factory=list)


class LineChart(SeriesChart[Line]):
    """One line per series; ``ylim`` fixes the y range (e.g. 0..1 for a fraction)."""

    def __init__(
        self,
        title: str,
        *,
        xlabel: str = "edits",
        empty: str = "nothing recorded yet",
        ylim: tuple[float, float] | None = None,
        id: str | None = None,
        classes: str | None = None,
    ) -> None:
        super().__init__(title, xlabel=xlabel, id=id)
        if classes:
            self.add_class(*classes.split())
        self.empty = empty
        self.ylim = ylim

    def draw(self, plt: Any) -> None:
        drew = False
        for i, s in enumerate(self.series):
            pts = list(s.points)
            if not pts:
                continue
            drew = True
            xs = [p[0] for p in pts]
            ys = [p[1] for p in pts]
            color = COLORS[i % len(COLORS)]
            if len(pts) == 1:
                plt.scatter(xs, ys, label=s.label, color=color, marker="dot")
            else:
                plt.plot(xs, ys, label=s.label, color=color, marker="braille")
        if not drew:
            plt.title(f"{self.title}: {self.empty}")
            plt.plot([0], [0], color="gray", marker=" ")
            return
        plt.title(self.title)
        self.edit_axis(plt, [x for s in self.series for x, _ in s.points])
        if self.ylim is not None:
            plt.ylim(*self.ylim)
