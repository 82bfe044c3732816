"""Intervals, "needed an edit" and paired tests on two real tiny-model replays of the same
records; GLUE's per-example predictions stored at every checkpoint; the report and the
Runs pane showing them."""

from __future__ import annotations

import io

import pytest
from rich.console import Console

from evals.glue import correct_by_example, load_glue
from evals.protocols import RETENTION_TASK
from evals.replay import ReplayConfig, ReplayFinished, replay
from evals.retention import retention_of
from evals.stats import mcnemar_exact
from rome import load_model
from workbench.core.report import report_markdown
from workbench.core.run_stats import paired_tests, run_records, run_stats
from workbench.core.summary import layer_rows, protocol_scores
from workbench.store import Store

GLUE_LIMIT = 6


@pytest.fixture(scope="module")
def two_runs(tmp_path_factory: pytest.TempPathFactory):
    """ROME original and r-ROME on the same 4 bundled records, GLUE every 2 edits."""
    tmp = tmp_path_factory.mktemp("stats")
    lm = load_model("tiny-gpt2")
    store = Store.open(tmp / "runs.db")
    ids = []
    for mode in ("original", "rrome"):
        cfg = ReplayConfig(
            n_edits=4,
            mode=mode,
            glue_every=2,
            glue_tasks=("sst2",),
            glue_limit=GLUE_LIMIT,
            fluency_tokens=4,
            perplexity=False,
            retention_size=2,
        )
        finished = list(replay(lm, store, cfg))[-1]
        assert isinstance(finished, ReplayFinished)
        ids.append(finished.run_id)
    yield store, ids
    store.close()


def test_glue_checkpoints_store_each_examples_prediction(two_runs) -> None:
    store, ids = two_runs
    examples = load_glue("sst2", None, GLUE_LIMIT)
    for run_id in ids:
        cps = [c for c in store.checkpoints(run_id) if c.task == "sst2"]
        assert [c.step for c in cps] == [0, 2, 4]
        for c in cps:
            assert c.extra["idx"] == [e.idx for e in examples]
            assert c.extra["gold"] == [e.label for e in examples]
            correct = correct_by_example(c.extra)
            assert correct is not None and len(correct) == GLUE_LIMIT
            # the stored accuracy is the mean of the stored per-example outcomes
            assert c.accuracy == sum(correct.values()) / GLUE_LIMIT
    assert correct_by_example({"calibration": "none"}) is None  # stored before


def test_retention_passes_store_each_scored_record(two_runs) -> None:
    store, ids = two_runs
    for c in store.checkpoints(ids[0], task=RETENTION_TASK):
        r = retention_of(c)
        assert [int(row[0]) for row in r.records] == [0, 1][: r.m]
        # lost: exactly the scored records whose ES is below 1
        assert [int(row[0]) for row in r.records if row[1] < 1.0] == r.lost


def test_run_stats_count_holds_and_the_records_that_needed_an_edit(two_runs) -> None:
    store, ids = two_runs
    for run_id in ids:
        st = run_stats(store, run_id)
        finals = [r.metrics["es"] for r in store.rescores(run_id)]
        pre = [e.metrics["pre"]["es"] for e in store.edits(run_id)]
        assert st.hold is not None and st.hold.k == sum(es >= 1.0 for es in finals)
        assert st.hold.lo <= st.hold.value <= st.hold.hi
        assert st.needed == sum(es < 1.0 for es in pre)
        assert st.needed_hold is not None
        assert st.needed_hold.k == sum(
            f >= 1.0 for f, p in zip(finals, pre, strict=True) if p < 1.0
        )
        for r in (*st.immediate.values(), *st.final.values()):
            assert 0.0 <= r.lo <= r.value <= r.hi <= 1.0
        step, acc = st.glue["sst2"]
        assert step == 4 and acc.n == GLUE_LIMIT
        ends = protocol_scores(store, run_id, stats=st)[1]
        assert ends.rates["hold"] == st.hold and ends.with_interval("hold").startswith(
            f"{st.hold.k}/4 ["
        )


