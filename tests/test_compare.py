"""``compare`` (a spec's runs as replays on local workers, killed and resumed) and
``merge`` (workbench databases into one): on tiny models and tiny stores."""

from __future__ import annotations

import hashlib
import os
import signal
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import typer
from fault_helpers import stored_edits

from tests.cli_helpers import one_line, runner
from workbench.cli import app
from workbench.core.compare import BOOL_FLAGS, VALUE_FLAGS, load_spec, order_groups, run_states
from workbench.store import Store

ROOT = Path(__file__).resolve().parents[1]

TINY = """
name = "tiny"
model = "tiny-gpt2"
methods = ["rome", "memit"]
edits = [8]

[settings]
glue_every = 100
glue_limit = 4
glue_tasks = "sst2"
retention_size = 0
perplexity = false

[method.memit]
model = "tiny-gpt2-family"
batch_sizes = [2]
edits = [4]
"""


def _spec(tmp_path: Path, text: str = TINY, name: str = "tiny.toml") -> Path:
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


# --------------------------------------------------------------------------- the spec


def test_the_family_spec_names_its_runs_and_their_replay_commands():
    spec = load_spec(ROOT / "docs/results/family-smollm2.toml")
    names = [r.name for r in spec.runs]
    assert names == [
        "rrome-val-n1000-b1", "memit-val-n1000-b100", "emmet-val-n1000-b100",
        "alphaedit-val-n1000-b100",
    ]  # fmt: skip
    rrome = spec.runs[0]
    assert (rrome.method, rrome.settings["mode"], rrome.batch_size) == ("rome", "rrome", 1)
    # the script's settings, flag for flag (scripts/family_runs.sh's COMMON)
    args = rrome.replay_args()
    for flag, value in [("--glue-every", "100"), ("--glue-limit", "200"),
                        ("--glue-tasks", "sst2"), ("--glue-calibration", "none"),
                        ("--retention-size", "100"), ("--n-edits", "1000"),
                        ("--dataset", "val"), ("--model", "smollm2-135m")]:  # fmt: skip
        assert args[args.index(flag) + 1] == value


def test_the_specs_of_the_runs_still_to_make_name_every_method_and_dataset():
    ref = load_spec(ROOT / "docs/results/reference-smollm2.toml")
    by_name = {r.name: r for r in ref.runs}
    assert {(r.method, r.dataset) for r in ref.runs} == {
        ("memit", "val"), ("emmet", "val"), ("alphaedit", "val"),
        ("rome", "zsre"), ("memit", "zsre"), ("emmet", "zsre"), ("alphaedit", "zsre"),
    }  # fmt: skip
    args = by_name["memit-val-o2-n300-b100"].replay_args()
    assert args[args.index("--order-seed") + 1] == "2"
    assert sorted(r.order for r in ref.runs if r.n_edits == 300) == [1, 1, 1, 2, 2, 2]
    assert by_name["rrome-zsre-zsre-n800-b1"].batch_size == 1
    methods = load_spec(ROOT / "docs/results/methods-smollm2.toml")
    assert [r.method for r in methods.runs] == [
        "encore", "rect", "prune", "memit-nas", "nas", "ultraedit",
    ]  # fmt: skip


def test_orders_are_seeds_and_the_runs_that_differ_only_by_order_are_a_group(tmp_path):
    spec = load_spec(
        _spec(
            tmp_path,
            'methods = ["memit"]\ndatasets = ["zsre"]\n'
            'orders = ["file", 1, 2]\nedits = 300\nbatch_sizes = 100',
        )
    )
    names = [r.name for r in spec.runs]
    assert names == ["memit-zsre-n300-b100", "memit-zsre-o1-n300-b100", "memit-zsre-o2-n300-b100"]
    args = spec.runs[2].replay_args()
    assert (
        args[args.index("--order-seed") + 1] == "2"
        and "--order-seed" not in spec.runs[0].replay_args()
    )
    assert order_groups(spec) == {"memit-zsre-n300-b100": names}


