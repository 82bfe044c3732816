"""The typer CLI through its runner, on the tiny model."""

from __future__ import annotations

import dataclasses
import json

import pytest
from cli_helpers import REQUEST, runner

from rome import BadRequestError, EditRequest, load_model
from workbench.cli import app

EDIT = [*REQUEST, "--target-true", "Paris"]


def test_edit_json_record():
    res = runner.invoke(app, [*EDIT, "--json", "--generate-tokens", "4"])
    assert res.exit_code == 0, res.output
    rec = json.loads(res.stdout)
    assert rec["mode"] == "rrome" and rec["layer"] == 1
    assert rec["p_new_after"] > rec["p_new_before"]
    assert len(rec["u"]) == 256 and len(rec["v"]) == 64 and "generation_after" in rec


def test_edit_all_modes_table():
    res = runner.invoke(app, [*EDIT, "--mode", "all", "--generate-tokens", "4"])
    assert res.exit_code == 0, res.output
    for word in ("original", "rrome", "prompt", "update_norm", "cos_kstar_ks"):
        assert word in res.stdout


def test_bad_input_exits_2_with_one_line():
    res = runner.invoke(
        app,
        [
            "edit",
            "--model",
            "tiny-gpt2",
            "--prompt",
            "The city of",
            "--subject",
            "x",
            "--target-new",
            "Rome",
        ],
    )
    assert res.exit_code == 2
    assert "exactly one '{}'" in res.stderr and "Traceback" not in res.output
    res = runner.invoke(app, [*EDIT[:2], "no-such-model", *EDIT[3:]])
    assert res.exit_code == 2 and "smollm2-135m" in res.stderr
    res = runner.invoke(app, [*EDIT, "--layer", "9"])
    assert res.exit_code == 2 and "out of range" in res.stderr
    res = runner.invoke(app, [*EDIT, "--mode", "fancy"])
    assert res.exit_code == 2


@dataclasses.dataclass(frozen=True)
class _CountedRequest(EditRequest):
    """A request that counts how often its checks run (``validate`` on a fresh request)."""

    checks: list[int] = dataclasses.field(default_factory=list, compare=False)

    def validate(self) -> EditRequest:
        if not self.validated:
            self.checks.append(1)
        return super().validate()


def test_an_edit_request_is_validated_once_and_carried():
    """The CLI validates at its boundary; the core and the engine carry that request."""
    from workbench.core.edits import make_editor, preview_edit

    bad = EditRequest("The city of", "x", "Rome")
    with pytest.raises(BadRequestError, match="exactly one"):
        bad.validate()
    assert not bad.validated
    req = _CountedRequest("The city of {}", "the Eiffel Tower", "Rome", "Paris")
    assert req.validate() is req and req.validated and req.checks == [1]
    assert not dataclasses.replace(req, subject=" ").validated  # a changed request: checked again
    lm = load_model("tiny-gpt2")
    pv = preview_edit(lm, make_editor(lm), req, ["rrome", "original"], 2)
    assert req.checks == [1]  # preview, compare and the engine's guard ran no check again
    assert all(r.request is req for r in pv.results.values())


def test_replay_runs_history_export_plot(tmp_path):
    db = str(tmp_path / "w.db")
    res = runner.invoke(
        app,
        [
            "replay",
            "--model",
            "tiny-gpt2",
            "--n-edits",
            "2",
            "--glue-every",
            "1",
            "--glue-limit",
            "4",
            "--glue-tasks",
            "sst2",
            "--db",
            db,
        ],
    )
    assert res.exit_code == 0, res.output
    assert "edits stored" in res.stdout
    res = runner.invoke(app, ["runs", "--db", db])
    assert res.exit_code == 0 and "finished" in res.stdout
    from workbench.store import Store

    run_id = Store.open(db).list_runs()[0].id
    res = runner.invoke(app, ["history", run_id, "--db", db])
    assert res.exit_code == 0 and "|dW|" in res.stdout
    from workbench.cli.common import out as console

    narrow = console.width
    try:  # a narrow terminal wraps the text columns; the id and the numbers stay whole
        console.width = 60
        res = runner.invoke(app, ["runs", "--db", db])
        assert res.exit_code == 0 and f" {run_id} " in res.stdout, res.stdout
        res = runner.invoke(app, ["history", run_id, "--db", db])
        first = Store.open(db).edits(run_id)[0]
        assert f" {first.update_norm:.2f} " in res.stdout, res.stdout
    finally:
        console.width = narrow
    out = tmp_path / "run.csv"
    res = runner.invoke(app, ["export", run_id, "--csv", "-o", str(out), "--db", db])
    assert res.exit_code == 0 and out.read_text().count("\n") == 3
    png = tmp_path / "p.png"
    res = runner.invoke(app, ["plot", run_id, "-o", str(png), "--db", db])
    assert res.exit_code == 0 and png.stat().st_size > 10_000


def test_unknown_run_exits_2(tmp_path):
    from workbench.store import Store

    Store.open(tmp_path / "w.db").close()  # a read-only command needs a database there
    res = runner.invoke(app, ["history", "zzzzzzzz", "--db", str(tmp_path / "w.db")])
    assert res.exit_code == 2 and "zzzzzzzz" in res.stderr
