"""The base of the app's charts: a list of series, redrawn whenever it is set."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Generic, TypeVar

from textual_plotext import PlotextPlot

S = TypeVar("S")


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
