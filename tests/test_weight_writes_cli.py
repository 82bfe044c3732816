"""Weight writes (``param._version``, per written weight) of one CLI ``edit`` and of one
replay step, the editors ``edit`` makes, and the flags its side-by-side table cannot show.

The CLI ends after the edit, so the last update it scores may stay on the model:
- ``edit --method rome`` (ROME's own path): no trial in compute; each key mode's update is
  written once (Apply: scored and generated with), undone (once more) but for the last;
- ``edit --method M`` (the table): Compute writes each edited layer twice (the family's
  layer loop adds and restores it) and Apply once (the table's p(new) after and ‖W‖);
- one editor, with the method's own settings (its shipped variant included).

A replay step writes each edited layer once (Apply), plus what its probes need:
- ROME: nothing more; compute has no trial, its p(new) after is scored once applied
  (a refused step: its update added and put back for those probes, 2, never kept);
- the family (MEMIT, EMMET, AlphaEdit): compute's layer loop adds and restores each
  layer (the next layer's keys and the record's p(new) after are read with it on), 2.

The app's counts (Compute, Apply, undo) are tests/test_weight_writes.py's.
"""

from __future__ import annotations

import json
import math
import threading
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

import rome
from evals.events import EditDone
from evals.replay import replay
from evals.spec import ReplayConfig, RunSpec
from rome import Editor, EditRequest
from rome.hparams import load_preset
from workbench.cli import app
from workbench.store import Store

REQ = ["--prompt", "The city of {}", "--subject", "the Eiffel Tower", "--target-new", "Rome"]


def _versions(model: Any) -> dict[str, int]:
    return {name: p._version for name, p in model.named_parameters()}


def _edit(args: list[str], monkeypatch: pytest.MonkeyPatch) -> tuple[Any, dict[str, int], int]:
    """Run ``edit`` in this process: its result, the writes per parameter it made after
    loading, and how many editors it made (the real loader and editor, only counted)."""
    seen: dict[str, Any] = {}
    load, init = rome.load_model, Editor.__init__

    def loading(*a: Any, **k: Any) -> Any:
        seen["lm"] = lm = load(*a, **k)
        seen["before"] = _versions(lm.model)
        return lm

    def counted(self: Editor, *a: Any, **k: Any) -> None:
        seen["editors"] = seen.get("editors", 0) + 1
        init(self, *a, **k)

    monkeypatch.setattr(rome, "load_model", loading)
    monkeypatch.setattr(Editor, "__init__", counted)
    res = CliRunner().invoke(app, ["edit", *REQ, *args])
    if "lm" not in seen:
        return res, {}, seen.get("editors", 0)
    now = _versions(seen["lm"].model)
    writes = {n: v - seen["before"][n] for n, v in now.items() if v != seen["before"][n]}
    return res, writes, seen.get("editors", 0)


@pytest.fixture
def family_file(tmp_path: Path) -> Path:
    path = tmp_path / "tiny-gpt2-family.json"  # layers 0 and 1
    path.write_text(json.dumps(load_preset("tiny-gpt2-family").to_dict()))
    return path


def _weight(layer: int) -> str:
    return f"transformer.h.{layer}.mlp.c_proj.weight"


def test_rome_writes_its_layer_once_per_key_mode(monkeypatch: pytest.MonkeyPatch) -> None:
    base = ["--model", "tiny-gpt2", "--method", "rome", "--json", "--generate-tokens", "2"]
    res, writes, editors = _edit(base, monkeypatch)
    assert res.exit_code == 0, res.output
    layer = load_preset("tiny-gpt2").layer
    assert writes == {_weight(layer): 1} and editors == 1  # before: 4 (trial 2, apply, undo)
    # its after-edit probabilities are what compute's trial measures (the same weights)
    lm = rome.load_model("tiny-gpt2")
    trial = Editor(lm.model, lm.tokenizer, lm.hparams).compute(
        EditRequest("The city of {}", "the Eiffel Tower", "Rome"), mode="rrome"
    )
    record = json.loads(res.stdout)
    for key in ("p_new_after", "p_new_after_templated", "p_new_before"):
        assert record[key] == getattr(trial, key), key
    res, writes, _ = _edit([*base, "--mode", "all"], monkeypatch)
    assert res.exit_code == 0, res.output
    assert writes == {_weight(layer): 5}  # apply, undo; apply, undo; apply (before: 12)


