"""zsRE question-answering edits, read from the MEND-format file the published code
evaluates on (``zsre_mend_eval.json``; the bundled 800 records, ``--dataset zsre``).

One record (``src``, ``subject``, ``answers``, ``rephrase``, ``loc``, ``loc_ans``;
MEND's ``pred``, ``alt`` and ``cond`` are read past) becomes an edit as kmeng01/memit's
``dsets/zsre.py`` makes one:

- the edit prompt is ``src`` with the subject written as ``{}`` (the subject must
  occur in ``src`` exactly once: a ROME request has one ``{}``);
- ``target_new`` is ``answers[0]``, ``target_true`` is the literal end-of-text
  marker :data:`END_OF_TEXT` (zsRE has no true object for the new one to beat);
- the one paraphrase prompt is ``rephrase``;
- the neighbourhood is ``loc`` (an ``nq question: ...``) with its answer
  ``loc_ans``: the published code asks for each of its tokens after ``loc + "?"``
  and the decoded tokens before it (built per tokenizer, at scoring time, by
  :mod:`evals.zsre_scoring`).

The case id of a record is its 0-based position in the file, as the published
code numbers them (``enumerate``). A :class:`ZsreRecord` is a
:class:`~evals.counterfact.CounterFactRecord` (the replay edits, stores and
fingerprints it like one) with the neighbourhood question and answer besides;
its metrics are zsRE's (:func:`evals.zsre_scoring.zsre_metrics`).
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rome.request import END_OF_TEXT  # the target_true of every zsRE request

from .counterfact import CounterFactRecord, LoadResult, _BadRecord, _check_length

log = logging.getLogger(__name__)

ZSRE_PATH = Path(__file__).parent / "data" / "zsre" / "zsre-mend-800.json"
#: the fields a MEND-format zsRE record must have (what tells the format apart)
ZSRE_FIELDS = ("src", "subject", "answers", "rephrase", "loc", "loc_ans")
#: what marks a stored record as zsRE (``ZsreRecord.to_dict()['dataset']``)
ZSRE = "zsre"


@dataclass
class ZsreRecord(CounterFactRecord):
    """One zsRE edit: a CounterFact-shaped request, and the neighbourhood QA pair."""

    loc: str = ""  # the neighbourhood question ("nq question: ...")
    loc_ans: str = ""  # its answer, asked for token by token
    dataset: str = ZSRE


def is_zsre_row(raw: Any) -> bool:
    """Whether ``raw`` has the fields of a MEND-format zsRE record."""
    return isinstance(raw, Mapping) and all(k in raw for k in ZSRE_FIELDS)


def _field(raw: Mapping[str, Any], name: str) -> str:
    value = raw.get(name)
    if not isinstance(value, str) or not value.strip():
        raise _BadRecord(f"{name} is missing or empty")
    return value


def parse_zsre(raw: Any, case_id: int) -> ZsreRecord:
    """One MEND-format record as the published code reads it; ``_BadRecord`` says
    why one cannot be edited."""
    if not isinstance(raw, Mapping):
        raise _BadRecord(f"record #{case_id} is not a JSON object")
    src, subject = _field(raw, "src"), _field(raw, "subject")
    answers = raw.get("answers")
    if not isinstance(answers, list) or not answers or not isinstance(answers[0], str):
        raise _BadRecord("answers must be a non-empty list of strings")
    if not answers[0].strip():
        raise _BadRecord("answers[0] is empty")
    n = src.count(subject)
    if n != 1:
        raise _BadRecord(f"the subject {subject!r} occurs {n} times in src {src!r} (needs 1)")
    if "{" in src or "}" in src:
        raise _BadRecord(f"src has a brace: {src!r}")
    loc = _field(raw, "loc")
    if "nq question: " not in loc:  # the published reader asserts it
        raise _BadRecord(f"loc is not an 'nq question: ...': {loc!r}")
    if answers[0].strip() == END_OF_TEXT:
        raise _BadRecord("answers[0] is the end-of-text marker")
    return ZsreRecord(
        case_id=case_id,
        prompt=src.replace(subject, "{}"),
        subject=subject,
        target_new=answers[0],
        target_true=END_OF_TEXT,
        paraphrase_prompts=[_field(raw, "rephrase")],
        neighborhood_prompts=[loc + "?"],
        generation_prompts=[],
        loc=loc,
        loc_ans=_field(raw, "loc_ans"),
    )


def zsre_records_from(
    rows: Iterable[tuple[int, Any]], limit: int | None = None, tokenizer: Any = None
) -> LoadResult:
    """``(case_id, raw)`` rows as records, in the order given; the unusable ones (and,
    with ``tokenizer``, those over the token limit of one edit) in ``skipped``."""
    result = LoadResult([], kind="zsRE")
    for case_id, raw in rows:
        if limit is not None and len(result.records) >= limit:
            break
        try:
            rec = parse_zsre(raw, case_id)
            result.records.append(rec if tokenizer is None else _check_length(rec, tokenizer))
        except _BadRecord as err:
            log.warning("zsRE record %s skipped: %s", case_id, err)
            result.skipped.append((case_id, str(err)))
    return result


def record_of(data: Mapping[str, Any]) -> CounterFactRecord:
    """A stored record (``to_dict()``) back as the record it was: zsRE or CounterFact."""
    if data.get("dataset") == ZSRE:
        return ZsreRecord(**data)
    return CounterFactRecord(**data)
