"""GLUE accuracy (and the fluency probe) against the number of edits applied."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from textual_plotext import PlotextPlot

TASK_COLORS = {"sst2": "cyan", "mrpc": "orange", "cola": "green", "rte": "magenta"}


class GlueChart(PlotextPlot):
    """One line per task (and per run when runs are overlaid)."""

    DEFAULT_CSS = "GlueChart { min-height: 8; }"

    def __init__(self, title: str = "GLUE accuracy", *, id: str | None = None) -> None:
        super().__init__(id=id)
        self.title = title
        self.runs: list[tuple[str, Mapping[str, Sequence[tuple[int, float]]]]] = []

    def on_mount(self) -> None:
        super().on_mount()
        self.replot()

    def set_runs(
        self, runs: Sequence[tuple[str, Mapping[str, Sequence[tuple[int, float]]]]]
    ) -> None:
        """``[(run label, {task: [(step, accuracy)]})]``; a single run is labelled by task."""
        self.runs = list(runs)
        self.replot()

    def replot(self) -> None:
        plt = self.plt
        plt.clear_data()
        plt.clear_figure()
        plt.title(self.title)
        plt.xlabel("edits")
        plt.ylim(0, 1)
        drew = False
        markers = ("braille", "dot", "x", "+")
        for r, (run_label, tasks) in enumerate(self.runs):
            for task, pts in tasks.items():
                pts = [p for p in pts if p[1] is not None]
                if not pts:
                    continue
                drew = True
                xs = [p[0] for p in pts]
                ys = [p[1] for p in pts]
                label = task if len(self.runs) == 1 else f"{run_label} {task}"
                color = TASK_COLORS.get(task, "white")
                marker = markers[r % len(markers)]
                if len(pts) == 1:
                    plt.scatter(xs, ys, label=label, color=color, marker="dot")
                else:
                    plt.plot(xs, ys, label=label, color=color, marker=marker)
        if not drew:
            plt.title("GLUE: no checkpoint yet")
            plt.plot([0], [0.5], color="gray", marker=" ")
        self.refresh()
