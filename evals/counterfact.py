"""CounterFact records and their loaders.

Two file formats are read, record by record:

- ROME's ``counterfact.json``: ``case_id``, ``requested_rewrite{prompt, subject,
  target_new{str}, target_true{str}}``, ``paraphrase_prompts``,
  ``neighborhood_prompts``, ``attribute_prompts``, ``generation_prompts``;
- the simplified MEND / EasyEdit format (``prompt`` with the subject written
  in, ``ground_truth``, ``rephrase_prompt``, ``locality_prompt``...). Its prompt
  becomes a template by replacing the subject's first occurrence with ``{}``;
  it has no generation prompts, so a few are written from the subject.

A record that cannot be used (or, given the model's tokenizer, whose edit is over the
token limit of one edit) is logged with its case id and returned in
:attr:`LoadResult.skipped`, never dropped silently.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from rome.request import MAX_REQUEST_TOKENS

from .errors import DataUnavailableError, EvalDataError

if TYPE_CHECKING:
    from rome.request import EditRequest

log = logging.getLogger(__name__)

SAMPLE_PATH = Path(__file__).parent / "data" / "counterfact" / "sample.json"
# The whole validation split, unfiltered, in file order (for long replays)
VAL_PATH = Path(__file__).parent / "data" / "counterfact" / "counterfact-val.json"
NAMED_SOURCES = {"sample": SAMPLE_PATH, "val": VAL_PATH}
HUB_DATASET = "azhx/counterfact"  # ROME's counterfact.json as a hub data set
ROME_URL = "https://rome.baulab.info/data/dsets/counterfact.json"

#: Generation prompts written for records that have none (MEND format).
GENERATION_TEMPLATES = (
    "{} is",
    "{} was",
    "{} has",
    "People often say that {}",
    "The first thing to know about {} is that",
)


@dataclass
class CounterFactRecord:
    """One CounterFact case: the edit and the prompts that test it."""

    case_id: int
    prompt: str  # template with exactly one "{}"
    subject: str
    target_new: str
    target_true: str
    paraphrase_prompts: list[str]
    neighborhood_prompts: list[str]
    generation_prompts: list[str]
    attribute_prompts: list[str] = field(default_factory=list)

    @property
    def text(self) -> str:
        """The edit prompt with the subject filled in."""
        return self.prompt.replace("{}", self.subject, 1)

    def to_request(self) -> EditRequest:
        """The engine's edit request for this record."""
        from rome.request import EditRequest

        return EditRequest(self.prompt, self.subject, self.target_new, self.target_true)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class LoadResult:
    """Records that loaded, and ``(case_id, reason)`` for those that did not."""

    records: list[CounterFactRecord]
    skipped: list[tuple[int, str]] = field(default_factory=list)
    kind: str = "CounterFact"  # the data set's name in messages ("zsRE" for zsRE)

    def __len__(self) -> int:
        return len(self.records)


class _BadRecord(ValueError):
    """Raised inside the parsers; becomes an entry of ``skipped``."""


def _text(value: Any, name: str) -> str:
    if isinstance(value, Mapping):  # ROME: {"str": "Paris", "id": "Q90"}
        value = value.get("str")
    if not isinstance(value, str) or not value.strip():
        raise _BadRecord(f"{name} is missing or empty")
    return value


def _texts(value: Any, name: str) -> list[str]:
    if value is None:
        return []
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, list) or not all(isinstance(v, str) and v.strip() for v in value):
        raise _BadRecord(f"{name} must be a list of non-empty strings")
    return list(value)


def _check(rec: CounterFactRecord) -> CounterFactRecord:
    n = rec.prompt.count("{}")
    if n != 1:
        raise _BadRecord(f"prompt must contain exactly one '{{}}' (found {n}): {rec.prompt!r}")
    if "{" in rec.prompt.replace("{}", "") or "}" in rec.prompt.replace("{}", ""):
        raise _BadRecord(f"prompt has a stray brace: {rec.prompt!r}")
    if rec.target_new.strip() == rec.target_true.strip():
        raise _BadRecord("target_new equals target_true")
    return rec


def _from_rome(raw: Mapping[str, Any], case_id: int) -> CounterFactRecord:
    rw = raw.get("requested_rewrite")
    if isinstance(rw, list):
        raise _BadRecord(
            f"requested_rewrite is a list of {len(rw)}, not one object "
            "{prompt, subject, target_new, target_true}"
        )
    if not isinstance(rw, Mapping):
        raise _BadRecord("requested_rewrite is missing")
    return CounterFactRecord(
        case_id=case_id,
        prompt=_text(rw.get("prompt"), "requested_rewrite.prompt"),
        subject=_text(rw.get("subject"), "requested_rewrite.subject"),
        target_new=_text(rw.get("target_new"), "requested_rewrite.target_new"),
        target_true=_text(rw.get("target_true"), "requested_rewrite.target_true"),
        paraphrase_prompts=_texts(raw.get("paraphrase_prompts"), "paraphrase_prompts"),
        neighborhood_prompts=_texts(raw.get("neighborhood_prompts"), "neighborhood_prompts"),
        generation_prompts=_texts(raw.get("generation_prompts"), "generation_prompts"),
        attribute_prompts=_texts(raw.get("attribute_prompts"), "attribute_prompts"),
    )