def test_every_setting_a_spec_takes_is_an_option_of_replay():
    command = typer.main.get_command(app).commands["replay"]  # type: ignore[attr-defined]
    opts = {o for p in command.params for o in (*p.opts, *p.secondary_opts)}
    wanted = set(VALUE_FLAGS.values()) | {f for pair in BOOL_FLAGS.values() for f in pair}
    assert wanted <= opts, wanted - opts


def test_dry_run_lists_runs_and_commands_and_writes_nothing(tmp_path):
    spec = _spec(tmp_path)
    res = runner.invoke(app, ["compare", str(spec), "--dry-run"])
    assert res.exit_code == 0, res.output
    assert "tiny: 2 runs (2 to start, 0 to resume, 0 finished)" in res.output
    assert "replay --db" in res.output and "--model tiny-gpt2-family --method memit" in res.output
    assert sorted(p.name for p in tmp_path.iterdir()) == ["tiny.toml"]


def test_only_runs_the_runs_it_matches_and_a_pattern_that_matches_none_is_refused(tmp_path):
    spec = _spec(tmp_path)
    res = runner.invoke(app, ["compare", str(spec), "--dry-run", "--only", "memit-*"])
    assert res.exit_code == 0, res.output
    assert "tiny: 1 run (1 to start, 0 to resume, 0 finished)" in res.output
    assert "memit-sample-n4-b2  start" in res.output and "rome-sample" not in res.output
    res = runner.invoke(app, ["compare", str(spec), "--only", "ultra*"])
    assert res.exit_code == 2, res.output
    line = one_line(res.output)
    assert "--only 'ultra*' matches no run" in line and "rome-sample-n8-b1" in line
    assert sorted(p.name for p in tmp_path.iterdir()) == ["tiny.toml"]