@pytest.mark.parametrize("method", ["memit", "emmet", "alphaedit"])
def test_a_method_writes_compute_twice_and_apply_once(
    method: str, family_file: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    args = ["--model", "tiny-gpt2", "--hparams", str(family_file), "--method", method, "--json"]
    res, writes, editors = _edit(args, monkeypatch)
    assert res.exit_code == 0, res.output
    (row,) = json.loads(res.stdout)
    assert row["method"] == method and sorted(row["layer_norms"]) == ["0", "1"]
    # Compute: add, restore; Apply: add (before: and an undo, 4)
    assert writes == {_weight(0): 3, _weight(1): 3} and editors == 1


def test_a_method_with_a_shipped_variant_edits_with_one_editor(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """tiny-llama's UltraEdit settings are the variant tiny-llama-ultraedit: the editor is
    made with them (before: the preset's editor, then a variant of it)."""
    res, writes, editors = _edit(["--model", "tiny-llama", "--method", "ultraedit"], monkeypatch)
    assert res.exit_code == 0, res.output
    assert editors == 1
    edited = {f"model.layers.{x}.mlp.{p}_proj.weight" for x in (1, 2) for p in ("gate", "up")}
    # Compute's trial (add, restore: its p(new) after), Apply (once, kept)
    assert writes == dict.fromkeys(edited, 3)


@pytest.mark.parametrize(
    ("flags", "named"),
    [
        (["--generate-tokens", "5"], "--generate-tokens applies"),
        (["--templates", "{file}"], "--templates applies"),
        (["--templates", "{file}", "--generate-tokens", "1"], "--templates and --generate-tokens"),
        (["--mode", "original"], "--mode picks a key mode, and memit has none"),
    ],
)
def test_the_table_refuses_what_it_cannot_show(
    flags: list[str], named: str, family_file: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``edit --method M`` shows no text and reads its own templates: --templates and
    --generate-tokens N > 0 are refused in one line, exit 2, before anything loads (and
    --mode, for a method without key modes)."""
    templates = family_file.with_name("templates.json")
    templates.write_text(json.dumps(["{}", "Hello. {}"]))
    args = [f.format(file=templates) for f in flags]
    res, writes, editors = _edit(["--model", "tiny-gpt2", "--method", "memit", *args], monkeypatch)
    lines = [line for line in res.output.splitlines() if line.strip()]
    assert res.exit_code == 2 and len(lines) == 1 and lines[0].startswith("error:"), res.output
    assert named in lines[0] and editors == 0 and not writes


def test_rome_honours_templates_and_no_text(family_file: Path, monkeypatch: pytest.MonkeyPatch):
    templates = family_file.with_name("templates.json")
    templates.write_text(json.dumps(["{}", "Hello. {}", "Once more: {}"]))
    args = ["--model", "tiny-gpt2", "--method", "rome", "--json", "--generate-tokens", "0"]
    res, _, _ = _edit([*args, "--templates", str(templates)], monkeypatch)
    assert res.exit_code == 0, res.output
    record = json.loads(res.stdout)
    assert record["n_templates"] == 3 and record["generation_after"] == ""
    res, _, _ = _edit(["--model", "tiny-gpt2", "--method", "memit", "--generate-tokens", "0",
                       "--json"], monkeypatch)  # fmt: skip
    assert res.exit_code == 0, res.output  # no text asked: nothing the table leaves out


def _replay_writes(
    db: Path, method: str, hp: Any, batch_size: int, n_edits: int
) -> tuple[str, list[dict[str, int]]]:
    """A new run on tiny-gpt2: its id and the writes per parameter of each step."""
    lm = rome.load_model("tiny-gpt2")
    cfg = ReplayConfig(
        method=method, n_edits=n_edits, batch_size=batch_size, glue_every=100,
        glue_tasks=("sst2",), glue_limit=4, retention_size=0, perplexity=False,
        fluency_tokens=4,
    )  # fmt: skip
    steps, last, run_id = [], _versions(lm.model), ""
    with Store.open(db) as store:
        for ev in replay(lm, store, cfg, hparams=hp, cancel=threading.Event()):
            run_id = getattr(ev, "run_id", None) or run_id
            if isinstance(ev, EditDone) and (ev.seq + 1) % batch_size == 0:
                now = _versions(lm.model)
                steps.append({n: v - last[n] for n, v in now.items() if v != last[n]})
                last = now
    return run_id, steps


def test_a_rome_replay_step_writes_its_layer_once(tmp_path: Path) -> None:
    hp = load_preset("tiny-gpt2")
    run_id, steps = _replay_writes(tmp_path / "r.db", "rome", hp, 1, 2)
    assert steps == [{_weight(hp.layer): 1}] * 2  # before: 3 (compute's trial 2, apply)
    with Store.open(tmp_path / "r.db") as store:
        first = store.edits(run_id)[0]
        stored = RunSpec.of(store.get_run(run_id)).edit_hparams(hp)  # its templates
    # its p(new) after, scored once applied, is what compute's trial scores (same weights)
    lm = rome.load_model("tiny-gpt2")
    ed = Editor(lm.model, lm.tokenizer, stored)
    trial = ed.compute(EditRequest(**first.request), mode="rrome")
    for key in ("p_new_after", "p_true_after", "p_new_after_templated"):
        assert first.record[key] == getattr(trial, key), key
    # a refused step is never kept: its update is added for its probes and put back
    tight = hp.replace(max_update_ratio=1e-6)
    run_id, steps = _replay_writes(tmp_path / "refused.db", "rome", tight, 1, 1)
    assert steps == [{_weight(hp.layer): 2}]
    with Store.open(tmp_path / "refused.db") as store:
        (edit,) = store.edits(run_id)
    assert edit.record["p_new_after"] == trial.p_new_after and not math.isnan(
        edit.record["p_new_after_templated"]
    )


@pytest.mark.parametrize("method", ["memit", "emmet", "alphaedit"])
def test_a_family_replay_step_writes_its_layers_three_times(method: str, tmp_path: Path) -> None:
    hp = load_preset("tiny-gpt2-family")  # layers 0 and 1
    _, steps = _replay_writes(tmp_path / "r.db", method, hp, 2, 4)
    # compute's layer loop (add, restore), then the step's one write (apply)
    assert steps == [{_weight(0): 3, _weight(1): 3}] * 2
