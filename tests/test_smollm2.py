"""Integration on the embedded SmolLM2-135M (slow: loads the model, collects statistics).

``ci``-marked tests run in CI: every clean clone proves the offline default
edits for real.
"""

from __future__ import annotations

import pytest
import torch

from rome import MODES, Editor, EditRequest, load_model
from rome.scoring import score_targets

pytestmark = pytest.mark.slow

EIFFEL = EditRequest("{} is located in the city of", "The Eiffel Tower", "Rome", "Paris")
PARAPHRASE = "The Eiffel Tower can be found in the city of"


@pytest.fixture(scope="module")
def smollm2():
    return load_model("smollm2-135m")


def next_word(lm, prompt: str) -> str:
    ids = lm.tokenizer(prompt, return_tensors="pt").to(lm.device)
    with torch.no_grad():
        logits = lm.model(**ids).logits[0, -1]
    return lm.tokenizer.decode(int(logits.argmax())).strip()


@pytest.mark.ci
def test_eiffel_tower_moves_to_rome_in_each_mode(smollm2):
    lm = smollm2
    assert next_word(lm, EIFFEL.text) == "Paris"
    ed = Editor(lm.model, lm.tokenizer, lm.hparams)
    results = ed.compare(EIFFEL)
    before = score_targets(lm.model, lm.tokenizer, [PARAPHRASE, PARAPHRASE], ["Rome", "Paris"])
    for mode in MODES:
        res = results[mode]
        assert res.unsafe_reason is None
        ed.apply(res)
        assert next_word(lm, EIFFEL.text) == "Rome", mode
        after = score_targets(lm.model, lm.tokenizer, [PARAPHRASE, PARAPHRASE], ["Rome", "Paris"])
        assert after[0].prob > 5 * before[0].prob, mode  # the paraphrase moves toward Rome
        assert after[1].prob < before[1].prob, mode
        ed.undo()
        assert next_word(lm, EIFFEL.text) == "Paris"
    # the edit is clean in all modes: a small fraction of the weight's norm
    assert all(r.update_norm_ratio < 0.2 for r in results.values())


def test_disabling_edit_shows_in_original_mode(smollm2):
    """Hamlet -> Charles Dickens: low cos(k*, k(s)) blows the original update up."""
    lm = smollm2
    ed = Editor(lm.model, lm.tokenizer, lm.hparams)
    req = EditRequest("{} was written by", "Hamlet", "Charles Dickens", "William Shakespeare")
    r = ed.compare(req)
    assert r["original"].cos_kstar_ks < 0.5
    assert r["original"].update_norm > 4 * r["rrome"].update_norm
    assert r["original"].update_norm > 4 * r["prompt"].update_norm
    assert r["original"].denominator < r["rrome"].denominator


@pytest.mark.ci
def test_loading_prints_no_progress_bars(capfd):
    """transformers' "Loading weights" bar stays off the terminal: the app owns it."""
    from transformers.utils import logging as hf_logging

    capfd.readouterr()
    lm = load_model("smollm2-135m")
    out, err = capfd.readouterr()
    assert lm.name == "smollm2-135m"
    assert "Loading weights" not in out + err and "it/s" not in out + err
    assert hf_logging.is_progress_bar_enabled()  # switched back on afterwards


def test_replays_started_together_convert_the_embedded_model_once(tmp_path):
    """Several processes on a fresh cache: one converts, the others wait and read its copy
    (they used to share one temporary folder and break each other's writes)."""
    import os
    import subprocess
    import sys

    script = (
        "import logging, sys; logging.basicConfig(level=logging.INFO, stream=sys.stderr)\n"
        "from rome.embedded import embedded_smollm2_dir\n"
        "print(embedded_smollm2_dir())\n"
    )
    env = {**os.environ, "ROME_WORKBENCH_CACHE": str(tmp_path), "OMP_NUM_THREADS": "1"}
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", script],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for _ in range(3)
    ]
    outs = [p.communicate(timeout=600) for p in procs]
    assert [p.returncode for p in procs] == [0, 0, 0], [err[-2000:] for _, err in outs]
    target = tmp_path / "models" / "smollm2-135m"
    assert {out.strip() for out, _ in outs} == {str(target)}
    assert sum("converting" in err for _, err in outs) == 1
    assert (target / "model.safetensors").is_file()
    assert not [p for p in target.parent.iterdir() if ".tmp" in p.name]
    lm = load_model(str(target), hparams="smollm2-135m")
    assert next_word(lm, EIFFEL.text) == "Paris"