BAD = {
    "unknown method": ('methods = ["rome", "nope"]', "unknown method 'nope'"),
    "unknown dataset": ('methods = ["rome"]\ndatasets = ["nowhere.json"]', "unknown dataset"),
    "unknown setting": ('methods = ["rome"]\n[settings]\nglue_evry = 3', "unknown setting"),
    "bad value": ('methods = ["rome"]\n[settings]\nglue_every = 0', "glue_every must be at"),
    "duplicate run": ('methods = ["rome"]\nedits = [5, 5]', "two runs are named rome-"),
    "an axis in settings": ('methods = ["rome"]\n[settings]\nn_edits = 3', "is an axis"),
    "not toml": ("methods = [", "is not valid TOML"),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_a_bad_spec_is_one_line_exit_2_and_nothing_written(tmp_path, case):
    text, says = BAD[case]
    spec = _spec(tmp_path, text)
    res = runner.invoke(app, ["compare", str(spec), "--out", str(tmp_path / "out")])
    assert res.exit_code == 2, res.output
    assert says in one_line(res.output)
    assert not (tmp_path / "out").exists()


def test_a_ray_address_that_does_not_answer_is_refused_before_anything(tmp_path):
    spec = _spec(tmp_path)
    with socket_closed_port() as port:
        res = runner.invoke(app, ["compare", str(spec), "--ray", f"127.0.0.1:{port}"])
    assert res.exit_code == 2, res.output
    assert "does not answer" in one_line(res.output)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["tiny.toml"]


def test_ray_auto_without_ray_or_a_cluster_is_one_line_exit_2(tmp_path, monkeypatch):
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    spec = _spec(tmp_path)
    res = runner.invoke(app, ["compare", str(spec), "--ray", "auto"])
    assert res.exit_code == 2, res.output
    line = one_line(res.output)  # without the extra: how to install it; with: no cluster
    assert "pip install 'rome-workbench[ray]'" in line or "no Ray cluster at auto" in line
    assert sorted(p.name for p in tmp_path.iterdir()) == ["tiny.toml"]


def test_workers_with_ray_is_refused(tmp_path):
    spec = _spec(tmp_path)
    res = runner.invoke(app, ["compare", str(spec), "--ray", "auto", "--workers", "2"])
    assert res.exit_code == 2, res.output
    assert "--workers sets local workers" in one_line(res.output)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["tiny.toml"]


class socket_closed_port:
    """A local port nothing listens on (bound, then closed)."""

    def __enter__(self) -> int:
        import socket

        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            return int(s.getsockname()[1])

    def __exit__(self, *exc: object) -> None:
        return None


# --------------------------------------------------------------------------- merge


def _store(path: Path, run_id: str, n: int, *, seed: int = 0) -> Path:
    """A database with one finished run of ``n`` rank-one edits and a checkpoint."""
    g = torch.Generator().manual_seed(seed)
    with Store.open(path) as s:
        s.create_run(model="tiny-gpt2", mode="rrome", run_id=run_id, n_edits_planned=n)
        with s.acquire_writer(run_id):
            for i in range(n):
                req = {"prompt": "{} is in", "subject": f"s{i}", "target_new": "Rome"}
                u, v = torch.randn(8, generator=g), torch.randn(8, generator=g)
                s.add_edit(run_id, i, request=req, mode="rrome", layer=1, weight_name="w", u=u, v=v)
            s.add_checkpoint(run_id, n, "sst2", accuracy=0.5, n=4)
            s.set_status(run_id, "finished")
    return path


def _rows(db: Path) -> dict[str, int]:
    conn = sqlite3.connect(db)
    try:
        return {
            t: conn.execute(f"SELECT COUNT(*) FROM {t}").fetchone()[0]
            for t in ("runs", "edits", "checkpoints")
        }
    finally:
        conn.close()


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_merge_takes_every_run_once_and_a_repeat_adds_nothing(tmp_path):
    a = _store(tmp_path / "a.db", "run_a", 3)
    b = _store(tmp_path / "b.db", "run_b", 2, seed=1)
    copy_of_a = tmp_path / "a2.db"
    copy_of_a.write_bytes(a.read_bytes())  # the same run twice: taken once
    out = tmp_path / "all.db"
    res = runner.invoke(app, ["merge", str(a), str(b), str(copy_of_a), "-o", str(out)])
    assert res.exit_code == 0, res.output
    assert "2 run(s) added" in res.output
    assert _rows(out) == {"runs": 2, "edits": 5, "checkpoints": 2}
    with Store.open(out) as merged, Store.open(a) as src:
        for mine, theirs in zip(merged.edits("run_a"), src.edits("run_a"), strict=True):
            assert mine.request == theirs.request
            for x, y in zip(merged.load_factors(mine), src.load_factors(theirs), strict=True):
                assert torch.equal(x, y)  # the factors as stored, bit for bit
    res = runner.invoke(app, ["merge", str(a), str(b), "-o", str(out)])
    assert res.exit_code == 0, res.output
    assert "0 run(s) added, 2 already there, 0 rows written" in res.output
    assert _rows(out) == {"runs": 2, "edits": 5, "checkpoints": 2}


def test_two_different_copies_of_one_run_are_refused_naming_both(tmp_path):
    a = _store(tmp_path / "a.db", "run_a", 3)
    other = _store(tmp_path / "other.db", "run_a", 3, seed=7)  # same id, other factors
    out = _store(tmp_path / "all.db", "run_c", 1)
    before = _sha(out)
    res = runner.invoke(app, ["merge", str(a), str(other), "-o", str(out)])
    assert res.exit_code == 2, res.output
    line = one_line(res.output)
    assert "run_a has two different copies" in line and str(a) in line and str(other) in line
    assert _sha(out) == before  # nothing written, not even run_a's first copy


def test_a_file_that_is_not_a_workbench_database_is_refused(tmp_path):
    a = _store(tmp_path / "a.db", "run_a", 1)
    text = tmp_path / "notes.db"
    text.write_text("not a database at all " * 100)
    foreign = tmp_path / "foreign.db"
    with sqlite3.connect(foreign) as conn:
        conn.execute("CREATE TABLE t (x)")
    for bad in (text, foreign, tmp_path / "missing.db"):
        out = tmp_path / "all.db"
        res = runner.invoke(app, ["merge", str(a), str(bad), "-o", str(out)])
        assert res.exit_code == 2, res.output
        assert str(bad) in one_line(res.output)
        assert not out.exists()


def test_merge_run_takes_only_the_runs_it_names_and_refuses_an_unknown_one(tmp_path):
    a = _store(tmp_path / "a.db", "run_a", 3)
    b = _store(tmp_path / "b.db", "run_b", 2, seed=1)
    out = tmp_path / "one.db"
    res = runner.invoke(app, ["merge", str(a), str(b), "--run", "run_b", "-o", str(out)])
    assert res.exit_code == 0, res.output
    assert "1 run(s) added (run_b)" in res.output
    assert _rows(out) == {"runs": 1, "edits": 2, "checkpoints": 1}
    for bad, why in (("nope", "no run"), ("run_", "2 runs (run_a, run_b)")):
        target = tmp_path / f"{bad}.db"
        res = runner.invoke(app, ["merge", str(a), str(b), "--run", bad, "-o", str(target)])
        assert res.exit_code == 2, res.output
        assert f"--run {bad}: {why} in the sources" in one_line(res.output)
        assert not target.exists()


def test_a_run_made_by_hand_adopted_with_merge_run_counts_as_the_specs_run(tmp_path):
    """A replay made by hand with a spec run's settings, merged alone into that run's
    database, is that run: compare skips it and its report shows it (found by id, not by
    the notes compare writes)."""
    spec = _spec(tmp_path)
    res = runner.invoke(app, ["compare", str(spec), "--dry-run", "--only", "memit-*"])
    argv = next(ln.split()[3:] for ln in res.output.splitlines() if "replay --db" in ln)
    hand = tmp_path / "hand.db"
    argv[argv.index("--db") + 1] = str(hand)
    other = _store(tmp_path / "other.db", "run_other", 1)  # a second run beside it
    merged = runner.invoke(app, ["merge", str(other), "-o", str(hand)])
    assert merged.exit_code == 0, merged.output
    made = runner.invoke(app, argv)
    assert made.exit_code == 0, made.output
    with Store.open(hand) as s:
        (rid,) = [r.id for r in s.list_runs() if r.id != "run_other"]
    runs = tmp_path / "tiny-runs"
    runs.mkdir()
    res = runner.invoke(app, ["merge", str(hand), "--run", rid[:6], "-o",
                              str(runs / "memit-sample-n4-b2.db")])  # fmt: skip
    assert res.exit_code == 0 and f"1 run(s) added ({rid})" in res.output, res.output
    res = runner.invoke(app, ["compare", str(spec), "--only", "memit-*"])
    assert res.exit_code == 0, res.output
    assert "finished before" in res.output
    assert rid in (runs / "report" / "README.md").read_text(encoding="utf-8")


# ------------------------------------------------------------- the local path, killed


def _compare(spec: Path, *extra: str) -> subprocess.Popen[str]:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "COLUMNS": "200"}
    argv = [sys.executable, "-m", "workbench.cli", "compare", str(spec), "--workers", "1", *extra]
    return subprocess.Popen(argv, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True)  # fmt: skip


