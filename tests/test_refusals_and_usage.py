"""Refusals that exit 0, usage errors of three lines, and the messages of issue 31
(items 4 and 5): ``edit --method`` refusing an update exits 1 as ROME's edit does;
every command's usage error is one ``error:`` line, exit 2; ``--method foo`` names
``all``; a batch record past the token limit is named with its file; a batch asking two
targets of one subject and prompt is warned about; ``report R R`` shows R once;
``--rescore`` on a run that did not finish says it resumes it."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from fault_helpers import Done, error_line, invoke, preset_file

from workbench.cli import app
from workbench.store import Store

EIFFEL = ["--prompt", "The city of {}", "--subject", "the Eiffel Tower", "--target-new", "Rome"]


@pytest.fixture(scope="module")
def done(tmp_path_factory: pytest.TempPathFactory) -> Done:
    return Done(tmp_path_factory.mktemp("done"))


@pytest.fixture
def strict(tmp_path: Path) -> Path:
    """A preset whose guard refuses any update (max_update_ratio 1e-4)."""
    return preset_file(tmp_path, name="strict", max_update_ratio=1e-4)


# ----------------------------------------------------------------- 4. refusals exit 1


@pytest.mark.parametrize(
    "how",
    [["--method", "memit"], ["--method", "emmet"], ["--method", "memit", "--json"], ["--batch"]],
    ids=["memit", "emmet", "json", "rome-batch"],
)
def test_edit_method_refusing_an_update_exits_1(strict: Path, tmp_path: Path, how) -> None:
    if how == ["--batch"]:
        batch = tmp_path / "batch.json"
        batch.write_text(
            json.dumps(
                [{"prompt": "The city of {}", "subject": "the Eiffel Tower", "target_new": "Rome"}]
            )  # fmt: skip
        )
        args = ["--method", "rome", "--batch", batch]
    else:
        args = [*how, *EIFFEL]
    res = invoke(["edit", "--model", "tiny-gpt2", "--hparams", strict, *args])
    line = error_line(res, 1)
    assert line.startswith("error: update not applied (") and "weights are unchanged" in line
    assert "not applied: not applied" not in line
    if "--json" in how:  # the rows are still printed, with their verdict
        assert json.loads(res.stdout)[0]["verdict"] == "REFUSED"
    else:
        assert "REFUSED" in res.stdout


def test_unknown_method_lists_all(tmp_path: Path) -> None:
    line = error_line(invoke(["edit", "--model", "tiny-gpt2", "--method", "foo", *EIFFEL]), 2)
    assert "unknown method 'foo'" in line and "memit" in line and ", or all" in line


# ----------------------------------------------------------- 5. one usage line, exit 2


def _commands() -> dict:
    import typer.main

    return dict(typer.main.get_command(app).commands)  # type: ignore[attr-defined]


@pytest.mark.parametrize("name", sorted(_commands()))
def test_every_commands_usage_error_is_one_line(name: str) -> None:
    line = error_line(invoke([name, "--no-such-option"]), 2)
    assert f"{name}: no such option: --no-such-option" in line and "--help" in line
    cmd = _commands()[name]
    if any(p.required for p in cmd.params):  # parsed before anything runs
        line = error_line(invoke([name]), 2)
        assert f"{name}: missing " in line


def test_report_without_a_run_or_a_folder(done: Done, tmp_path: Path) -> None:
    line = error_line(invoke(["report", "-o", tmp_path / "r", "--db", done.db]), 2)
    assert "report: missing argument 'run_ids'" in line
    line = error_line(invoke(["report", done.run_id, "--db", done.db]), 2)
    assert "report: missing option '-o' / '--output'" in line
    line = error_line(invoke(["--no-such-option"]), 2)
    assert "no such option: --no-such-option" in line
    assert not (tmp_path / "r").exists()


# ------------------------------------------------------------------- 5. batch files


def test_a_batch_record_past_the_token_limit_names_the_file_and_record(tmp_path: Path) -> None:
    long = " ".join(["word"] * 300)
    batch = tmp_path / "batch.json"
    batch.write_text(
        json.dumps(
            [
                {"prompt": "The city of {}", "subject": "Paris", "target_new": "Rome"},
                {"prompt": "The city of {}", "subject": "Berlin", "target_new": long},
            ]
        )
    )
    res = invoke(["edit", "--model", "tiny-gpt2", "--method", "memit", "--batch", batch])
    line = error_line(res, 2)
    assert f"{batch}: record 2 of 2: target_new is " in line
    assert "(shorten target_new)" in line and "subject or the prompt" not in line


def test_a_batch_asking_two_targets_of_one_subject_is_warned_about(tmp_path: Path) -> None:
    batch = tmp_path / "batch.json"
    batch.write_text(
        json.dumps(
            [
                {"prompt": "The city of {}", "subject": "Paris", "target_new": "Rome"},
                {"prompt": "The city of {}", "subject": "Paris", "target_new": "Oslo"},
            ]
        )
    )
    res = invoke(["edit", "--model", "tiny-gpt2", "--method", "memit", "--batch", batch])
    assert res.exit_code == 0, res.output
    warned = [line for line in res.stderr.splitlines() if line.startswith("warning:")]
    assert len(warned) == 1, res.stderr
    assert "'Paris'" in warned[0] and "record 1 -> 'Rome'" in warned[0]
    assert "record 2 -> 'Oslo'" in warned[0]


# ----------------------------------------------------------------------- 5. report


def test_report_of_one_run_named_twice_shows_it_once(done: Done, tmp_path: Path) -> None:
    pages = {}
    for name, ids in (("once", [done.run_id]), ("twice", [done.run_id, done.run_id[:6]])):
        res = invoke(["report", *ids, "-o", tmp_path / name, "--db", done.db])
        assert res.exit_code == 0, res.output
        pages[name] = (tmp_path / name / "README.md").read_text()
    assert pages["twice"].count(done.run_id) == pages["once"].count(done.run_id)


# ----------------------------------------------------------------------- 5. rescore


def test_rescore_of_a_run_that_did_not_finish_says_it_resumes_it(
    done: Done, tmp_path: Path
) -> None:
    db = done.copy(tmp_path)
    with Store.open(db) as store:
        store.set_status(done.run_id, "interrupted")
    res = invoke(["replay", "--resume", done.run_id, "--rescore", "--db", db])
    assert res.exit_code == 0, res.output
    notes = [line for line in res.stderr.splitlines() if "--rescore resumes it" in line]
    assert len(notes) == 1 and "interrupted, not finished" in notes[0], res.stderr
    with Store.open(db, access="read") as store:
        assert store.get_run(done.run_id).status == "finished"


def test_edit_method_all_leaves_out_what_cannot_edit_the_model_and_says_so() -> None:
    """``--method all`` on GPT-2: UltraEdit (no gate/up projections) is left out with one
    note; every other registered method has its row and the command succeeds."""
    from rome.methods import method_names

    res = invoke(["edit", "--model", "tiny-gpt2", "--method", "all", "--json", *EIFFEL])
    assert res.exit_code == 0, res.output
    rows = json.loads(res.stdout[res.stdout.index("[") :])
    shown = {r["method"] for r in rows}
    assert "ultraedit" not in shown
    assert shown == set(method_names()) - {"ultraedit"}
    assert "note: ultraedit left out: ultraedit cannot edit this model" in res.stderr
