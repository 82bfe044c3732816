"""The retention protocol: the first M applied edits of a run re-scored at a checkpoint.

At every checkpoint after the first edit, the records of the run's first M
applied edits (in order, from the records stored with them) are scored on
the model as it is then. An edit *holds* when its edit prompt still prefers
the new object (ES = 1, as the end-of-run "survived" count). The pass is
stored as a checkpoint row of task ``"retention"``: ``value`` the fraction
holding, ``n`` the records scored, ``extra`` their ES / PS / NS / S, how many
hold, M, which of them no longer hold, and the seconds the pass took.
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any

from .counterfact import CounterFactRecord
from .metrics import aggregate, record_metrics
from .protocols import RETENTION_TASK
from .zsre import record_of

if TYPE_CHECKING:
    from torch import nn
    from transformers import PreTrainedTokenizerBase

    from .sink import CheckpointRow, ReplayReader, ReplaySink

__all__ = [
    "RetentionResult",
    "first_edits",
    "retention_checkpoint",
    "retention_of",
    "score_retention",
    "store_retention",
]


@dataclass
class RetentionResult:
    """One retention pass: how many of the first ``m`` edits still hold after ``step``."""

    step: int
    m: int  # records scored (the first M applied edits, fewer early in a run)
    size: int  # M, the run's retention size
    n_hold: int
    es: float | None = None
    ps: float | None = None
    ns: float | None = None
    s: float | None = None
    lost: list[int] = field(default_factory=list)  # seqs of the scored edits that do not hold
    seconds: float = 0.0
    # each scored edit's [seq, ES, PS, NS] (for intervals and paired tests; empty in
    # passes stored before 2026-12-07)
    records: list[list[float | None]] = field(default_factory=list)

    @property
    def value(self) -> float | None:
        """The fraction of the scored edits still holding (None when none was scored)."""
        return self.n_hold / self.m if self.m else None

    def as_dict(self) -> dict[str, Any]:
        return {**asdict(self), "value": self.value}


def first_edits(store: ReplayReader, run_id: str, size: int) -> list[tuple[int, CounterFactRecord]]:
    """``(seq, record)`` of the run's first ``size`` applied edits that stored their record."""
    out: list[tuple[int, CounterFactRecord]] = []
    if size <= 0:
        return out
    for e in store.edits(run_id, applied_only=True):
        stored = (e.record or {}).get("counterfact")
        if stored:
            out.append((e.seq, record_of(stored)))
        if len(out) >= size:
            break
    return out


def score_retention(
    model: nn.Module,
    tok: PreTrainedTokenizerBase,
    first: Sequence[tuple[int, CounterFactRecord]],
    step: int,
    size: int,
) -> RetentionResult:
    """Score ``first`` on the model as it is; which hold (ES = 1 on the edit prompt)."""
    t0 = time.perf_counter()
    scored = [(seq, record_metrics(model, tok, rec)) for seq, rec in first]
    agg = aggregate([m for _, m in scored]) if scored else {}
    lost = [seq for seq, m in scored if not (m.es is not None and m.es >= 1.0)]
    return RetentionResult(
        step=step,
        m=len(scored),
        size=size,
        n_hold=len(scored) - len(lost),
        es=agg.get("es"),
        ps=agg.get("ps"),
        ns=agg.get("ns"),
        s=agg.get("s"),
        lost=lost,
        seconds=time.perf_counter() - t0,
        records=[[seq, m.es, m.ps, m.ns] for seq, m in scored],
    )


def store_retention(store: ReplaySink, run_id: str, result: RetentionResult) -> None:
    """Write ``result`` as the run's retention checkpoint at its step (replacing one)."""
    extra = {k: v for k, v in result.as_dict().items() if k not in ("step", "value")}
    store.add_checkpoint(
        run_id,
        result.step,
        RETENTION_TASK,
        value=result.value,
        n=result.m,
        extra=extra,
        replace=True,
    )


def retention_checkpoint(
    model: nn.Module,
    tok: PreTrainedTokenizerBase,
    store: ReplaySink,
    run_id: str,
    step: int,
    size: int,
) -> RetentionResult | None:
    """The retention pass of a checkpoint, stored; None when off or before any edit."""
    if size <= 0:
        return None
    first = first_edits(store, run_id, size)
    if not first:
        return None
    result = score_retention(model, tok, first, step, size)
    store_retention(store, run_id, result)
    return result


def retention_of(c: CheckpointRow | Mapping[str, Any]) -> RetentionResult:
    """A stored retention checkpoint (or its JSON export) read back."""
    if isinstance(c, Mapping):
        step, n, value, extra = c.get("step", 0), c.get("n"), c.get("value"), c.get("extra")
    else:
        step, n, value, extra = c.step, c.n, c.value, c.extra
    x: Mapping[str, Any] = extra or {}
    m = int(x.get("m", n or 0))
    n_hold = x.get("n_hold")
    if n_hold is None:
        n_hold = round((value or 0.0) * m)
    return RetentionResult(
        step=int(step),
        m=m,
        size=int(x.get("size", m)),
        n_hold=int(n_hold),
        es=x.get("es"),
        ps=x.get("ps"),
        ns=x.get("ns"),
        s=x.get("s"),
        lost=[int(s) for s in x.get("lost", [])],
        seconds=float(x.get("seconds", 0.0)),
        records=[list(r) for r in x.get("records", [])],
    )
