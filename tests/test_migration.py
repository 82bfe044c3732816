"""Databases written before steps existed (schema v2, by the code of commit 77e3a08)
open, read and resume under schema v3 onto the same weights."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from evals.replay import ReplayFinished, _config_of, replay
from rome import Editor, load_model
from workbench.store import Store
from workbench.store.schema import SCHEMA_VERSION

DATA = Path(__file__).parent / "data"
RESULTS = Path(__file__).parent.parent / "docs" / "results"


def copy(name: str, tmp_path: Path) -> Path:
    dst = tmp_path / name
    shutil.copy(DATA / name if (DATA / name).exists() else RESULTS / name, dst)
    return dst


def test_v2_finished_run_reads_as_steps(tmp_path):
    with Store.open(copy("v2-finished.db", tmp_path)) as store:
        assert store.schema_version() == SCHEMA_VERSION == 3
        (run,) = store.list_runs()
        assert run.status == "finished" and run.mode == "rrome"
        edits = store.edits(run.id)
        steps = list(store.iter_steps(run.id))
        assert [s.step for s in steps] == [e.seq for e in edits] == list(range(6))
        for s, e in zip(steps, edits, strict=True):
            assert s.method == "rome" and e.method_name == "rome" and e.step is None
            (layer,) = s.layers
            u, v = store.load_factors(e)
            assert layer.U.shape == (1, u.numel()) and layer.V.shape == (v.numel(), 1)
            assert layer.layer == e.layer and layer.weight_name == e.weight_name
        cfg = _config_of(run)
        assert cfg.method == "rome" and cfg.batch_size == 1


def test_v2_interrupted_run_resumes_onto_the_same_weights(tmp_path):
    """The resume rebuilds base + stored deltas and checks every stored fingerprint; when
    this machine's statistics are the ones the run used, it ends where a straight run of
    the old code ended."""
    lm = load_model("tiny-gpt2")
    with Store.open(copy("v2-straight.db", tmp_path)) as straight:
        (srun,) = straight.list_runs()
        want = straight.edits(srun.id)[-1].fingerprint
    with Store.open(copy("v2-interrupted.db", tmp_path)) as store:
        (run,) = store.list_runs()
        assert run.status == "interrupted" and len(store.edits(run.id)) == 4
        events = list(replay(lm, store, resume=run.id))
        fin = events[-1]
        assert isinstance(fin, ReplayFinished) and fin.status == "finished"
        edits = store.edits(run.id)
        assert [e.seq for e in edits] == list(range(12))
        assert edits[-1].fingerprint == Editor(lm.model, lm.tokenizer, lm.hparams).fingerprint()
        same_stats = (
            _config_of(store.get_run(run.id)).covariance_fingerprint
            == _config_of(srun).covariance_fingerprint
        )
        if same_stats:
            assert edits[-1].fingerprint == want


@pytest.mark.slow
@pytest.mark.parametrize("name", ["long-smollm2.db", "replays-smollm2.db"])
def test_results_databases_open(tmp_path, name):
    if not (RESULTS / name).exists():
        pytest.skip(f"{name} is not in this checkout")
    with Store.open(copy(name, tmp_path)) as store:
        assert store.schema_version() == SCHEMA_VERSION
        for run in store.list_runs():
            n = len(store.edits(run.id, applied_only=True))
            assert sum(len(s.edits) for s in store.iter_steps(run.id)) == n
