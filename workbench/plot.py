"""Static plots of stored runs (matplotlib, Agg; no pyplot global state, so it
is safe to call from a worker thread).

:func:`plot_runs` overlays several runs: one panel per GLUE task (accuracy
against the number of edits applied), one for the update norm of each edit
(log scale, flagged edits marked with a red x), one for the cumulative change
‖W_n − W_0‖ of the edited matrix, one for its growth ‖W_n‖ / ‖W_0‖, one for
the held-out perplexity, one for fluency (generation entropy) and one for
retention (the fraction of the run's first M edits still holding at each
checkpoint: the retention protocol of ``evals.protocols``), and one for the
end-of-stream re-scoring (the fraction of each block of edits, by position in
the stream, still holding on the final model), each when the runs recorded it.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Sequence
from pathlib import Path

from matplotlib.axes import Axes
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.ticker import (
    FixedLocator,
    FuncFormatter,
    LogFormatter,
    MaxNLocator,
    NullLocator,
)

from evals.protocols import END_OF_STREAM, RETENTION, RETENTION_TASK
from workbench.store import FLUENCY_TASK, Checkpoint, Edit, Rescore, Run, Store

log = logging.getLogger(__name__)

GLUE_ORDER = ("sst2", "mrpc", "cola", "rte")
TASK_TITLES = {"sst2": "SST-2", "mrpc": "MRPC", "cola": "CoLA", "rte": "RTE"}
CHANCE = 0.5
PERPLEXITY_TASK = "perplexity"  # evals.replay.PERPLEXITY_TASK (no evals import here)
SURVIVAL = "survival"  # the end-of-stream panel


def _finite(x: float | None) -> bool:
    return x is not None and math.isfinite(x)


def _task_order(tasks: set[str]) -> list[str]:
    known = [t for t in GLUE_ORDER if t in tasks]
    return known + sorted(tasks - set(GLUE_ORDER))


def plot_panels(
    checkpoints: dict[str, list[Checkpoint]],
    edits: dict[str, list[Edit]],
    rescores: dict[str, list[Rescore]] | None = None,
) -> tuple[list[str], list[str]]:
    """The panels a plot of these runs gets, in order, and the GLUE tasks among them:
    one per task, the update norm, and the others when some run recorded their figure."""
    probes = {FLUENCY_TASK, PERPLEXITY_TASK, RETENTION_TASK}
    tasks = _task_order({c.task for cps in checkpoints.values() for c in cps} - probes)
    has = {
        t: any(c.task == t and _finite(c.value) for cps in checkpoints.values() for c in cps)
        for t in probes
    }
    has_drift = any("w_delta_norm" in (e.metrics or {}) for es in edits.values() for e in es)
    panels = [
        *tasks,
        "norm",
        *(["drift", "ratio"] if has_drift else []),
        *([PERPLEXITY_TASK] if has[PERPLEXITY_TASK] else []),
        *([FLUENCY_TASK] if has[FLUENCY_TASK] else []),
        *([RETENTION_TASK] if has[RETENTION_TASK] else []),
        *([SURVIVAL] if any((rescores or {}).values()) else []),
    ]
    return panels, tasks


def plot_runs(
    store: Store,
    run_ids: Sequence[str],
    out_path: str | Path,
    *,
    title: str | None = None,
    dpi: int = 110,
) -> Path:
    """Plot ``run_ids`` (full ids or unique prefixes) overlaid into a PNG (or any
    format matplotlib infers from the suffix) at ``out_path``; returns the path."""
    if not run_ids:
        raise ValueError("plot_runs needs at least one run id")
    runs: list[Run] = [store.get_run(r) for r in run_ids]
    checkpoints: dict[str, list[Checkpoint]] = {r.id: store.checkpoints(r.id) for r in runs}
    edits: dict[str, list[Edit]] = {r.id: store.edits(r.id) for r in runs}
    rescores: dict[str, list[Rescore]] = {r.id: store.rescores(r.id) for r in runs}

    panels, tasks = plot_panels(checkpoints, edits, rescores)
    fig, flat, width = _figure(len(panels), dpi)
    colours = [f"C{i % 10}" for i in range(len(runs))]
    max_x = _last_step(runs, checkpoints, edits)

    any_flagged = False
    any_refused = False
    for ax, panel in zip(flat, panels, strict=False):
        if panel == "norm":
            any_flagged, any_refused = _norm_panel(ax, runs, edits, colours)
        else:
            _draw_panel(ax, panel, runs, checkpoints, edits, rescores, colours)
        ax.set_xlim(0, max_x * 1.02 + 0.5)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True, steps=[1, 2, 5, 10]))
        ax.grid(True, alpha=0.3, which="major")

    handles = _legend_handles(runs, colours, bool(tasks), any_flagged, any_refused)
    models = sorted({r.model for r in runs})
    _legend(fig, handles, width, title or f"{', '.join(models)}: {len(runs)} run(s)")

    out = Path(out_path)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=dpi)
    log.info("plotted runs %s to %s", ", ".join(r.id for r in runs), out)
    return out


def _figure(n_panels: int, dpi: int) -> tuple[Figure, list[Axes], float]:
    """A figure with a grid of ``n_panels`` axes (2 columns for 4 panels, else up to 3;
    the unused cells removed): the figure, its axes in reading order, its width."""
    ncols = min(3, n_panels) if n_panels != 4 else 2
    nrows = math.ceil(n_panels / ncols)
    width = max(7.0, 5.0 * ncols)
    fig = Figure(figsize=(width, 3.5 * nrows + 0.8), dpi=dpi, layout="constrained")
    FigureCanvasAgg(fig)
    axes_grid = fig.subplots(nrows, ncols, squeeze=False)
    flat: list[Axes] = [ax for row in axes_grid for ax in row]
    for ax in flat[n_panels:]:
        ax.remove()
    return fig, flat, width


def _last_step(
    runs: Sequence[Run], checkpoints: dict[str, list[Checkpoint]], edits: dict[str, list[Edit]]
) -> int:
    """The furthest edit number any run reached (a checkpoint's step or an edit), at least 1."""
    max_x = 1
    for run in runs:
        for c in checkpoints[run.id]:
            max_x = max(max_x, c.step)
        for e in edits[run.id]:
            max_x = max(max_x, e.seq + 1)
    return max_x


def _draw_panel(
    ax: Axes,
    panel: str,
    runs: Sequence[Run],
    checkpoints: dict[str, list[Checkpoint]],
    edits: dict[str, list[Edit]],
    rescores: dict[str, list[Rescore]],
    colours: Sequence[str],
) -> None:
    """Draw one panel other than the update norm's (a GLUE task where none else fits)."""
    if panel == "drift":
        _drift_panel(ax, runs, edits, colours, "w_delta_norm")
    elif panel == "ratio":
        _drift_panel(ax, runs, edits, colours, "w_norm_ratio")
    elif panel == PERPLEXITY_TASK:
        _perplexity_panel(ax, runs, checkpoints, colours)
    elif panel == FLUENCY_TASK:
        _fluency_panel(ax, runs, checkpoints, colours)
    elif panel == RETENTION_TASK:
        _retention_panel(ax, runs, checkpoints, colours)
    elif panel == SURVIVAL:
        _survival_panel(ax, runs, rescores, colours)
    else:
        _task_panel(ax, panel, runs, checkpoints, colours)


def _legend_handles(
    runs: Sequence[Run], colours: Sequence[str], tasks: bool, flagged: bool, refused: bool
) -> list[Line2D]:
    """One entry per run, then the chance line (``tasks``: a GLUE panel is drawn) and the
    flagged and refused markers where some panel shows them."""
    handles: list[Line2D] = [
        Line2D([], [], color=col, marker="o", ms=4, lw=1.8, label=run.label)
        for run, col in zip(runs, colours, strict=True)
    ]
    if tasks:
        handles.append(Line2D([], [], color="0.4", ls="--", lw=1, label=f"chance ({CHANCE:g})"))
    if flagged:
        handles.append(
            Line2D([], [], color="red", marker="x", ls="none", ms=8, mew=2, label="flagged edit")
        )
    if refused:
        handles.append(
            Line2D(
                [], [], color="0.3", marker="s", mfc="none", ls="none", ms=6, label="refused edit"
            )
        )
    return handles


def _legend(fig: Figure, handles: list[Line2D], width: float, title: str) -> None:
    """The legend above the panels, carrying the title."""
    # The title rides on the legend: constrained layout stacks an "outside"
    # legend with the axes but not with a suptitle (they would overlap).
    # About 2.3 inches per legend entry, so the legend wraps instead of clipping.
    fig.legend(
        handles=handles,
        loc="outside upper center",
        ncol=max(1, min(len(handles), int(width // 2.3))),
        frameon=False,
        fontsize=10,
        title=title,
        title_fontproperties={"size": 13},
    )


Point = tuple[float, float | None]


def _lines(
    ax: Axes,
    runs: Sequence[Run],
    colours: Sequence[str],
    points: Callable[[Run], list[Point]],
    marker: str | None = "o",
) -> None:
    """One line per run through its finite points (x, y)."""
    for run, col in zip(runs, colours, strict=True):
        pts = [(x, y) for x, y in points(run) if _finite(y)]
        if pts:
            xs, ys = zip(*pts, strict=True)
            ax.plot(xs, ys, color=col, marker=marker, ms=4, lw=1.8)


def _at_checkpoints(
    checkpoints: dict[str, list[Checkpoint]],
    task: str,
    value: Callable[[Checkpoint], float | None],
) -> Callable[[Run], list[Point]]:
    """A run's (step, value) at its checkpoints of ``task``."""
    return lambda run: [(c.step, value(c)) for c in checkpoints[run.id] if c.task == task]


def _labels(ax: Axes, title: str, xlabel: str, ylabel: str) -> None:
    ax.set_title(title)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)


def _task_panel(
    ax: Axes,
    task: str,
    runs: Sequence[Run],
    checkpoints: dict[str, list[Checkpoint]],
    colours: Sequence[str],
) -> None:
    _lines(ax, runs, colours, _at_checkpoints(checkpoints, task, lambda c: c.accuracy))
    ax.axhline(CHANCE, color="0.4", ls="--", lw=1)
    ax.set_ylim(0.0, 1.0)
    _labels(ax, f"{TASK_TITLES.get(task, task)} accuracy", "edits applied", "accuracy")


def _fluency_panel(
    ax: Axes,
    runs: Sequence[Run],
    checkpoints: dict[str, list[Checkpoint]],
    colours: Sequence[str],
) -> None:
    _lines(ax, runs, colours, _at_checkpoints(checkpoints, FLUENCY_TASK, lambda c: c.value))
    _labels(ax, "fluency (generation entropy)", "edits applied", "entropy")


def _retention_panel(
    ax: Axes,
    runs: Sequence[Run],
    checkpoints: dict[str, list[Checkpoint]],
    colours: Sequence[str],
) -> None:
    """The retention protocol: the fraction of each run's first M edits still holding."""
    _lines(ax, runs, colours, _at_checkpoints(checkpoints, RETENTION_TASK, lambda c: c.value))
    sizes = sorted(
        {
            int((c.extra or {}).get("size") or c.n or 0)
            for cps in checkpoints.values()
            for c in cps
            if c.task == RETENTION_TASK
        }
    )
    m = "/".join(str(s) for s in sizes) or "M"
    ax.set_ylim(0.0, 1.02)
    _labels(
        ax, f"{RETENTION}: first {m} edits holding (ES = 1)", "edits applied", "fraction holding"
    )


def survival_blocks(rescores: Sequence[Rescore], block: int) -> list[tuple[float, float]]:
    """(middle edit number, fraction holding) of each block of ``block`` edits, by
    position in the stream, from the end-of-stream re-scoring (ES = 1 holds)."""
    groups: dict[int, list[bool]] = {}
    for r in rescores:
        es = r.metrics.get("es")
        if isinstance(es, (int, float)):
            groups.setdefault(r.seq // block, []).append(es >= 1.0)
    return [
        (b * block + (block - 1) / 2, sum(held) / len(held)) for b, held in sorted(groups.items())
    ]


def _survival_panel(
    ax: Axes,
    runs: Sequence[Run],
    rescores: dict[str, list[Rescore]],
    colours: Sequence[str],
) -> None:
    """The end-of-stream protocol by position: which part of the stream still holds."""
    longest = max((len(rs) for rs in rescores.values()), default=0)
    block = 100 if longest >= 500 else max(1, longest // 10)
    _lines(ax, runs, colours, lambda run: list(survival_blocks(rescores[run.id], block)))
    ax.set_ylim(0.0, 1.02)
    _labels(
        ax,
        f"{END_OF_STREAM}: edits holding, by blocks of {block}",
        "edit number",
        "fraction holding",
    )


def _perplexity_panel(
    ax: Axes,
    runs: Sequence[Run],
    checkpoints: dict[str, list[Checkpoint]],
    colours: Sequence[str],
) -> None:
    perplexity = _at_checkpoints(
        checkpoints, PERPLEXITY_TASK, lambda c: (c.extra or {}).get("perplexity")
    )
    _lines(ax, runs, colours, perplexity)
    _log_axis(ax)
    _labels(ax, "held-out perplexity (Python docs prose)", "edits applied", "perplexity (log)")


def _log_axis(ax: Axes) -> None:
    """A log y axis labelled in plain numbers (12, 250).

    Under one decade (perplexity 21.8 -> 48) the log locator would label only 30 and 40,
    leaving the start unread: there the ticks are evenly spaced round numbers, the lowest
    data value among them.
    """
    ax.set_yscale("log")
    lo, hi = ax.dataLim.intervaly
    if 0 < lo < hi < 10 * lo:
        clear = lo * (hi / lo) ** 0.1  # no round tick crowding the lowest value's label
        ticks = [t for t in MaxNLocator(nbins=5).tick_values(lo, hi) if clear < t <= hi * 1.05]
        ax.yaxis.set_major_locator(FixedLocator([lo, *ticks]))
        ax.yaxis.set_minor_locator(NullLocator())
        ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:.3g}"))
        return
    ax.yaxis.set_major_formatter(LogFormatter(labelOnlyBase=False))
    ax.yaxis.set_minor_formatter(LogFormatter(labelOnlyBase=False, minor_thresholds=(1.2, 0.5)))


DRIFT_TITLES = {  # metric -> (title, y label)
    "w_delta_norm": ("cumulative change ‖W_n − W_0‖", "‖W_n − W_0‖_F"),
    "w_norm_ratio": ("norm growth ‖W_n‖ / ‖W_0‖", "‖W_n‖_F / ‖W_0‖_F"),
}


def _drift_panel(
    ax: Axes,
    runs: Sequence[Run],
    edits: dict[str, list[Edit]],
    colours: Sequence[str],
    metric: str,
) -> None:
    """One per-edit figure of the edited matrix after each applied edit, runs overlaid."""
    _lines(
        ax,
        runs,
        colours,
        lambda run: [
            (e.seq + 1, (e.metrics or {}).get(metric)) for e in edits[run.id] if e.applied
        ],
        marker=None,
    )
    title, ylabel = DRIFT_TITLES[metric]
    _labels(ax, title, "edit number", ylabel)


def _norm_panel(
    ax: Axes,
    runs: Sequence[Run],
    edits: dict[str, list[Edit]],
    colours: Sequence[str],
) -> tuple[bool, bool]:
    any_flagged = any_refused = plotted = False
    for run, col in zip(runs, colours, strict=True):
        pts = [
            (e.seq + 1, float(e.update_norm), e)
            for e in edits[run.id]
            if e.update_norm is not None and math.isfinite(e.update_norm) and e.update_norm > 0
        ]
        if not pts:
            continue
        plotted = True
        xs = [p[0] for p in pts]
        ys = [p[1] for p in pts]
        many = len(pts) > 200
        ax.plot(xs, ys, color=col, marker="." if many else "o", ms=2 if many else 3.5, lw=1.2)
        flagged = [(x, y) for x, y, e in pts if e.flagged]
        if flagged:
            any_flagged = True
            fx, fy = zip(*flagged, strict=True)
            ax.plot(fx, fy, ls="none", marker="x", color="red", ms=9, mew=2, zorder=5)
        refused = [(x, y) for x, y, e in pts if e.refused]
        if refused:
            any_refused = True
            rx, ry = zip(*refused, strict=True)
            ax.plot(rx, ry, ls="none", marker="s", mfc="none", color="0.3", ms=7, zorder=4)
    if plotted:
        _log_axis(ax)
    else:
        ax.text(
            0.5,
            0.5,
            "no update norms recorded",
            ha="center",
            va="center",
            transform=ax.transAxes,
            color="0.4",
        )
    _labels(ax, "update norm ‖ΔW‖ per step (an edit or a batch)", "edit number", "‖ΔW‖ (log)")
    return any_flagged, any_refused


__all__ = ["plot_panels", "plot_runs"]
