"""The base of the app's charts: a list of series, redrawn whenever it is set."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any, Generic, TypeVar

from textual_plotext import PlotextPlot

S = TypeVar("S")


def edit_ticks(lo: float, hi: float, most: int = 6) -> list[int]:
    """Whole-number x ticks (edit numbers) at a 1, 2, 5 × 10^k step, at most ``most``:
    plotext's own ticks split the range evenly (1.0, 250.8, 500.5 ... for edits 1..1000)."""
    span = max(hi - lo, 1.0)
    for k in range(int(math.log10(span)) + 2):
        for m in (1, 2, 5):
            step = m * 10**k
            if span / step <= most - 1:
                first = math.ceil(lo / step) * step
                return list(range(first, int(hi) + 1, step))
    return [int(lo), int(hi)]


class SeriesChart(PlotextPlot, Generic[S]):
    """Subclasses draw ``self.series`` in :meth:`draw`; the figure is cleared first."""

    DEFAULT_CSS = "SeriesChart { min-height: 8; }"

    def __init__(self, title: str, *, xlabel: str = "edits", id: str | None = None) -> None:
        super().__init__(id=id)
        self.title = title
        self.xlabel = xlabel
        self.series: list[S] = []

    def on_mount(self) -> None:
        super().on_mount()
        self.replot()

    def set_series(self, series: Sequence[S]) -> None:
        self.series = list(series)
        self.replot()

    def replot(self) -> None:
        plt = self.plt
        plt.clear_data()
        plt.clear_figure()
        plt.xlabel(self.xlabel)
        self.draw(plt)
        self.refresh()

    def draw(self, plt: Any) -> None:
        """Plot the series on ``plt`` (plotext's figure)."""
        raise NotImplementedError

    def edit_axis(self, plt: Any, xs: Sequence[float]) -> None:
        """Whole-number ticks on the x axis (edits), for ranges past ten edits."""
        if xs and max(xs) - min(xs) > 10:
            plt.xticks(edit_ticks(min(xs), max(xs)))
