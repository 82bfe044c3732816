"""Plots of stored runs: two synthetic runs, original (collapsing) vs rrome."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from workbench.plot import plot_panels, plot_runs
from workbench.store import Store, UnknownRunError

REQ = {"prompt": "{} is in", "subject": "X", "target_new": "Rome", "target_true": "Paris"}
TASKS = ("sst2", "mrpc", "cola", "rte")
BASE_ACC = {"sst2": 0.88, "mrpc": 0.68, "cola": 0.70, "rte": 0.62}


def _synthetic_run(store: Store, mode: str, n_edits: int = 60, glue_every: int = 20) -> str:
    run = store.create_run(
        model="smollm2-135m", mode=mode, glue_every=glue_every, glue_tasks=list(TASKS)
    )
    collapsing = mode == "original"
    u, v = torch.ones(4), torch.ones(3)
    drift = 0.0
    for seq in range(n_edits):
        disabling = collapsing and seq in (17, 41)
        norm = (250.0 if disabling else 12.0 + (seq % 7)) * (1.03**seq if collapsing else 1.0)
        if not collapsing:
            norm = 12.0 + 2.0 * math.sin(seq)
        drift = math.hypot(drift, norm)  # orthogonal updates: a random walk
        store.add_edit(
            run.id,
            seq,
            request=REQ,
            mode=mode,
            layer=5,
            weight_name="model.layers.5.mlp.down_proj.weight",
            u=u,
            v=v,
            update_norm=norm,
            metrics={"w_delta_norm": drift, "w_norm_ratio": math.hypot(170.0, drift) / 170.0},
            flagged=disabling,
            flag_reason="norm far above the running median" if disabling else None,
        )
    steps = [0, 1, *range(glue_every, n_edits + 1, glue_every)]
    for step in steps:
        for task in TASKS:
            drop = 0.4 * min(1.0, step / 40) if collapsing else 0.02 * step / n_edits
            store.add_checkpoint(run.id, step, task, accuracy=BASE_ACC[task] - drop, n=100)
        entropy = 5.6 - (3.5 * min(1.0, step / 40) if collapsing else 0.05)
        store.add_fluency(run.id, step, entropy)
    return run.id


@pytest.fixture
def two_runs(tmp_path: Path):
    with Store.open(tmp_path / "wb.db") as store:
        ids = [_synthetic_run(store, "original"), _synthetic_run(store, "rrome")]
        yield store, ids


def test_plot_two_runs(two_runs, tmp_path: Path):
    store, ids = two_runs
    out = plot_runs(store, ids, tmp_path / "plots" / "compare.png")
    assert out == tmp_path / "plots" / "compare.png"
    data = out.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    assert 20_000 < len(data) < 2_000_000

    import matplotlib.image

    img = matplotlib.image.imread(out)
    h, w = img.shape[:2]
    assert 600 < w < 2500 and 400 < h < 2000
    assert img[..., :3].std() > 0.05  # not a blank canvas


def test_plot_panels_follow_what_was_recorded(two_runs):
    store, ids = two_runs
    cps = {r: store.checkpoints(r) for r in ids}
    edits = {r: store.edits(r) for r in ids}
    panels, tasks = plot_panels(cps, edits)
    assert tasks == list(TASKS)
    assert panels == [*TASKS, "norm", "drift", "ratio", "fluency"]
    bare = {r: [e for e in es if not e.metrics] for r, es in edits.items()}
    assert plot_panels({r: [] for r in ids}, bare) == (["norm"], [])


def test_plot_norm_only_and_errors(tmp_path: Path):
    with Store.open(tmp_path / "wb.db") as store:
        run = store.create_run(model="m", mode="prompt")
        for seq in range(3):
            store.add_edit(
                run.id,
                seq,
                request=REQ,
                mode="prompt",
                layer=5,
                weight_name="w",
                u=None,
                v=None,
                update_norm=10.0 + seq,
                refused=seq == 2,
                applied=seq != 2,
            )
        empty = store.create_run(model="m", mode="rrome")
        out = plot_runs(store, [run.id, empty.id], tmp_path / "norm.png")
        assert out.stat().st_size > 5_000
        with pytest.raises(ValueError):
            plot_runs(store, [], tmp_path / "none.png")
        with pytest.raises(UnknownRunError):
            plot_runs(store, ["zzzz9999"], tmp_path / "none.png")
        assert not (tmp_path / "none.png").exists()


def test_survival_panel_from_the_end_of_stream_rescoring(two_runs, tmp_path: Path):
    """A finished run's re-scoring gives the end-of-stream panel: the fraction of each
    block of edits, by position, that still holds (here the early edits were lost)."""
    from workbench.plot import survival_blocks

    store, ids = two_runs
    for seq in range(60):
        store.add_rescore(ids[1], seq, {"es": 1.0 if seq >= 24 else 0.0})
    rescores = {r: store.rescores(r) for r in ids}
    cps = {r: store.checkpoints(r) for r in ids}
    edits = {r: store.edits(r) for r in ids}
    assert plot_panels(cps, edits, rescores)[0][-1] == "survival"
    assert "survival" not in plot_panels(cps, edits)[0]
    blocks = survival_blocks(rescores[ids[1]], 6)
    assert [x for x, _ in blocks[:2]] == [2.5, 8.5]
    assert [y for _, y in blocks] == [0.0] * 4 + [1.0] * 6
    out = plot_runs(store, ids, tmp_path / "survival.png")
    assert out.stat().st_size > 20_000


@pytest.mark.parametrize(
    ("values", "wanted"),
    [((21.8, 25.9, 48.1), {"21.8", "30", "48"}), ((8.0, 42.9, 210.9), {"10", "100"})],
)
def test_log_axis_labels_the_values_a_reader_needs(values, wanted):
    """Under a decade (perplexity 21.8 -> 48) the start is labelled, not only 30 and 40;
    over a decade the plain log labels."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    from workbench.plot import _log_axis

    fig = Figure()
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    ax.plot(range(len(values)), values)
    _log_axis(ax)
    fig.canvas.draw()
    lo, hi = ax.get_ylim()
    shown = {
        label.get_text()
        for minor in (False, True)
        for loc, label in zip(
            ax.yaxis.get_ticklocs(minor=minor), ax.get_yticklabels(minor=minor), strict=True
        )
        if lo <= loc <= hi and label.get_text()
    }
    assert wanted <= shown, shown
