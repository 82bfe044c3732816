"""Bad input and faults through the CLI (issue 10): each case checks the exit code,
one ``error:`` line on stderr with no traceback, and for the data cases that the
database (or the file asked for) is as it was. Tiny models, throwaway databases.

The statistics and device cases of the same issue live in ``test_stats_faults.py``
and ``test_devices.py``."""

from __future__ import annotations

import json
import os
import shutil
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest
from cli_helpers import EDIT, runner

from rome.methods import METHODS
from workbench.cli import app
from workbench.core.limits import MAX_REQUEST_TOKENS
from workbench.store import Store

ROOT = Path(__file__).resolve().parent.parent
SAMPLE = ROOT / "evals" / "data" / "counterfact" / "sample.json"
GLUE = ROOT / "evals" / "data" / "glue"


def invoke(args: list[str]):
    return runner.invoke(app, [str(a) for a in args])


def error_line(res, code: int, *, alone: bool = True) -> str:
    """The one message of a failed command: exit ``code``, one ``error:`` line last on
    stderr (no wrapping, no blank line, no traceback); ``alone``: nothing else there."""
    assert res.exit_code == code, res.output
    assert "Traceback" not in res.output
    assert res.exception is None or isinstance(res.exception, SystemExit), res.exception
    lines = res.stderr.splitlines()
    assert lines and lines[-1].startswith("error: ") and "" not in lines, res.stderr
    assert sum("error:" in line for line in lines) == 1, res.stderr
    assert len(lines) == 1 or not alone, res.stderr
    return lines[-1]


def dump(db: Path) -> list[str]:
    """The database's content, row by row (what a command must leave unchanged)."""
    conn = sqlite3.connect(db)
    try:
        return list(conn.iterdump())
    finally:
        conn.close()


def replay_args(db: Path, dataset: Path, glue: Path, n: int = 2) -> list:
    return [
        "replay",
        "--model",
        "tiny-gpt2",
        "--dataset",
        dataset,
        "--n-edits",
        n,
        "--glue-every",
        n,
        "--glue-limit",
        2,
        "--glue-tasks",
        "sst2",
        "--glue-dir",
        glue,
        "--no-perplexity",
        "--db",
        db,
    ]


def unwritable_folder(tmp_path: Path) -> Path:
    if os.geteuid() != 0:
        folder = tmp_path / "ro"
        folder.mkdir()
        folder.chmod(0o555)
        return folder
    for candidate in (Path("/proc/sys"), Path("/sys/kernel")):  # root writes anywhere else
        if candidate.is_dir() and not os.access(candidate, os.W_OK):
            return candidate
    pytest.skip("no unwritable folder for root on this system")


