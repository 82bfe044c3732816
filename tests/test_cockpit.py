"""The researcher's cockpit: the three protocols on a tiny-model run with known answers,
the report, the Replay pane's settings reaching the stored run, any database browsed
(flagged edits, another process writing it), and the app's faults fixed (header after
a failed load, resuming a run whose writer is gone)."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from evals.protocols import END_OF_STREAM, IMMEDIATE, PROTOCOLS, RETENTION, RETENTION_TASK
from evals.replay import CheckpointDone, ReplayConfig, replay
from evals.retention import retention_of
from rome import load_model
from workbench.core.replay import config_errors, form_defaults
from workbench.core.summary import protocol_scores, run_summary
from workbench.plot import plot_panels
from workbench.store import Store

pytest.importorskip("textual")

from textual.widgets import DataTable, Input, Select  # noqa: E402
from tui_helpers import settle, wait_idle  # noqa: E402

from workbench.tui.app import WorkbenchApp  # noqa: E402
from workbench.tui.widgets.flagged_edits import FlaggedEdits  # noqa: E402
from workbench.tui.widgets.model_bar import ModelBar  # noqa: E402
from workbench.tui.widgets.run_charts import RunCharts  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
SIZE = (160, 50)


def _rec(case: int, prompt: str, subject: str, new: str, true: str, para: str, neigh: str):
    return {
        "case_id": case,
        "prompt": prompt.format(subject),
        "subject": subject,
        "target_new": new,
        "ground_truth": true,
        "rephrase_prompt": para,
        "locality_prompt": neigh,
        "locality_ground_truth": true,
    }


#: edit 2 overwrites edit 0: the same subject and prompt, another target (edit 0's true one)
OVERWRITE = [
    _rec(1, "{} is located in the city of", "The Eiffel Tower", "Rome", "Paris",
         "The Eiffel Tower is in", "The Louvre is in"),
    _rec(2, "The capital of {} is", "Japan", "Berlin", "Tokyo",
         "Japan has its capital in", "Toyota is a company from"),
    _rec(3, "{} is located in the city of", "The Eiffel Tower", "Paris", "Rome",
         "The Eiffel Tower is in", "The Colosseum is in"),
    _rec(4, "{} was written by", "Hamlet", "Charles Dickens", "William Shakespeare",
         "Hamlet is by", "Oliver Twist was written by"),
]  # fmt: skip


def strong(lm):
    """Edits that take on the random tiny model (the reference settings barely move it)."""
    return lm.hparams.replace(
        clamp_norm_factor=100.0, v_num_grad_steps=40, v_lr=1.0, v_weight_decay=0.0, kl_factor=0.0
    )


@pytest.fixture(scope="module")
def overwrite_run(tmp_path_factory: pytest.TempPathFactory):
    """A 4-edit original-mode run whose third edit overwrites the first; M = 2."""
    tmp = tmp_path_factory.mktemp("cockpit")
    data = tmp / "cf.json"
    data.write_text(json.dumps(OVERWRITE))
    lm = load_model("tiny-gpt2")
    store = Store.open(tmp / "runs.db")
    cfg = ReplayConfig(
        dataset=str(data),
        n_edits=4,
        mode="original",
        glue_every=1,
        glue_tasks=("sst2",),
        glue_limit=2,
        fluency_tokens=4,
        perplexity=False,
        retention_size=2,
    )
    events = list(replay(lm, store, cfg, hparams=strong(lm)))
    run_id = store.list_runs()[0].id
    yield store, run_id, events
    store.close()


# --------------------------------------------------------------------------- protocols


def test_an_overwritten_edit_leaves_the_retention_curve(overwrite_run) -> None:
    store, run_id, events = overwrite_run
    live = {e.step: e.retention for e in events if isinstance(e, CheckpointDone)}
    assert live[0] is None  # no edit yet: nothing to retain
    assert (live[1]["m"], live[1]["n_hold"], live[1]["lost"]) == (1, 1, [])
    assert (live[2]["m"], live[2]["n_hold"], live[2]["lost"]) == (2, 2, [])
    # edit 2 (seq 2) taught the tower "Paris" back: edit 0 no longer holds
    assert live[3]["lost"] == [0] and live[3]["n_hold"] == 1 and live[3]["value"] == 0.5
    stored = [retention_of(c) for c in store.checkpoints(run_id, task=RETENTION_TASK)]
    assert [(p.step, p.n_hold, p.m, p.size) for p in stored][:3] == [
        (1, 1, 1, 2),
        (2, 2, 2, 2),
        (3, 1, 2, 2),
    ]
    third = store.checkpoints(run_id, task=RETENTION_TASK)[2]
    assert third.value == 0.5 and third.n == 2 and third.extra["es"] == 0.5
    assert set(third.extra) >= {"es", "ps", "ns", "s", "n_hold", "m", "lost", "seconds"}
    # the overwriting edit itself took: immediate ES 1 for it
    assert store.edits(run_id)[2].metrics["es"] == 1.0


def test_the_summary_gives_scores_under_each_protocol(overwrite_run) -> None:
    store, run_id, _ = overwrite_run
    immediate, end, retention = protocol_scores(store, run_id)
    assert (immediate.protocol, end.protocol, retention.protocol) == PROTOCOLS
    edits = store.edits(run_id)
    assert immediate.n == 4 and immediate.es == sum(e.metrics["es"] for e in edits) / 4
    rescored = [r.metrics["es"] for r in store.rescores(run_id)]
    assert end.n == 4 and end.es == sum(rescored) / 4 and end.hold == sum(rescored)
    last = retention_of(store.checkpoints(run_id, task=RETENTION_TASK)[-1])
    assert retention.n == 2 and retention.hold == last.n_hold and retention.es == last.es
    rows = dict(run_summary(store, run_id, "finished").rows)
    for p in PROTOCOLS:
        assert f"ES / PS / NS / S ({p})" in rows
    assert rows[f"ES / PS / NS / S ({RETENTION})"].endswith(
        f"first 2 edits after 4 edits; {last.n_hold} of 2 hold"
    )
    assert "retention" in plot_panels({run_id: store.checkpoints(run_id)}, {})[0]


def test_report_writes_the_page_and_the_plot(overwrite_run, tmp_path) -> None:
    from workbench.cli import app

    store, run_id, _ = overwrite_run
    out = tmp_path / "report"
    res = CliRunner().invoke(app, ["report", run_id, "-o", str(out), "--db", str(store.path)])
    assert res.exit_code == 0, res.output
    page = (out / "README.md").read_text()
    assert (out / "runs.png").stat().st_size > 10_000
    assert "![" in page and "(runs.png)" in page
    for p in (IMMEDIATE, END_OF_STREAM, RETENTION):
        assert f"| {p} |" in page
    # 1 of 2 holding, with its exact interval: 1 - sqrt(0.975) = 0.013, sqrt(0.975) = 0.987
    assert "### Retention curve" in page and "| 3 | 1/2 [0.01, 0.99] |" in page
    assert "## Flagged edits" in page


def test_the_export_says_where_each_protocol_is(overwrite_run, tmp_path) -> None:
    store, run_id, _ = overwrite_run
    store.export_run(run_id, "json", tmp_path / "run.json")
    doc = json.loads((tmp_path / "run.json").read_text())
    assert tuple(doc["protocols"]) == PROTOCOLS
    retention = [c for c in doc["checkpoints"] if c["task"] == RETENTION_TASK]
    assert [retention_of(c).n_hold for c in retention][:3] == [1, 2, 1]


def test_report_says_when_runs_have_no_retention(tmp_path) -> None:
    from workbench.cli import app

    db = tmp_path / "old.db"
    with Store.open(db) as store:
        run = store.create_run(model="tiny-gpt2", mode="rrome", kind="replay", n_edits_planned=1)
        store.set_status(run.id, "finished")
    res = CliRunner().invoke(app, ["report", run.id, "-o", str(tmp_path / "r"), "--db", str(db)])
    assert res.exit_code == 0, res.output
    page = (tmp_path / "r" / "README.md").read_text()
    assert f"Run(s) {run.id} stored no retention passes" in page
    assert "left empty, not estimated" in page


# --------------------------------------------------------------------------- one set of defaults


def test_the_cli_and_the_app_take_their_replay_defaults_from_core() -> None:
    import typer

    from workbench.cli import app

    defaults = form_defaults()
    assert (defaults["n_edits"], defaults["glue_limit"], defaults["retention_size"]) == (
        100,
        50,
        100,
    )
    command = typer.main.get_command(app).commands["replay"]  # type: ignore[attr-defined]
    cli = {p.name: p.default for p in command.params}
    for key in ("n_edits", "glue_every", "glue_limit", "mode", "dataset", "retention_size"):
        assert cli[key] == defaults[key], key
    assert config_errors({"batch_size": "0"}) == {"batch_size": "must be at least 1"}
    assert "method" in config_errors({"method": "fancy"})
    assert config_errors({"retention_size": "0", "method": "memit"}) == {}


# --------------------------------------------------------------------------- the app


@pytest.fixture
def cockpit(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setenv("ROME_WORKBENCH_CACHE", str(tmp_path / "cache"))
    db = tmp_path / "wb.db"

    def make(**kw) -> WorkbenchApp:
        kw.setdefault("model", "tiny-gpt2")
        kw.setdefault("device", "cpu")
        kw.setdefault("db_path", db)
        return WorkbenchApp(**kw)

    make.db = db  # type: ignore[attr-defined]
    return make


async def until(pilot, cond, timeout: float = 60.0, what: str = "") -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        await pilot.pause(0.1)


def bar_text(app: WorkbenchApp) -> str:
    return str(app.query_one(ModelBar).render())


async def test_the_replay_pane_offers_every_setting_and_stores_them(cockpit) -> None:
    app = cockpit()
    async with app.run_test(size=SIZE) as pilot:
        await wait_idle(app, pilot)
        pane = app.replay_pane
        d = form_defaults()
        assert pane.query_one("#r-n_edits", Input).value == str(d["n_edits"]) == "100"
        assert pane.query_one("#r-glue_limit", Input).value == str(d["glue_limit"]) == "50"
        assert pane.query_one("#r-retention_size", Input).value == "100"
        assert pane.query_one("#r-method", Select).value == "rome"
        pane.query_one("#r-batch_size", Input).value = "0"
        app.action_start_replay()
        await pilot.pause()
        assert "Batch size must be at least 1" in str(pane.query_one("#replay-errors").render())
        assert not app.busy
        settings = {
            "#r-n_edits": "2",
            "#r-batch_size": "1",
            "#r-layer": "2",
            "#r-retention_size": "1",
            "#r-glue_every": "1",
            "#r-glue_limit": "2",
            "#r-order_seed": "4",
        }
        for sel, value in settings.items():
            pane.query_one(sel, Input).value = value
        pane.query_one("#r-mode", Select).value = "original"
        pane.query_one("#r-glue_calibration", Select).value = "contextual"
        pane.query_one("#r-v_stop", Select).value = "most_probable"
        pane.query_one("#r-norm_anchor", Select).value = "off"
        pane.query_one("#r-perplexity").value = False
        pane.query_one("#r-guard").value = True
        for task in ("mrpc", "cola", "rte"):
            pane.query_one(f"#r-task-{task}").value = False
        await pilot.pause()
        app.action_start_replay()
        await wait_idle(app, pilot, timeout=300)
        live = pane.all_series()[-1]
        assert [step for step, _ in live.retention] == [1, 2] and live.retention_size == 1
    with Store.open(cockpit.db) as store:
        (run,) = store.list_runs(kind="replay")
        spec = run.hparams["replay"]
        assert (spec["n_edits"], spec["layer"], spec["retention_size"]) == (2, 2, 1)
        assert (spec["method"], spec["batch_size"], spec["mode"]) == ("rome", 1, "original")
        assert (spec["glue_every"], spec["glue_limit"], spec["glue_tasks"]) == (1, 2, ["sst2"])
        assert spec["glue_calibration"] == "contextual" and spec["guard"] is True
        assert spec["perplexity"] is False and spec["order_seed"] == 4
        assert run.hparams["hparams"]["v_stop"] == "most_probable"
        assert run.hparams["hparams"]["v_norm_anchor"] is False
        assert {e.layer for e in store.edits(run.id)} == {2}


async def test_a_failed_load_leaves_no_loading_header(cockpit) -> None:
    app = cockpit()
    async with app.run_test(size=SIZE) as pilot:
        await wait_idle(app, pilot)
        assert "tiny-gpt2" in bar_text(app)
        app.model_pane.query_one("#model-name", Input).value = "no-such-org/no-such-model-xyz"
        app.action_load_model()
        await wait_idle(app, pilot)
        shown = bar_text(app)
        assert "loading" not in shown and "tiny-gpt2" in shown


def _fake_flagged_run(db: Path) -> str:
    with Store.open(db) as store:
        run = store.create_run(model="tiny-gpt2", mode="original", kind="replay", n_edits_planned=3)
        with store.acquire_writer(run.id):
            for seq, norm in enumerate((10.0, 752.6, 12.0)):
                store.add_edit(
                    run.id,
                    seq,
                    request={"prompt": "{} is to debut on", "subject": "Crossfire",
                             "target_new": "CBS", "target_true": "CNN"},
                    mode="original",
                    layer=1,
                    weight_name="w",
                    u=torch.ones(2),
                    v=torch.ones(3),
                    case_id=529 + seq,
                    update_norm=norm,
                    cos_kstar_ks=0.06,
                    denominator=22.4,
                    metrics={"es": 0.0, "ps": 0.0, "ns": 1.0, "pre": {"es": 0.0, "ns": 1.0}},
                    flagged=seq == 1,
                    flag_reason="update norm 753 is 51.1x the running median 14.7"
                    if seq == 1
                    else None,
                )  # fmt: skip
            store.set_status(run.id, "finished")
        return run.id


async def test_a_database_is_browsed_and_a_flagged_edit_shows_its_record(cockpit, tmp_path):
    other = tmp_path / "other.db"
    run_id = _fake_flagged_run(other)
    app = cockpit(autoload=False)
    async with app.run_test(size=SIZE) as pilot:
        await wait_idle(app, pilot)
        app.switch_database(other)
        await until(pilot, lambda: app.runs_pane.runs, what="the other database's runs")
        pane = app.runs_pane
        assert app.active_tab == "runs"
        assert [r.id for r in pane.runs] == [run_id]
        table = pane.query_one("#runs-table", DataTable)
        assert table.get_row_at(0)[1] == "original"
        pane.post_message(pane.Show("open", run_id))
        await until(pilot, lambda: pane.series, what="the run's charts")
        await settle(app)
        await pilot.pause()
        flagged = pane.query_one(FlaggedEdits)
        flagged.select(run_id, 1)
        detail = flagged.detail_text()
        assert '"Crossfire is to debut on" → CBS (was CNN)' in detail
        assert "cos(k*, k(s)): 0.06" in detail and "denominator: 22.4" in detail
        assert "‖ΔW‖: 752.6" in detail and "51.1x the running median" in detail
        assert "pre (just before): ES 0" in detail
        charts = pane.query_one(RunCharts)
        assert [n for n, _ in charts.series[0].norms] == [1, 2, 3]
        charts.next_glue_task()
        assert charts.glue_task == "sst2"


WRITER = """
import sys, time
from evals.replay import ReplayConfig, replay
from rome import load_model
from workbench.store import Store
store = Store.open(sys.argv[1])
cfg = ReplayConfig(n_edits=4, glue_every=2, glue_tasks=("sst2",), glue_limit=2,
                   fluency_tokens=4, perplexity=False, retention_size=2)
