"""The metrics of one edit record, as every scorer returns them (CounterFact's in
:mod:`evals.metrics`, zsRE's in :mod:`evals.zsre_scoring`), and the harmonic mean."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any


@dataclass
class RecordMetrics:
    """Metrics of one record (CounterFact's; zsRE's add theirs); ``None`` where the
    record has no such prompt."""

    case_id: int
    es: float
    em: float | None  # None for zsRE (no true object: no margin)
    ps: float | None
    pm: float | None
    ns: float | None
    nm: float | None
    s_record: float  # harmonic mean of this record's ES, PS, NS (not the run's S)
    p_new: float  # on the edit prompt
    p_true: float
    ge: float | None = None
    generations: list[str] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def harmonic_mean(xs: Sequence[float]) -> float:
    """Harmonic mean; 0 as soon as one value is 0."""
    if not xs or any(x <= 0 for x in xs):
        return 0.0
    return len(xs) / sum(1.0 / x for x in xs)
