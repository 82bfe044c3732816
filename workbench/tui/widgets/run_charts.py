"""Every panel of ``rome-workbench plot`` for the runs shown: GLUE (all tasks or one),
perplexity and fluency, ‖ΔW‖ and ‖W − W₀‖ (flagged edits marked), ‖W‖ / ‖W₀‖, and
the retention curve (the retention protocol: the first M edits holding)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

from textual import on
from textual.app import ComposeResult
from textual.containers import Horizontal, Vertical
from textual.widgets import Select

from evals.glue import TASKS
from evals.protocols import RETENTION

from .glue_chart import GlueChart
from .line_chart import Line, LineChart
from .norm_chart import NormChart, NormSeries
from .probe_chart import ProbeChart, ProbeSeries

if TYPE_CHECKING:
    from ..replay_data import ReplaySeries

ALL_TASKS = "all tasks"


class RunCharts(Vertical):
    """The charts of one or more runs (:meth:`show`); the GLUE task is chosen above its chart."""

    DEFAULT_CSS = """
    RunCharts { height: 1fr; }
    RunCharts > Horizontal { height: 1fr; }
    RunCharts .glue-column { width: 1fr; height: 1fr; }
    RunCharts .glue-column Select { width: 26; }
    RunCharts SeriesChart { width: 1fr; height: 1fr; }
    """

    def __init__(self, *, id: str | None = None) -> None:
        super().__init__(id=id)
        self.series: list[ReplaySeries] = []

    def compose(self) -> ComposeResult:
        with Horizontal():
            with Vertical(classes="glue-column"):
                yield Select(
                    [(ALL_TASKS, ALL_TASKS), *((t, t) for t in TASKS)],
                    value=ALL_TASKS,
                    allow_blank=False,
                    compact=True,
                    classes="glue-task",
                    tooltip="The GLUE task the chart shows (all tasks: one line per task)",
                )
                yield GlueChart("GLUE accuracy")
            yield ProbeChart("probes")
        with Horizontal():
            yield NormChart("‖ΔW‖ and ‖W − W₀‖", xlabel="edits")
            yield LineChart("norm growth ‖W‖ / ‖W₀‖", empty="no edits yet", classes="growth")
        with Horizontal():
            yield LineChart(
                f"{RETENTION}: first M edits holding",
                empty="none stored",
                ylim=(0.0, 1.02),
                classes="retention",
            )

    @property
    def glue_task(self) -> str:
        return str(self.query_one(".glue-task", Select).value)

    def set_task(self, task: str) -> None:
        self.query_one(".glue-task", Select).value = task

    def next_glue_task(self) -> None:
        """All tasks, then each task in turn."""
        order = [ALL_TASKS, *TASKS]
        self.set_task(order[(order.index(self.glue_task) + 1) % len(order)])

    @on(Select.Changed, ".glue-task")
    def _task_changed(self, event: Select.Changed) -> None:
        event.stop()
        self._draw_glue()

    def show(self, series: Sequence[ReplaySeries]) -> None:
        """Draw ``series`` (one per run) in every chart."""
        self.series = list(series)
        many = len(self.series) > 1
        self._draw_glue()
        self.query_one(ProbeChart).set_series(
            [ProbeSeries(s.short, s.perplexity, s.fluency) for s in self.series]
        )
        norms: list[NormSeries] = []
        for s in self.series:
            prefix = f"{s.label[:8]} " if many else ""
            norms.append(NormSeries(f"{prefix}‖ΔW‖", s.norms, [n for n, _ in s.flags]))
            if s.drift:
                norms.append(NormSeries(f"{prefix}‖W−W₀‖", s.drift))
        self.query_one(NormChart).set_series(norms)
        self.query_one(".growth", LineChart).set_series(
            [Line(s.short, s.ratio) for s in self.series]
        )
        sizes = sorted({s.retention_size for s in self.series if s.retention_size})
        retention = self.query_one(".retention", LineChart)
        m = "/".join(str(x) for x in sizes) or "M"
        retention.title = f"{RETENTION}: fraction of the first {m} edits holding"
        retention.set_series([Line(s.short, s.retention) for s in self.series])

    def _draw_glue(self) -> None:
        task = self.glue_task
        chart = self.query_one(GlueChart)
        chart.title = "GLUE accuracy" if task == ALL_TASKS else f"GLUE {task} accuracy"
        chart.set_series(
            [
                (
                    s.label[:8] if len(self.series) > 1 and task == ALL_TASKS else s.short,
                    s.glue if task == ALL_TASKS else {task: s.glue.get(task, [])},
                )
                for s in self.series
            ]
        )
