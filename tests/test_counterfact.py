"""CounterFact loaders: both formats, the bundled sample, bad records."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest

from evals.counterfact import GENERATION_TEMPLATES, load_counterfact, records_from
from evals.errors import EvalDataError

ROME_RECORD = {
    "case_id": 0,
    "pararel_idx": 2796,
    "requested_rewrite": {
        "prompt": "The mother tongue of {} is",
        "relation_id": "P103",
        "target_new": {"str": "English", "id": "Q1860"},
        "target_true": {"str": "French", "id": "Q150"},
        "subject": "Danielle Darrieux",
    },
    "paraphrase_prompts": ["Shayna does this. Danielle Darrieux speaks the language", "x y"],
    "neighborhood_prompts": ["The mother tongue of Léon Blum is", "Michel Rocard speaks"],
    "attribute_prompts": ["J. R. R. Tolkien is a native speaker of"],
    "generation_prompts": ["Danielle Darrieux's mother tongue is"],
}

MEND_RECORD = {
    "case_id": 10,
    "prompt": "BBC One, by",
    "target_new": "Sega",
    "subject": "BBC One",
    "ground_truth": "BBC",
    "rephrase_prompt": "BBC One is my favorite product out of everything owned by",
    "locality_prompt": "BBC Radio, by",
    "locality_ground_truth": "BBC",
}


def write(tmp_path: Path, rows: list) -> Path:
    path = tmp_path / "cf.json"
    path.write_text(json.dumps(rows))
    return path


def test_rome_format(tmp_path: Path) -> None:
    res = load_counterfact(write(tmp_path, [ROME_RECORD]))
    assert res.skipped == []
    (rec,) = res.records
    assert rec.case_id == 0
    assert rec.prompt == "The mother tongue of {} is"
    assert rec.subject == "Danielle Darrieux"
    assert (rec.target_new, rec.target_true) == ("English", "French")
    assert rec.paraphrase_prompts == ROME_RECORD["paraphrase_prompts"]
    assert rec.neighborhood_prompts == ROME_RECORD["neighborhood_prompts"]
    assert rec.generation_prompts == ["Danielle Darrieux's mother tongue is"]
    assert rec.attribute_prompts == ["J. R. R. Tolkien is a native speaker of"]
    assert rec.text == "The mother tongue of Danielle Darrieux is"


def test_mend_format_becomes_a_template(tmp_path: Path) -> None:
    res = load_counterfact(write(tmp_path, [MEND_RECORD]))
    (rec,) = res.records
    assert rec.prompt == "{}, by"
    assert rec.text == "BBC One, by"
    assert (rec.target_new, rec.target_true) == ("Sega", "BBC")
    assert rec.paraphrase_prompts == [MEND_RECORD["rephrase_prompt"]]
    assert rec.neighborhood_prompts == ["BBC Radio, by"]
    assert rec.generation_prompts == [t.format("BBC One") for t in GENERATION_TEMPLATES]
    assert rec.generation_prompts[0] == "BBC One is"


def test_only_first_subject_occurrence_replaced(tmp_path: Path) -> None:
    raw = dict(MEND_RECORD, prompt="Paris Hilton, not Paris, was born in", subject="Paris")
    (rec,) = load_counterfact(write(tmp_path, [raw])).records
    assert rec.prompt == "{} Hilton, not Paris, was born in"


def test_to_request() -> None:
    (rec,) = records_from([MEND_RECORD]).records
    req = rec.to_request()
    assert (req.prompt, req.subject, req.target_new, req.target_true) == (
        "{}, by",
        "BBC One",
        "Sega",
        "BBC",
    )


def test_bad_records_are_reported_with_case_id(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    rows = [
        dict(MEND_RECORD, case_id=1, subject="ITV"),  # subject not in prompt
        dict(MEND_RECORD, case_id=2, target_new=""),  # empty target
        {k: v for k, v in MEND_RECORD.items() if k != "ground_truth"} | {"case_id": 3},
        dict(ROME_RECORD, case_id=4, requested_rewrite={"prompt": "no slot", "subject": "A"}),
        dict(
            ROME_RECORD,
            case_id=5,
            requested_rewrite=dict(ROME_RECORD["requested_rewrite"], prompt="{} and {}"),
        ),
        dict(MEND_RECORD, case_id=6, target_new="BBC"),  # new == true
        dict(MEND_RECORD, case_id=7),  # fine
        {"prompt": "x"},  # no case id
        dict(MEND_RECORD, case_id=8, rephrase_prompt=42),
    ]
    with caplog.at_level(logging.WARNING, logger="evals.counterfact"):
        res = load_counterfact(write(tmp_path, rows))
    assert [r.case_id for r in res.records] == [7]
    ids = [cid for cid, _ in res.skipped]
    assert ids == [1, 2, 3, 4, 5, 6, -1, 8]
    reasons = dict(res.skipped)
    assert "does not occur" in reasons[1]
    assert "target_new" in reasons[2]
    assert "ground_truth" in reasons[3]
    assert "exactly one" in reasons[5]
    assert "equals" in reasons[6]
    assert "case 1 skipped" in caplog.text and "case 8 skipped" in caplog.text


def test_limit_counts_loaded_records(tmp_path: Path) -> None:
    rows = [dict(MEND_RECORD, case_id=1, subject="nope")] + [
        dict(MEND_RECORD, case_id=i) for i in range(10, 15)
    ]
    res = load_counterfact(write(tmp_path, rows), limit=2)
    assert [r.case_id for r in res.records] == [10, 11]
    assert [c for c, _ in res.skipped] == [1]


def test_jsonl_and_errors(tmp_path: Path) -> None:
    path = tmp_path / "cf.jsonl"
    path.write_text(json.dumps(MEND_RECORD) + "\n\n" + json.dumps(ROME_RECORD) + "\n")
    assert [r.case_id for r in load_counterfact(path).records] == [10, 0]
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(EvalDataError, match="not valid JSON"):
        load_counterfact(bad)
    with pytest.raises(EvalDataError, match="cannot read"):
        load_counterfact(tmp_path / "missing.json")


def test_bundled_sample() -> None:
    res = load_counterfact("sample")
    assert len(res) >= 150 and res.skipped == []
    assert len({r.case_id for r in res.records}) == len(res)
    for rec in res.records:
        assert rec.prompt.count("{}") == 1
        assert rec.paraphrase_prompts and rec.neighborhood_prompts and rec.generation_prompts
    assert len(load_counterfact("sample", limit=5)) == 5


def test_sample_rows_are_unchanged_val_rows() -> None:
    data = Path(__file__).resolve().parents[1] / "evals" / "data" / "counterfact"
    val_rows = json.loads((data / "counterfact-val.json").read_text())
    by_id = {r["case_id"]: r for r in val_rows}
    sample = json.loads((data / "sample.json").read_text())
    assert len(sample) >= 1000  # enough for a 1,000-edit replay offline
    assert all(by_id[r["case_id"]] == r for r in sample)
    assert len(load_counterfact("val")) == len(val_rows) == 1919


def test_bundled_val_split_is_the_shared_file() -> None:
    shared = Path(__file__).resolve().parents[2] / "shared" / "data" / "counterfact"
    if not (shared / "counterfact-val.json").exists():
        pytest.skip("the shared CounterFact split is not here")
    bundled = Path(__file__).resolve().parents[1] / "evals/data/counterfact/counterfact-val.json"
    assert bundled.read_bytes() == (shared / "counterfact-val.json").read_bytes()