class Finished:
    """A finished 2-edit replay of tiny-gpt2 on its own records and GLUE files."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.dataset = root / "records.json"
        self.dataset.write_text(json.dumps(json.loads(SAMPLE.read_text())[:2]))
        self.glue = root / "glue"
        self.glue.mkdir()
        shutil.copy(GLUE / "sst2.jsonl", self.glue / "sst2.jsonl")
        self.db = root / "w.db"
        res = invoke(replay_args(self.db, self.dataset, self.glue))
        assert res.exit_code == 0, res.output
        with Store.open(self.db) as store:
            (run,) = store.list_runs()
        assert run.status == "finished" and run.n_edits == 2
        self.run_id = run.id

    def copy_db(self, tmp_path: Path) -> Path:
        db = tmp_path / "copy.db"
        with Store.open(self.db) as store:
            store._conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        shutil.copy(self.db, db)
        return db

    def status(self, db: Path) -> tuple[str, int]:
        with Store.open(db) as store:
            run = store.get_run(self.run_id)
        return run.status, run.n_edits


@pytest.fixture(scope="module")
def finished(tmp_path_factory: pytest.TempPathFactory) -> Finished:
    return Finished(tmp_path_factory.mktemp("finished"))


# --------------------------------------------------------------------------- files asked for


def test_export_to_a_folder_is_refused(finished: Finished, tmp_path: Path) -> None:
    before = dump(finished.db)
    line = error_line(invoke(["export", finished.run_id, "-o", tmp_path, "--db", finished.db]), 2)
    assert f"{tmp_path} is a folder; give a file name" in line
    assert list(tmp_path.iterdir()) == [] and dump(finished.db) == before


def test_export_where_a_file_is_in_the_way(finished: Finished, tmp_path: Path) -> None:
    blocker = tmp_path / "a-file"
    blocker.write_text("x")
    line = error_line(
        invoke(["export", finished.run_id, "-o", blocker / "run.json", "--db", finished.db]), 2
    )
    assert "is a file, not a folder" in line and blocker.read_text() == "x"


@pytest.mark.parametrize("command", ["export", "plot"])
def test_writing_into_an_unwritable_folder(
    finished: Finished, tmp_path: Path, command: str
) -> None:
    folder = unwritable_folder(tmp_path)
    target = folder / ("run.json" if command == "export" else "run.png")
    line = error_line(invoke([command, finished.run_id, "-o", target, "--db", finished.db]), 2)
    assert f"cannot write {target}" in line and "permission" in line
    assert not target.exists()


def test_export_format_follows_a_csv_name(finished: Finished, tmp_path: Path) -> None:
    out = tmp_path / "run.csv"
    res = invoke(["export", finished.run_id, "-o", out, "--db", finished.db])
    assert res.exit_code == 0, res.output
    text = out.read_text()
    assert not text.startswith("{") and text.count("\n") == 3  # CSV: header and two edits


def test_plot_in_an_unsupported_format(finished: Finished, tmp_path: Path) -> None:
    target = tmp_path / "x.txt"
    line = error_line(invoke(["plot", finished.run_id, "-o", target, "--db", finished.db]), 2)
    assert "not .txt" in line and "png" in line and not target.exists()


def test_plot_without_a_suffix_reports_the_file_written(finished: Finished, tmp_path: Path) -> None:
    res = invoke(["plot", finished.run_id, "-o", tmp_path / "name", "--db", finished.db])
    assert res.exit_code == 0, res.output
    assert res.stderr.strip() == f"wrote {tmp_path / 'name.png'}"
    assert [p.name for p in tmp_path.iterdir()] == ["name.png"]


def test_replay_json_out_to_a_folder_is_refused_before_the_run(
    finished: Finished, tmp_path: Path
) -> None:
    db = finished.copy_db(tmp_path)
    before = dump(db)
    args = replay_args(db, finished.dataset, finished.glue, n=1)
    line = error_line(invoke([*args, "--json-out", tmp_path]), 2)
    assert "is a folder" in line and dump(db) == before  # no run created
    line = error_line(
        invoke(["replay", "--resume", finished.run_id, "--db", db, "--json-out", tmp_path]), 2
    )
    assert "is a folder" in line and dump(db) == before


def test_replay_json_out_failing_after_the_run_says_where_the_run_is(
    finished: Finished, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    db = finished.copy_db(tmp_path)
    target = tmp_path / "run.json"

    def refuse(self, run_id, fmt="json", path=None):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(Store, "export_run", refuse)
    res = invoke([*replay_args(db, finished.dataset, finished.glue, n=1), "--json-out", target])
    line = error_line(res, 2, alone=False)
    with Store.open(db) as store:
        new = next(r for r in store.list_runs() if r.id != finished.run_id)
    assert new.status == "finished" and new.n_edits == 1
    assert f"cannot write {target}: Permission denied" in line
    assert f"run {new.id} is finished and stored in {db}" in line
    assert f"rome-workbench export {new.id} --json" in line and not target.exists()


# --------------------------------------------------------------------------- run ids, resume


def test_an_ambiguous_run_id_prefix_exits_2(tmp_path: Path) -> None:
    db = tmp_path / "w.db"
    with Store.open(db) as store:
        for run_id in ("abcd1234", "abcd5678"):
            store.create_run(model="tiny-gpt2", kind="replay", run_id=run_id)
    prefix = "abcd"
    before = dump(db)
    for command in (["history", prefix], ["export", prefix], ["replay", "--resume", prefix]):
        line = error_line(invoke([*command, "--db", db]), 2)
        assert f"run id prefix {prefix!r} matches" in line and "give more characters" in line
    assert dump(db) == before


def test_resume_with_a_different_model_exits_2(finished: Finished) -> None:
    before = dump(finished.db)
    for args in (
        ["replay", "--model", "tiny-llama", "--resume", finished.run_id],
        ["--model", "tiny-llama", "replay", "--resume", finished.run_id],  # the top-level one
    ):
        line = error_line(invoke([*args, "--db", finished.db]), 2)
        assert line == f"error: run {finished.run_id} was made with tiny-gpt2, not tiny-llama"
    assert dump(finished.db) == before


def test_resuming_a_finished_run_does_nothing(finished: Finished) -> None:
    before = dump(finished.db)
    for args in (
        ["replay", "--resume", finished.run_id],  # the run's model
        ["--model", "tiny-gpt2", "replay", "--resume", finished.run_id],
        ["--model", "tiny-llama", "replay", "--model", "tiny-gpt2", "--resume", finished.run_id],
    ):
        res = invoke([*args, "--db", finished.db])
        assert res.exit_code == 0, res.output
        assert res.stderr.splitlines() == [
            f"warning: run {finished.run_id} is already finished; nothing to do"
        ]
        assert "edits stored" in res.stdout
    assert dump(finished.db) == before


def test_rescore_needs_resume(finished: Finished) -> None:
    line = error_line(invoke(["replay", "--rescore", "--db", finished.db]), 2)
    assert "--resume" in line


def test_resume_onto_changed_data_is_refused(finished: Finished, tmp_path: Path) -> None:
    db = finished.copy_db(tmp_path)
    before = dump(db)
    records = finished.dataset.read_text()
    sst2 = (finished.glue / "sst2.jsonl").read_text()
    try:
        changed = json.loads(records)
        changed[1]["target_new"] = "Mars"
        finished.dataset.write_text(json.dumps(changed))
        line = error_line(
            invoke(["replay", "--resume", finished.run_id, "--rescore", "--db", db]), 2
        )
        assert "CounterFact records" in line and "changed since the run started" in line
        finished.dataset.write_text(records)
        (finished.glue / "sst2.jsonl").write_text("\n".join(sst2.splitlines()[::-1]) + "\n")
        line = error_line(
            invoke(["replay", "--resume", finished.run_id, "--rescore", "--db", db]), 2
        )
        assert "GLUE examples" in line and "changed since the run started" in line
    finally:
        finished.dataset.write_text(records)
        (finished.glue / "sst2.jsonl").write_text(sst2)
    assert dump(db) == before and finished.status(db) == ("finished", 2)


def test_rescoring_a_finished_run_reads_the_stored_records(
    finished: Finished, tmp_path: Path
) -> None:
    db = finished.copy_db(tmp_path)
    res = invoke(["replay", "--resume", finished.run_id, "--rescore", "--db", db])
    assert res.exit_code == 0, res.output
    with Store.open(db) as store:
        assert [r.seq for r in store.rescores(finished.run_id)] == [0, 1]
        assert store.get_run(finished.run_id).status == "finished"


# --------------------------------------------------------------------------- the top-level options


def test_top_level_options_reach_the_command_or_are_refused(finished: Finished) -> None:
    res = invoke(["--model", "tiny-gpt2", *EDIT[:1], *EDIT[3:], "--json"])
    assert res.exit_code == 0, res.output
    assert json.loads(res.stdout)["model"] == "tiny-gpt2"
    res = invoke(["--db", finished.db, "runs"])
    assert res.exit_code == 0 and finished.run_id in res.stdout
    line = error_line(invoke(["--device", "tpu", "runs", "--db", finished.db]), 2)
    assert "--device before the command does not apply to 'runs'" in line
    line = error_line(invoke(["--model", "tiny-gpt2", "save", finished.run_id, "-o", "x"]), 2)
    assert "--model before the command does not apply to 'save'" in line


# --------------------------------------------------------------------------- no database there


@pytest.mark.parametrize(
    "command",
    [
        ["runs"],
        ["history", "abcd"],
        ["export", "abcd", "-o", "{tmp}/out.json"],
        ["plot", "abcd", "-o", "{tmp}/out.png"],
        ["save", "abcd", "-o", "{tmp}/model"],
        ["replay", "--resume", "abcd"],
    ],
)
def test_reading_a_missing_database_creates_nothing(tmp_path: Path, command: list[str]) -> None:
    db = tmp_path / "none" / "w.db"
    args = [c.format(tmp=tmp_path) for c in command]
    line = error_line(invoke([*args, "--db", db]), 2)
    assert f"{db} holds no workbench database; nothing was created there" in line
    assert list(tmp_path.iterdir()) == []


def test_a_folder_is_not_a_database(tmp_path: Path) -> None:
    line = error_line(invoke(["runs", "--db", tmp_path]), 2)
    assert f"{tmp_path} is a folder, not a workbench database" in line
    assert list(tmp_path.iterdir()) == []


# --------------------------------------------------------------------------- replay settings


@pytest.mark.parametrize(
    ("extra", "words"),
    [
        (["--glue-tasks", "sst2,bogus"], "unknown task(s) bogus"),
        (["--glue-tasks", ","], "GLUE tasks is empty"),
        (["--glue-dir", "{tmp}/no-such-folder"], "is not a folder"),
        (["--glue-dir", "{tmp}"], "has no sst2.jsonl"),
        (["--dataset", "{tmp}/missing.json"], "has no file at"),
        (["--n-edits", "0"], "edits must be at least 1"),
    ],
)
def test_bad_replay_settings_create_no_run(
    finished: Finished, tmp_path: Path, extra: list[str], words: str
) -> None:
    db = finished.copy_db(tmp_path)
    before = dump(db)
    args = [*replay_args(db, finished.dataset, finished.glue, n=1), *extra]
    line = error_line(
        invoke([a.format(tmp=tmp_path) if isinstance(a, str) else a for a in args]), 2
    )
    assert "replay settings" in line and words in line
    assert dump(db) == before
    new = tmp_path / "new.db"
    args = [a if a != db else new for a in args]
    error_line(invoke([a.format(tmp=tmp_path) if isinstance(a, str) else a for a in args]), 2)
    assert not new.exists()


def test_the_bundled_val_split_is_a_dataset() -> None:
    from workbench.core.replay import config_errors

    assert config_errors({"dataset": "val"}) == {}


def test_skipped_records_are_one_warning(finished: Finished, tmp_path: Path) -> None:
    good = json.loads(SAMPLE.read_text())[:1]
    bad = []
    for i in range(5):
        rec = dict(good[0], case_id=900 + i)
        del rec["subject" if i % 2 else "target_new"]
        bad.append(rec)
    data = tmp_path / "records.json"
    data.write_text(json.dumps(bad + good))
    db = tmp_path / "w.db"
    res = invoke(replay_args(db, data, finished.glue, n=1))
    assert res.exit_code == 0, res.output
    assert "WARNING" not in res.output and "evals.counterfact" not in res.output
    warnings = [line for line in res.stderr.splitlines() if "skipped" in line]
    assert len(warnings) == 1, res.stderr
    line = warnings[0]
    assert line.startswith(f"warning: skipped 5 CounterFact record(s) of {data}: case 900 (")
    assert "case 901 (" in line and "case 902 (" in line and "case 903" not in line
    assert line.endswith("; and 2 more")


# --------------------------------------------------------------------------- edit requests


def test_negative_generate_tokens_is_refused() -> None:
    line = error_line(invoke([*EDIT[:-1], "-5"]), 2)
    assert "--generate-tokens must be between 0 and" in line


def test_an_empty_templates_list_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "templates.json"
    path.write_text("[]")
    line = error_line(invoke([*EDIT, "--templates", path]), 2)
    assert f"{path} holds no context templates" in line


def test_a_prompt_over_the_token_limit_is_refused_before_model_work(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from workbench.core import edits

    def no_editor(*args, **kwargs):
        raise AssertionError("an editor was made for a request over the limit")

    monkeypatch.setattr(edits, "make_editor", no_editor)
    long = EDIT.copy()
    long[long.index("--subject") + 1] = "the Eiffel Tower " * 400  # ~2,000 characters
    line = error_line(invoke(long), 2)
    assert f"the limit is {MAX_REQUEST_TOKENS} tokens" in line and "the prompt" in line
    long = EDIT.copy()
    long[long.index("--target-new") + 1] = "Rome " * 300
    line = error_line(invoke(long), 2)
    assert line.startswith("error: target_new is") and f"limit is {MAX_REQUEST_TOKENS}" in line


# --------------------------------------------------------------------------- how a message looks


def test_a_long_message_is_one_line_when_piped(tmp_path: Path) -> None:
    """In a real process with stderr a pipe: no wrapping at 80 columns, nothing else."""
    db = tmp_path / ("a-rather-long-folder-name-" * 4) / "w.db"
    res = subprocess.run(
        [sys.executable, "-m", "workbench.cli", "runs", "--db", str(db)],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "COLUMNS": "80"},
    )
    assert res.returncode == 2, res.stderr
    assert res.stderr.count("\n") == 1 and res.stderr.startswith("error: "), res.stderr
    assert len(res.stderr) > 160 and str(db) in res.stderr
    assert not db.parent.exists()


@pytest.mark.parametrize(
    ("content", "expect"),
    [
        ('[{"prompt": "{} is in", "subject": "X", "target_new": "Y"}, 7]', "record 2 of 2 is not"),
        ('[{"prompt": "{} is in", "subject": "X"}]', "record 1 of 1 has no 'target_new'"),
        (
            '{"prompt": "{} is in", "subject": "X", "target_new": "Y"}\n'
            '{"prompt": "no braces", "subject": "X", "target_new": "Y"}\n',
            "record 2 of 2: the prompt must contain exactly one '{}'",
        ),
        ('{"prompt": "{} is in", "subject": "X", "target_new": ""}', "record 1 of 1: "),
        ("[]", "holds no requests"),
        ("[{", "neither JSON nor JSON lines"),
    ],
)
def test_a_malformed_batch_file_names_the_record_and_why(tmp_path, content, expect):
    batch = tmp_path / "batch.json"
    batch.write_text(content)
    res = invoke(["edit", "--model", "tiny-gpt2", "--method", "memit", "--batch", batch])
    line = error_line(res, 2)
    assert str(batch) in line and expect in line, line


def test_a_missing_batch_file_is_one_line(tmp_path):
    res = invoke(["edit", "--model", "tiny-gpt2", "--method", "memit", "--batch", tmp_path / "x"])
    assert "x" in error_line(res, 2)


@pytest.mark.parametrize(
    "args, expect",
    [
        (["--method", "memit", "--batch-size", "0"], "batch size must be at least 1"),
        (["--method", "rome", "--batch-size", "2"], "batch size must be 1 for rome"),
        # every registered method is named (the registry grows; the message reads it)
        (["--method", "nope"], "method must be one of " + ", ".join(sorted(METHODS))),
    ],
)
def test_replay_method_and_batch_size_are_checked_before_anything_is_written(
    tmp_path, args, expect
):
    db = tmp_path / "w.db"
    res = invoke(["replay", "--model", "tiny-gpt2", "--n-edits", 2, "--db", db, *args])
    assert expect in error_line(res, 2)
    assert not db.exists()