def _kill_replay_of(db: Path, at_least: int, proc: subprocess.Popen[str]) -> int:
    """SIGKILL the replay writing ``db`` once it stored ``at_least`` edits; the edits
    stored when it was killed."""
    _, n, pid = stored_edits(db, at_least, proc, timeout=600, writer=True)
    if n >= at_least and pid:
        os.kill(pid, signal.SIGKILL)
        return n
    raise AssertionError("the replay ended before it could be killed")


def test_compare_killed_worker_then_the_spec_again_finishes_each_run_once(tmp_path):
    spec = _spec(tmp_path)
    out = tmp_path / "tiny-runs"
    first = _compare(spec)
    killed_at = _kill_replay_of(out / "rome-sample-n8-b1.db", 2, first)
    text, _ = first.communicate(timeout=600)
    assert first.returncode == 1, text
    assert "rome-sample-n8-b1: failed" in text and "killed by SIGKILL" in text
    assert "memit-sample-n4-b2: done, 4/4 edits" in text
    assert killed_at < 8

    again = _compare(spec)
    text2, _ = again.communicate(timeout=600)
    assert again.returncode == 0, text2
    assert "memit-sample-n4-b2: done, 4/4 edits (finished before)" in text2
    assert "rome-sample-n8-b1: done, 8/8 edits" in text2
    assert (out / "report" / "README.md").is_file()

    merged = out / "tiny.db"
    with Store.open(merged) as s:
        runs = {r.notes: r for r in s.list_runs()}
        assert set(runs) == {"compare tiny: rome-sample-n8-b1", "compare tiny: memit-sample-n4-b2"}
        for run in runs.values():
            assert run.status == "finished"
            seqs = [e.seq for e in s.edits(run.id)]
            assert seqs == list(range(run.n_edits_planned or 0))  # each edit once, in order
            steps = [st.step for st in s.iter_steps(run.id)]
            assert steps == sorted(set(steps))  # each step once
        memit = runs["compare tiny: memit-sample-n4-b2"]
        assert [st.step for st in s.iter_steps(memit.id)] == [0, 2]
    res = runner.invoke(app, ["compare", str(spec), "--dry-run"])
    assert "tiny: 2 runs (0 to start, 0 to resume, 2 finished)" in res.output
    assert run_states(load_spec(spec), out)[0].action == "skip"


