"""Faults of issue 20 in what the CLI writes and reads: save into ``.``, under a file
or on a full disk, statistics on a full disk, ``export -o -`` and file modes, short run
prefixes, a damaged schema version, and an unsafe update refused by ``edit``. Each
test fails on the code before the fix."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from fault_helpers import Done, error_line, invoke, preset_file


@pytest.fixture(scope="module")
def done(tmp_path_factory: pytest.TempPathFactory) -> Done:
    return Done(tmp_path_factory.mktemp("done"))


FULL = (
    "Error while serializing: IoError(Os { code: 28, kind: StorageFull, "
    'message: "No space left on device" })'
)


def full_disk(*args, **kwargs):
    from safetensors import SafetensorError

    raise SafetensorError(FULL)


@pytest.fixture
def umask_022():
    old = os.umask(0o022)
    yield
    os.umask(old)


def test_save_into_the_current_empty_folder(
    done: Done, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, umask_022
) -> None:
    here = tmp_path / "empty"
    here.mkdir()
    monkeypatch.chdir(here)
    res = invoke(["save", done.run_id, "-o", ".", "--db", done.db])
    assert res.exit_code == 0, res.output
    names = {p.name for p in here.iterdir()}
    assert {"model.safetensors", "config.json", "README.md"} <= names
    assert not any(n.endswith("partial") for n in names)
    assert (here / "model.safetensors").stat().st_mode & 0o777 == 0o644


def test_save_under_a_file_is_exit_2(done: Done, tmp_path: Path) -> None:
    (tmp_path / "afile").write_text("x")
    line = error_line(
        invoke(["save", done.run_id, "-o", tmp_path / "afile" / "sub", "--db", done.db]), 2
    )
    assert "afile is a file, not a folder" in line


def test_save_on_a_full_disk_is_one_line(
    done: Done, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import transformers.modeling_utils

    monkeypatch.setattr(transformers.modeling_utils, "safe_save_file", full_disk)
    out = tmp_path / "model"
    line = error_line(invoke(["save", done.run_id, "-o", out, "--db", done.db]), 1)
    assert line == f"error: cannot write {out}: No space left on device"
    assert list(tmp_path.iterdir()) == []


def test_stats_on_a_full_disk_is_one_line(monkeypatch: pytest.MonkeyPatch) -> None:
    import rome.covariance

    monkeypatch.setattr(rome.covariance, "save_file", full_disk)
    res = invoke(["stats", "--model", "tiny-gpt2", "--force", "--n-texts", 4])
    line = error_line(res, 1)
    assert line.startswith("error: cannot write ") and line.endswith(": No space left on device")


def test_stats_n_texts_0_is_refused() -> None:
    line = error_line(invoke(["stats", "--model", "tiny-gpt2", "--n-texts", 0]), 2)
    assert "--n-texts must be at least 1" in line


def test_export_to_standard_output_and_file_modes(
    done: Done, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, umask_022
) -> None:
    monkeypatch.chdir(tmp_path)
    res = invoke(["export", done.run_id, "-o", "-", "--db", done.db])
    assert res.exit_code == 0, res.output
    assert json.loads(res.stdout)["run"]["id"] == done.run_id
    assert not (tmp_path / "-").exists()
    res = invoke(["export", done.run_id, "-o", "run.csv", "--db", done.db])
    assert res.exit_code == 0, res.output
    assert (tmp_path / "run.csv").stat().st_mode & 0o777 == 0o644


def test_a_short_run_prefix_is_too_short(done: Done) -> None:
    line = error_line(invoke(["history", done.run_id[:3], "--db", done.db]), 2)
    assert "is too short" in line and "at least 4 characters" in line


def test_a_schema_version_that_is_not_a_number(done: Done, tmp_path: Path) -> None:
    import sqlite3

    db = done.copy(tmp_path)
    with sqlite3.connect(db) as conn:
        conn.execute("UPDATE meta SET value = 'two' WHERE key = 'schema_version'")
    line = error_line(invoke(["runs", "--db", db]), 1)
    assert "schema version 'two' is not a number" in line


def test_an_unsafe_update_refused_by_edit_exits_1(tmp_path: Path) -> None:
    strict = preset_file(tmp_path, name="strict", max_update_ratio=1e-6)
    res = invoke(
        [
            "edit", "--model", "tiny-gpt2", "--hparams", strict, "--prompt", "The city of {}",
            "--subject", "the Eiffel Tower", "--target-new", "Rome", "--generate-tokens", "1",
        ]
    )  # fmt: skip
    line = error_line(res, 1)
    assert "update not applied (rrome: " in line and "not applied" in res.stdout
