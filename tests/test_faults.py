"""Faults a careful user found (issue 20): a preset that edited another model than
``--model``, runs left finished or running, half-written checkpoints, records past
the token limit, and the replay's one-line / exit-code cases (the files the CLI
writes are in ``test_faults_files.py``). Each test fails on the code before the
fix. Tiny models, throwaway databases."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from fault_helpers import (
    PRESETS,
    ROOT,
    Done,
    error_line,
    invoke,
    preset_file,
    records,
    replay_args,
    run_of,
)

from rome import load_model
from rome.hparams import load_preset
from workbench.store import Store

# --------------------------------------------------------------------------- 1. --model decides


@pytest.fixture
def saved_folder(tmp_path: Path) -> Path:
    """A tiny GPT-2 saved as a Hugging Face folder, its edited weight scaled so it
    differs from the in-process tiny-gpt2's."""
    lm = load_model("tiny-gpt2")
    with torch.no_grad():
        lm.model.get_submodule("transformer.h.1.mlp.c_proj").weight.mul_(5.0)
    folder = tmp_path / "saved-folder"
    lm.model.save_pretrained(folder)
    lm.tokenizer.save_pretrained(folder)
    return folder


def _norm(lm) -> float:
    return float(lm.model.get_submodule(lm.hparams.weight_module()).weight.detach().norm())


def test_model_decides_which_weights_a_preset_file_edits(
    saved_folder: Path, tmp_path: Path
) -> None:
    mine = preset_file(tmp_path)
    lm = load_model(str(saved_folder), hparams=mine)
    plain = load_model("tiny-gpt2")
    assert lm.source == str(saved_folder)
    assert _norm(lm) == pytest.approx(5 * _norm(plain), rel=1e-5)
    assert lm.name == str(saved_folder) and lm.hparams.model == str(saved_folder)
    # without --model, the preset's own model is the default
    assert load_model("mine", hparams=mine).source == "testing:gpt2"


def test_edit_record_names_the_model_given(saved_folder: Path, tmp_path: Path) -> None:
    mine = preset_file(tmp_path)
    res = invoke(
        [
            "edit", "--model", saved_folder, "--hparams", mine, "--prompt", "The city of {}",
            "--subject", "the Eiffel Tower", "--target-new", "Rome", "--generate-tokens", "1",
            "--json",
        ]
    )  # fmt: skip
    assert res.exit_code == 0, res.output
    assert json.loads(res.stdout)["model"] == str(saved_folder)


def test_a_preset_of_another_architecture_is_one_line(tmp_path: Path) -> None:
    llama = preset_file(tmp_path, base="tiny-llama", name="llama-copy")
    res = invoke(
        [
            "edit", "--model", "tiny-gpt2", "--hparams", llama, "--prompt", "The city of {}",
            "--subject", "the Eiffel Tower", "--target-new", "Rome",
        ]
    )  # fmt: skip
    line = error_line(res, 2)
    assert "model.layers" in line and "'tiny-gpt2'" in line and "another architecture" in line


# --------------------------------------------------------------------------- presets


@pytest.mark.parametrize(
    ("content", "words"),
    [
        ({"mlp_out_module": "transformer.h.{}.mlp.nope"}, "mlp_out_module"),
        ({"final_norm_module": "transformer.nope"}, "final_norm_module"),
        ({"mlp_out_module": "transformer.h.{}.mlp.{x}"}, "no other braces"),
        ({"layer": "one"}, "layer must be a whole number, not a string"),
        ({"v_lr": "fast"}, "v_lr must be a number, not a string"),
        ({"v_num_grad_steps": -5}, "v_num_grad_steps must be at least 1"),
        ({"clamp_norm_factor": float("nan")}, "clamp_norm_factor must be a finite number"),
        ({"fact_token": "subject_first"}, "fact_token must be 'subject_last'"),
        ({"context_template_length_params": [5, 10]}, "context_template_length_params"),
        ({"v_norm_anchor": "yes"}, "v_norm_anchor must be true or false"),
        ({"extends": ["tiny-gpt2"]}, "extends must be a preset name"),
        ([], "holds a list, not a JSON object"),
        (None, "holds null, not a JSON object"),
        (b"\x89PNG\r\n\x1a\n\x00\xff\xfe", "not a JSON text file"),
    ],
)
def test_a_bad_preset_is_one_line_exit_2(tmp_path: Path, content, words: str) -> None:
    path = tmp_path / "bad.json"
    if isinstance(content, bytes):
        path.write_bytes(content)
    elif isinstance(content, dict):
        path = preset_file(tmp_path, name="bad", **content)
    else:
        path.write_text(json.dumps(content))
    res = invoke(
        [
            "edit", "--model", "tiny-gpt2", "--hparams", path, "--prompt", "The city of {}",
            "--subject", "the Eiffel Tower", "--target-new", "Rome",
        ]
    )  # fmt: skip
    assert words in error_line(res, 2)


