"""GLUE accuracy against the number of edits applied, one line per task (and per run)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from .chart import SeriesChart

#: one run's accuracies: (run label, {task: [(step, accuracy)]})
GlueRun = tuple[str, Mapping[str, Sequence[tuple[int, float]]]]
TASK_COLORS = {"sst2": "cyan", "mrpc": "orange", "cola": "green", "rte": "magenta"}
RUN_COLORS = ("cyan", "orange", "green", "magenta", "blue", "yellow")


class GlueChart(SeriesChart[GlueRun]):
    """One line per task (and per run when runs are overlaid); a single run's by task."""

    def __init__(self, title: str = "GLUE accuracy", *, id: str | None = None) -> None:
        super().__init__(title, id=id)

    def draw(self, plt: Any) -> None:
        plt.title(self.title)
        plt.ylim(0, 1)
        drew = False
        markers = ("braille", "dot", "x", "+")
        one_task = len({t for _, tasks in self.series for t in tasks}) == 1
        for r, (run_label, tasks) in enumerate(self.series):
            for task, pts in tasks.items():
                pts = [p for p in pts if p[1] is not None]
                if not pts:
                    continue
                drew = True
                xs = [p[0] for p in pts]
                ys = [p[1] for p in pts]
                label = task if len(self.series) == 1 else f"{run_label} {task}"
                if one_task and len(self.series) > 1:  # one task: a colour per run
                    label, color, marker = run_label, RUN_COLORS[r % len(RUN_COLORS)], "braille"
                else:
                    color = TASK_COLORS.get(task, "white")
                    marker = markers[r % len(markers)]
                if len(pts) == 1:
                    plt.scatter(xs, ys, label=label, color=color, marker="dot")
                else:
                    plt.plot(xs, ys, label=label, color=color, marker=marker)
        if not drew:
            plt.title("GLUE: no checkpoint yet")
            plt.plot([0], [0.5], color="gray", marker=" ")
