"""Faults a careful user found (issue 20): a preset that edited another model than
``--model``, runs left finished or running, half-written checkpoints, records past
the token limit, and the one-line / exit-code cases of the CLI. Each test fails on
the code before the fix. Tiny models, throwaway databases."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from cli_helpers import runner

from rome import load_model
from rome.hparams import load_preset
from workbench.cli import app

ROOT = Path(__file__).resolve().parent.parent
PRESETS = ROOT / "rome" / "presets"
SAMPLE = ROOT / "evals" / "data" / "counterfact" / "sample.json"
GLUE = ROOT / "evals" / "data" / "glue"


def invoke(args: list) -> object:
    return runner.invoke(app, [str(a) for a in args])


def error_line(res, code: int) -> str:
    """The one ``error:`` line of a failed command (last on stderr), exit ``code``."""
    assert res.exit_code == code, res.output
    assert "Traceback" not in res.output
    assert res.exception is None or isinstance(res.exception, SystemExit), res.exception
    lines = res.stderr.splitlines()
    assert lines and lines[-1].startswith("error: "), res.stderr
    assert sum("error:" in line for line in lines) == 1, res.stderr
    return lines[-1]


def preset_file(tmp_path: Path, base: str = "tiny-gpt2", name: str = "mine", **changes) -> Path:
    data = json.loads((PRESETS / f"{base}.json").read_text())
    data.update(name=name, **changes)
    path = tmp_path / f"{name}.json"
    path.write_text(json.dumps(data))
    return path


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