# ------------------------------------------------------------------ on a local Ray


def _parent(pid: int) -> int:
    stat = Path(f"/proc/{pid}/stat").read_text()
    return int(stat.rsplit(")", 1)[1].split()[1])


@pytest.mark.slow
def test_ray_killed_worker_then_the_spec_again_finishes_each_run_once(tmp_path):
    """A local Ray (``--ray local``): the Ray worker running one run is killed; the spec,
    run again, resumes that run from the copy its node kept and finishes both."""
    pytest.importorskip("ray")
    import tempfile
    import uuid

    from workbench.core.ray_runner import WORKDIR

    name = f"raytest-{uuid.uuid4().hex[:8]}"
    spec = _spec(tmp_path, TINY.replace('name = "tiny"', f'name = "{name}"'))
    node = Path(tempfile.gettempdir()) / WORKDIR / name
    try:
        first = _compare(spec, "--ray", "local")
        replay_db = node / "rome-sample-n8-b1.db"
        _, n, pid = stored_edits(replay_db, 2, first, timeout=600, writer=True)
        if n >= 2 and pid:
            os.kill(_parent(pid), signal.SIGKILL)  # the Ray worker that runs the task
        text, _ = first.communicate(timeout=600)
        assert first.returncode == 1, text
        assert "rome-sample-n8-b1: failed" in text, text
        assert "memit-sample-n4-b2: done, 4/4 edits" in text

        again = _compare(spec, "--ray", "local")
        text2, _ = again.communicate(timeout=600)
        assert again.returncode == 0, text2
        assert "rome-sample-n8-b1: done, 8/8 edits" in text2
        with Store.open(tmp_path / f"{name}-runs" / f"{name}.db") as s:
            runs = s.list_runs()
            assert len(runs) == 2 and {r.status for r in runs} == {"finished"}
            for run in runs:
                seqs = [e.seq for e in s.edits(run.id)]
                assert seqs == list(range(run.n_edits_planned or 0))  # each edit once
                steps = [st.step for st in s.iter_steps(run.id)]
                assert steps == sorted(set(steps))  # each step once
    finally:
        import shutil

        shutil.rmtree(node, ignore_errors=True)