for ev in replay(load_model("tiny-gpt2"), store, cfg):
    time.sleep(0.7)  # slow enough for the app to see the run grow
"""


async def test_a_database_written_by_another_process_is_refreshed(cockpit, tmp_path) -> None:
    app = cockpit(autoload=False)
    async with app.run_test(size=SIZE) as pilot:
        await wait_idle(app, pilot)
        writer = subprocess.Popen(
            [sys.executable, "-c", WRITER, str(cockpit.db)],
            cwd=ROOT,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        try:
            pane = app.runs_pane
            await until(pilot, lambda: pane.runs, 120, "the other process's run")
            run_id = pane.runs[0].id
            pane.post_message(pane.Show("open", run_id))
            await until(pilot, lambda: pane.series, 30, "the run opened")
            first = len(pane.series[0].norms)
            await until(
                pilot,
                lambda: pane.series[0].status == "finished",
                120,
                "the run finished in the app",
            )
            assert first < 4
            s = pane.series[0]
            assert [n for n, _ in s.norms] == [1, 2, 3, 4]
            assert [step for step, _ in s.retention] == [2, 4]
            assert pane.runs[0].status == "finished" and pane.runs[0].n_edits == 4
        finally:
            writer.wait(timeout=120)
        assert writer.returncode == 0


async def test_the_app_resumes_a_run_whose_writer_is_gone(cockpit) -> None:
    import threading

    from evals.replay import EditDone

    lm = load_model("tiny-gpt2")
    cancel = threading.Event()
    with Store.open(cockpit.db) as store:
        cfg = ReplayConfig(n_edits=3, glue_every=10, glue_tasks=("sst2",), glue_limit=2,
                           fluency_tokens=4, perplexity=False, retention_size=1)  # fmt: skip
        for ev in replay(lm, store, cfg, cancel=cancel):
            if isinstance(ev, EditDone):
                cancel.set()
        (run,) = store.list_runs()
        # as SIGTERM / SIGKILL leave it: "running", and nobody holds the writer lock
        store.set_status(run.id, "running")
    app = cockpit()
    async with app.run_test(size=SIZE) as pilot:
        await wait_idle(app, pilot)
        await until(pilot, lambda: app.replay_pane.gone, 30, "the run seen as writer gone")
        assert app.replay_pane.gone == {run.id}
        app.replay_pane.post_message(app.replay_pane.RunAction("resume", run.id))
        await pilot.pause()
        await wait_idle(app, pilot, timeout=300)
    with Store.open(cockpit.db) as store:
        done = store.get_run(run.id)
        assert done.status == "finished" and done.n_edits == 3