def test_paired_tests_count_the_discordant_records(two_runs) -> None:
    store, (a, b) = two_runs
    tests = {c.what: c for c in paired_tests(store, [a, b])}
    ra, rb = run_records(store, a), run_records(store, b)
    only_a = sum(ra.holds(k) and not rb.holds(k) for k in ra.keys)
    only_b = sum(rb.holds(k) and not ra.holds(k) for k in ra.keys)
    holds = tests["holds at the end of the stream, all"].test
    assert (holds.b_only, holds.c_only, holds.n) == (only_a, only_b, 4)
    assert holds.p == mcnemar_exact(only_a, only_b)
    glue = tests["sst2 accuracy after 4 edits"].test
    assert glue.test == "paired bootstrap" and glue.n == GLUE_LIMIT
    assert any(w.startswith("retention after 4 edits") for w in tests)


def test_glue_change_within_a_run_is_paired_over_the_examples(two_runs) -> None:
    from workbench.core.run_stats import glue_changes

    store, ids = two_runs
    (change,) = glue_changes(store, ids[0])
    cps = [c for c in store.checkpoints(ids[0]) if c.task == "sst2"]
    assert change.what == "sst2 after 4 edits against 0"
    assert change.test.test == "paired bootstrap" and change.test.n == GLUE_LIMIT
    assert (change.test.a, change.test.b) == (cps[-1].accuracy, cps[0].accuracy)


def test_the_report_shows_intervals_needed_and_paired_tests(two_runs) -> None:
    store, ids = two_runs
    page = report_markdown(store, ids, None, groups={"both orders": ids})
    st = run_stats(store, ids[0])
    assert f"| {st.needed} of 4 |" in page
    assert "## Differences between runs: paired tests" in page
    assert "paired bootstrap" in page and "McNemar (exact)" in page
    assert "## Order replicates: mean ± spread" in page
    assert "### GLUE: the end against the start of each run" in page
    assert st.hold is not None and st.hold.text() in page


def test_the_runs_pane_table_shows_intervals_and_tests(two_runs) -> None:
    pytest.importorskip("textual")
    from workbench.tui.panes.runs import scores_table
    from workbench.tui.replay_data import series_from_store

    store, ids = two_runs
    series = [series_from_store(store, store.get_run(r)) for r in ids]
    out = io.StringIO()
    Console(file=out, width=200).print(scores_table(series))
    text = out.getvalue()
    hold = series[0].stats.hold
    assert hold is not None and hold.span() in text
    assert "Needed an edit (pre-edit ES < 1):" in text
    assert "Paired tests (same records)" in text and "holds at end, all" in text
    assert "sst2 @4" in text and "retention @4" in text


def test_a_compact_interval() -> None:
    from workbench.core.run_stats import count_rate

    assert count_rate(874, 1000).span() == ".85–.89"  # [0.852, 0.894]
    assert count_rate(99, 100).span() == ".95–1.00"  # [0.946, 1.000]


def test_layer_medians_are_true_medians(two_runs) -> None:
    store, ids = two_runs
    edits = store.edits(ids[1])
    norms = sorted(e.update_norm for e in edits)  # 4 one-layer steps
    row = layer_rows(edits, None)[0]
    assert row[2] == f"{(norms[1] + norms[2]) / 2:.1f}"
    assert f"{norms[2]:.1f}" != row[2]  # the upper median, shown before, differs here


def test_zsre_teacher_forced_rates_have_intervals(tmp_path) -> None:
    from workbench.core.summary import run_summary

    lm = load_model("tiny-gpt2")
    cfg = ReplayConfig(
        dataset="zsre",
        n_edits=3,
        glue_every=3,
        glue_tasks=("sst2",),
        glue_limit=2,
        fluency_tokens=4,
        perplexity=False,
        retention_size=1,
    )
    with Store.open(tmp_path / "z.db") as store:
        fin = list(replay(lm, store, cfg))[-1]
        assert isinstance(fin, ReplayFinished)
        st = run_stats(store, fin.run_id)
        tf = [e.metrics["es_tf"] for e in store.edits(fin.run_id)]
        got = st.teacher_forced["immediate"]["es_tf"]
        assert got.value == pytest.approx(sum(tf) / 3, abs=1e-12) and got.n == 3
        assert got.lo <= got.value <= got.hi
        assert "end of stream" in st.teacher_forced
        rows = dict(run_summary(store, fin.run_id, "finished").rows)
        assert any("95 %: [" in v for k, v in rows.items() if "teacher" in k.lower())
        assert rows["needed an edit (pre-edit ES < 1)"] == f"{st.needed} of 3"