def _from_mend(raw: Mapping[str, Any], case_id: int) -> CounterFactRecord:
    prompt = _text(raw.get("prompt"), "prompt")
    subject = _text(raw.get("subject"), "subject")
    if "{" in prompt or "}" in prompt:
        raise _BadRecord(f"prompt has a brace: {prompt!r}")
    if subject not in prompt:
        raise _BadRecord(f"subject {subject!r} does not occur in prompt {prompt!r}")
    true = _text(raw.get("ground_truth"), "ground_truth")
    locality_true = raw.get("locality_ground_truth")
    if locality_true is not None and _text(locality_true, "locality_ground_truth") != true:
        raise _BadRecord("locality_ground_truth differs from ground_truth")
    return CounterFactRecord(
        case_id=case_id,
        prompt=prompt.replace(subject, "{}", 1),
        subject=subject,
        target_new=_text(raw.get("target_new"), "target_new"),
        target_true=true,
        paraphrase_prompts=_texts(raw.get("rephrase_prompt"), "rephrase_prompt"),
        neighborhood_prompts=_texts(raw.get("locality_prompt"), "locality_prompt"),
        generation_prompts=[t.format(subject) for t in GENERATION_TEMPLATES],
    )


def parse_record(raw: Any, position: int = 0) -> CounterFactRecord:
    """One record in either format; raises ``ValueError`` saying what is wrong."""
    if not isinstance(raw, Mapping):
        raise _BadRecord(f"record #{position} is not a JSON object")
    case_id = raw.get("case_id")
    if isinstance(case_id, bool) or not isinstance(case_id, int):
        raise _BadRecord(f"record #{position} has no integer case_id")
    if "requested_rewrite" in raw:
        return _check(_from_rome(raw, case_id))
    if "prompt" in raw and "ground_truth" in raw:
        return _check(_from_mend(raw, case_id))
    raise _BadRecord("unknown format (neither requested_rewrite nor prompt/ground_truth)")


def _check_length(rec: CounterFactRecord, tokenizer: Any) -> CounterFactRecord:
    """``rec`` if its edit is within the limit of one edit (:data:`MAX_REQUEST_TOKENS`
    tokens of ``tokenizer`` for the prompt with its subject, and for each target)."""
    problem = rec.to_request().length_problem(tokenizer, MAX_REQUEST_TOKENS)
    if problem is not None:
        raise _BadRecord(problem)
    return rec


def records_from(
    rows: Iterable[Any], limit: int | None = None, tokenizer: Any = None
) -> LoadResult:
    """Parse raw rows (dicts) into records, keeping the reasons of the failures.
    With ``tokenizer``, a record over the token limit of one edit is skipped too."""
    result = LoadResult([])
    for i, raw in enumerate(rows):
        if limit is not None and len(result.records) >= limit:
            break
        try:
            rec = parse_record(raw, i)
            result.records.append(rec if tokenizer is None else _check_length(rec, tokenizer))
        except _BadRecord as err:
            case_id = raw.get("case_id", -1) if isinstance(raw, Mapping) else -1
            case_id = case_id if isinstance(case_id, int) else -1
            log.warning("CounterFact case %s skipped: %s", case_id, err)
            result.skipped.append((case_id, str(err)))
    return result


def _read_rows(path: Path) -> list[Any]:
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as err:
        raise EvalDataError(f"cannot read CounterFact file {path}: {err}") from err
    try:
        if path.suffix == ".jsonl":
            return [json.loads(line) for line in text.splitlines() if line.strip()]
        data = json.loads(text)
    except json.JSONDecodeError as err:
        raise EvalDataError(f"{path} is not valid JSON: {err}") from err
    if not isinstance(data, list):
        raise EvalDataError(f"{path}: expected a JSON list of records")
    return data


def _hub_rows() -> list[Any]:
    errors = []
    try:
        import datasets

        return list(datasets.load_dataset(HUB_DATASET, split="train"))
    except Exception as err:  # any failure: try the next source
        errors.append(f"hub data set {HUB_DATASET}: {err}")
    try:
        import urllib.request

        with urllib.request.urlopen(ROME_URL, timeout=30) as resp:
            return list(json.loads(resp.read().decode("utf-8")))
    except Exception as err:
        errors.append(f"{ROME_URL}: {err}")
    raise DataUnavailableError(
        "could not download CounterFact (offline?): "
        + "; ".join(errors)
        + ". Pass a local counterfact.json, or use the bundled sample ('sample')."
    )


def load_counterfact(
    source: str | Path = "sample", limit: int | None = None, tokenizer: Any = None
) -> LoadResult:
    """Load CounterFact from a file, ``"sample"`` or ``"val"`` (bundled) or ``"hub"`` (online).

    ``limit`` caps the number of records returned (the first that load). With
    ``tokenizer`` (the model's), records whose edit is longer than an edit may be
    (:data:`MAX_REQUEST_TOKENS` tokens) are skipped, with the reason.
    """
    if isinstance(source, str) and source == "hub":
        rows = _hub_rows()
    else:
        named = NAMED_SOURCES.get(source) if isinstance(source, str) else None
        path = named if named is not None else Path(source)
        rows = _read_rows(path)
    result = records_from(rows, limit, tokenizer)
    log.info("CounterFact: %d records loaded, %d skipped", len(result), len(result.skipped))
    return result