def test_the_shipped_presets_still_validate() -> None:
    for path in PRESETS.glob("*.json"):
        assert load_preset(path).name == json.loads(path.read_text())["name"]


# --------------------------------------------------------------------------- replays


@pytest.fixture(scope="module")
def done(tmp_path_factory: pytest.TempPathFactory) -> Done:
    return Done(tmp_path_factory.mktemp("done"))


def test_an_extension_interrupted_before_it_starts_leaves_the_run_as_it_was(
    done: Done, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    db = done.copy(tmp_path)
    import evals.replay

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    with monkeypatch.context() as m:
        m.setattr(evals.replay._Run, "__init__", interrupted)
        res = invoke(["replay", "--resume", done.run_id, "--extend-to", 3, "--db", db])
    assert res.exit_code == 1 and f"resume with --resume {done.run_id}" in res.stderr
    run = run_of(db, done.run_id)
    assert (run.status, run.n_edits, run.n_edits_planned) == ("finished", 2, 2)
    res = invoke(["replay", "--resume", done.run_id, "--extend-to", 3, "--db", db])
    assert res.exit_code == 0, res.output
    run = run_of(db, done.run_id)
    assert (run.status, run.n_edits, run.n_edits_planned) == ("finished", 3, 3)


def test_the_plan_and_the_status_change_in_one_transaction(done: Done, tmp_path: Path) -> None:
    """Every statement the store runs is traced: the two changes are written between one
    BEGIN and its COMMIT (a status update and a plan update committed apart would be two
    transactions, however the run reads back)."""
    db = done.copy(tmp_path)
    with Store.open(db) as store:
        sql: list[str] = []
        store._conn.set_trace_callback(sql.append)
        try:
            store.set_status(done.run_id, "running", n_edits_planned=3)
        finally:
            store._conn.set_trace_callback(None)
        run = store.get_run(done.run_id)
    assert (run.status, run.n_edits_planned) == ("running", 3)
    words = [s.split()[0].upper() for s in sql if s.strip()]
    begins = [i for i, w in enumerate(words) if w == "BEGIN"]
    commits = [i for i, w in enumerate(words) if w == "COMMIT"]
    assert len(begins) == len(commits) == 1, sql
    inside = " ".join(sql[begins[0] : commits[0]])
    assert "status" in inside and "n_edits_planned" in inside, sql


def test_a_half_written_checkpoint_is_completed_on_resume(
    done: Done, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import evals.replay

    db = tmp_path / "w.db"
    real = evals.replay.fluency
    calls = []

    def failing(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:  # step 1: its GLUE row is written, its fluency is not
            raise OSError(28, "No space left on device")
        return real(*args, **kwargs)

    with monkeypatch.context() as m:
        m.setattr(evals.replay, "fluency", failing)
        res = invoke(replay_args(db, done.dataset, done.glue, 2, every=1))
    assert res.exit_code == 1, res.output
    run = run_of(db)
    with Store.open(db) as store:
        tasks = {c.task for c in store.checkpoints(run.id) if c.step == 1}
    assert run.status == "failed" and tasks == {"sst2"}
    res = invoke(["replay", "--resume", run.id, "--db", db])
    assert res.exit_code == 0, res.output
    with Store.open(db) as store:
        steps = {}
        for c in store.checkpoints(run.id):
            steps.setdefault(c.step, set()).add(c.task)
        assert store.get_run(run.id).status == "finished"
    # retention passes start after step 0 (the first edits re-scored at each checkpoint)
    done = {"sst2", "fluency", "retention"}
    assert steps == {0: {"sst2", "fluency"}, 1: done, 2: done}


def test_records_past_the_token_limit_are_skipped_with_the_reason(
    done: Done, tmp_path: Path
) -> None:
    long, good = records(2)
    long["target_new"] = " Rome" * 400
    data = tmp_path / "long.json"
    data.write_text(json.dumps([long, good]))
    db = tmp_path / "w.db"
    res = invoke(replay_args(db, data, done.glue, 1))
    assert res.exit_code == 0, res.output
    line = next(x for x in res.stderr.splitlines() if "skipped" in x)
    assert re.search(
        rf"case {long['case_id']} \(target_new is \d+ tokens long; the limit is 256", line
    )
    with Store.open(db) as store:
        (edit,) = store.edits(store.list_runs()[0].id)
    assert edit.case_id == good["case_id"]
    # only long records: one line with the reasons, and no database left behind
    data.write_text(json.dumps([long]))
    other = tmp_path / "none.db"
    line = error_line(invoke(replay_args(other, data, done.glue, 1)), 2)
    assert "no usable CounterFact records" in line and "target_new is" in line
    assert not other.exists()


def test_a_list_as_requested_rewrite_gives_the_reason(done: Done, tmp_path: Path) -> None:
    mend = records(1)[0]
    rewrite = {"prompt": "{} is located in", "subject": mend["subject"]}
    rewrite.update(target_new={"str": "Europe"}, target_true={"str": "Antarctica"})
    rec = {"case_id": 1, "requested_rewrite": [rewrite]}
    data = tmp_path / "list.json"
    data.write_text(json.dumps([rec]))
    line = error_line(invoke(replay_args(tmp_path / "w.db", data, done.glue, 1)), 2)
    assert "requested_rewrite is a list of 1, not one object" in line


def test_options_a_resume_does_not_take_get_a_note(done: Done, tmp_path: Path) -> None:
    db = done.copy(tmp_path)
    res = invoke(
        [
            "replay", "--resume", done.run_id, "--db", db, "--mode", "original",
            "--n-edits", 5, "--dataset", done.dataset, "--glue-limit", 3, "--v-stop", "loss",
        ]
    )  # fmt: skip
    assert res.exit_code == 0, res.output
    (note,) = [x for x in res.stderr.splitlines() if x.startswith("note:")]
    for flag in ("--mode", "--n-edits", "--dataset", "--glue-limit", "--v-stop"):
        assert flag in note
    assert "--extend-to N" in note


@pytest.mark.parametrize(
    ("extra", "words"),
    [
        (["--v-stop", "bogus"], "v_stop must be one of"),
        (["--layer", 99], "out of range"),
        (["--hparams", "{tmp}/missing.json"], "no preset file"),
        (["--device-map", "auto"], "device maps do not apply"),
        (["--dataset", "{tmp}/bad.json"], "is not valid JSON"),
    ],
)
def test_bad_replay_input_leaves_no_database(
    done: Done, tmp_path: Path, extra: list, words: str
) -> None:
    (tmp_path / "bad.json").write_text("{not json")
    db = tmp_path / "new" / "w.db"
    args = [*replay_args(db, done.dataset, done.glue, 1), *extra]
    line = error_line(
        invoke([a.format(tmp=tmp_path) if isinstance(a, str) else a for a in args]), 2
    )
    assert words in line
    assert not db.exists() and not db.parent.exists()


def test_a_database_under_a_file_is_exit_2(done: Done, tmp_path: Path) -> None:
    (tmp_path / "afile").write_text("x")
    line = error_line(
        invoke(replay_args(tmp_path / "afile" / "x.db", done.dataset, done.glue, 1)), 2
    )
    assert "afile is a file, not a folder" in line


def test_json_out_unwritable_after_the_run_says_how_to_export(
    done: Done, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import workbench.core.errors as core_errors

    real = core_errors.where_problem
    checks = []

    def later_unwritable(path: Path) -> str | None:
        checks.append(path)
        if checks.count(path) == 1 or path.name != "run.json":
            return real(path)
        return f"no permission to write in {path.parent}"

    monkeypatch.setattr(core_errors, "where_problem", later_unwritable)
    db = tmp_path / "w.db"
    out = tmp_path / "run.json"
    res = invoke([*replay_args(db, done.dataset, done.glue, 1), "--json-out", out])
    line = error_line(res, 2)
    rid = run_of(db).id
    assert "no permission to write in" in line
    assert f"export it with rome-workbench export {rid} --json" in line


def test_a_relative_dataset_is_stored_as_an_absolute_path(
    done: Done, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(done.dataset.parent)
    db = tmp_path / "w.db"
    res = invoke(replay_args(db, Path(done.dataset.name), done.glue, 1))
    assert res.exit_code == 0, res.output
    assert run_of(db).data_source == str(done.dataset)


def test_sigterm_during_a_replay_marks_it_interrupted(done: Done, tmp_path: Path) -> None:
    data = tmp_path / "stream.json"  # long enough that a fast machine cannot finish it first
    data.write_text(json.dumps(records(150)))
    db = tmp_path / "w.db"
    args = [sys.executable, "-m", "workbench.cli", *map(str, replay_args(db, data, done.glue, 150))]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "COLUMNS": "200"}
    proc = subprocess.Popen(args, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline and proc.poll() is None:
            if db.exists():
                with Store.open(db, create=False) as store:
                    runs = store.list_runs()
                    if runs and store.edits(runs[0].id):
                        break
            time.sleep(0.2)
        proc.send_signal(signal.SIGTERM)
        _, stderr = proc.communicate(timeout=120)
    finally:
        proc.kill()
    run = run_of(db)
    text = stderr.decode()
    assert proc.returncode == 1, text
    assert "Traceback" not in text and f"resume with --resume {run.id}" in text
    assert run.status == "interrupted" and 1 <= run.n_edits < 150
