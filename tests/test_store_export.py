"""The SQLite store, on real database files in tmp_path: a run's export (JSON, CSV) and
its deletion."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
from store_helpers import _add

from workbench.store import (
    SCHEMA_VERSION,
    InvalidFieldError,
    Store,
    UnknownRunError,
)

# --------------------------------------------------------------------------- export


def _populated(store: Store) -> str:
    run = store.create_run(model="smollm2-135m", mode="original", hparams={"layer": 5})
    for seq in range(3):
        _add(
            store,
            run.id,
            seq,
            case_id=seq,
            mode="original",
            update_norm=[12.0, 254.0, 13.0][seq],
            update_norm_ratio=[0.07, 1.48, 0.08][seq],
            metrics={"ES": 1.0, "PS": 0.5, "S": float("nan"), "probs": {"new": 0.7}},
            flagged=seq == 1,
            flag_reason="norm" if seq == 1 else None,
        )
    store.add_checkpoint(run.id, 0, "sst2", accuracy=0.9)
    store.add_fluency(run.id, 0, 5.1)
    store.add_rescore(run.id, 0, {"ES": 0.0})
    return run.id


def test_export_json(store: Store, tmp_path: Path):
    run_id = _populated(store)
    out = store.export_run(run_id, "json", tmp_path / "out" / "run.json")
    text = out.read_text()
    assert "NaN" not in text
    doc = json.loads(text)
    assert doc["schema_version"] == SCHEMA_VERSION
    assert doc["run"]["id"] == run_id and doc["run"]["hparams"] == {"layer": 5}
    assert [e["seq"] for e in doc["edits"]] == [0, 1, 2]
    assert "factors" not in doc["edits"][0] and "u" not in doc["edits"][0]
    assert doc["edits"][1]["update_norm"] == 254.0 and doc["edits"][1]["flagged"] is True
    assert doc["edits"][0]["metrics"]["S"] is None
    assert {c["task"] for c in doc["checkpoints"]} == {"sst2", "fluency"}
    assert doc["rescore"] == [{"seq": 0, "metrics": {"ES": 0.0}}]


def test_export_csv(store: Store, tmp_path: Path):
    run_id = _populated(store)
    out = store.export_run(run_id, "csv", tmp_path / "run.csv")
    rows = list(csv.DictReader(out.open()))
    assert len(rows) == 3
    assert rows[1]["subject"] == "The Eiffel Tower" and rows[1]["target_new"] == "Rome"
    assert float(rows[1]["update_norm"]) == 254.0 and rows[1]["flagged"] == "1"
    assert rows[0]["metric.ES"] == "1.0" and rows[0]["metric.probs.new"] == "0.7"
    assert rows[0]["metric.S"] == ""
    assert rows[0]["rescore.ES"] == "0.0" and rows[1]["rescore.ES"] == ""
    with pytest.raises(InvalidFieldError):
        store.export_run(run_id, "xml", tmp_path / "x")  # type: ignore[arg-type]


def test_delete_run(store: Store):
    run_id = _populated(store)
    keep = store.create_run(model="m")
    store.delete_run(run_id)
    with pytest.raises(UnknownRunError):
        store.get_run(run_id)
    assert [r.id for r in store.list_runs()] == [keep.id]
    assert store.integrity_ok()
