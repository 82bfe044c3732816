"""The edit data sets a replay reads, named or from a file, and the order it edits them in.

Named: ``sample`` and ``val`` (bundled CounterFact), ``zsre`` (the bundled 800 zsRE
records), ``hub`` (CounterFact online). A file is read as CounterFact (ROME's
format or the MEND / EasyEdit one) or as MEND-format zsRE, told apart by its
first record's fields (:func:`detect_format`); a file that is neither is an
:class:`~evals.errors.EvalDataError` (one line: the CLI's exit 2).

With an order seed, the file's records are edited in a shuffled order:
``random.Random(seed).shuffle`` of the file's positions, before any record is
parsed, so the order of the records does not depend on the model (a record a
tokenizer finds too long is skipped in place), and the first N records of a
seed's order are the first N of any longer run with that seed (``--extend-to``).
"""

from __future__ import annotations

import functools
import logging
import random
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from .counterfact import NAMED_SOURCES as COUNTERFACT_SOURCES
from .counterfact import LoadResult, _hub_rows, _read_rows, records_from
from .errors import EvalDataError
from .zsre import ZSRE, ZSRE_FIELDS, ZSRE_PATH, is_zsre_row, zsre_records_from

log = logging.getLogger(__name__)

COUNTERFACT = "counterfact"
#: the bundled data sets by name (``hub`` is CounterFact online, read by the loader)
NAMED_SOURCES: dict[str, Path] = {**COUNTERFACT_SOURCES, ZSRE: ZSRE_PATH}
FORMATS = (COUNTERFACT, ZSRE)


def is_named(source: str) -> bool:
    """Whether ``source`` names a bundled data set (or ``hub``) rather than a file."""
    return source == "hub" or source in NAMED_SOURCES


def detect_format(rows: Sequence[Any], where: str) -> str:
    """``"counterfact"`` or ``"zsre"``, from the first record that is a JSON object.

    Raises :class:`EvalDataError` for a file with no records, or whose first
    object is neither format (the message names the fields each one needs).
    """
    first = next((r for r in rows if isinstance(r, Mapping)), None)
    if first is None:
        raise EvalDataError(f"{where} holds no records (a JSON list of objects)")
    if "requested_rewrite" in first or ("prompt" in first and "ground_truth" in first):
        return COUNTERFACT
    if is_zsre_row(first):
        return ZSRE
    keys = ", ".join(sorted(map(str, first))[:8]) or "none"
    raise EvalDataError(
        f"{where} is neither CounterFact (requested_rewrite, or prompt and ground_truth) "
        f"nor zsRE ({', '.join(ZSRE_FIELDS)}); its first record has: {keys}"
    )


def source_rows(source: str | Path) -> tuple[list[Any], str]:
    """The raw rows of ``source`` and their format."""
    if isinstance(source, str) and source == "hub":
        return _hub_rows(), COUNTERFACT
    named = NAMED_SOURCES.get(source) if isinstance(source, str) else None
    path = named if named is not None else Path(source)
    rows = _read_rows(path)
    return rows, detect_format(rows, str(path))


def check_source(source: str) -> str | None:
    """Why ``source`` cannot be replayed (no file, unreadable, neither format), or None.
    Reads a file, never the network: ``hub`` is taken as it is. A file's answer is
    kept while its size and time stamp stay the same (a form checks it as one types)."""
    if source == "hub":
        return None
    path = NAMED_SOURCES.get(source) or Path(source).expanduser()
    try:
        st = path.stat()
    except OSError:
        return f"has no file at {source}"
    if not path.is_file():
        return f"has no file at {source}"
    return _file_problem(str(path), st.st_size, st.st_mtime_ns)


@functools.lru_cache(maxsize=16)
def _file_problem(path: str, size: int, mtime_ns: int) -> str | None:
    try:
        source_rows(Path(path))
    except EvalDataError as err:
        return str(err)
    return None


def order_of(n: int, seed: int | None) -> list[int]:
    """The positions ``0..n-1`` in file order, or shuffled by ``seed``."""
    order = list(range(n))
    if seed is not None:
        random.Random(seed).shuffle(order)
    return order


def load_records(
    source: str | Path = "sample",
    limit: int | None = None,
    tokenizer: Any = None,
    order_seed: int | None = None,
) -> LoadResult:
    """The records of ``source`` (CounterFact or zsRE), in file order or ``order_seed``'s.

    ``limit`` caps the records returned (the first that load, in that order); with
    ``tokenizer``, a record over the token limit of one edit is skipped, with why.
    """
    rows, fmt = source_rows(source)
    order = order_of(len(rows), order_seed)
    if fmt == ZSRE:
        result = zsre_records_from(((i, rows[i]) for i in order), limit, tokenizer)
    else:
        result = records_from((rows[i] for i in order), limit, tokenizer)
    log.info(
        "%s: %d records loaded, %d skipped%s",
        "zsRE" if fmt == ZSRE else "CounterFact",
        len(result),
        len(result.skipped),
        "" if order_seed is None else f" (order seed {order_seed})",
    )
    return result
