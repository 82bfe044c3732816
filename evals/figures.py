"""A run's figures from what is stored: the CounterFact means at edit time (``pre``
and ``post``), the final re-scoring, and the drift after the last edit.

What a finished replay reports (``ReplayFinished.summary``); the faces draw it
with :func:`workbench.core.summary.run_summary`.
"""

from __future__ import annotations

from typing import Any

from .metrics import aggregate
from .sink import ReplayReader


def stored_figures(store: ReplayReader, run_id: str) -> dict[str, Any]:
    """Run-level figures from what is stored: pre → post means at edit time, the
    final re-scoring, S as the published harmonic mean of the run-level means."""
    edits = store.edits(run_id)
    post = [e.metrics for e in edits if e.applied and e.metrics]
    pre = [e.metrics["pre"] for e in edits if e.applied and (e.metrics or {}).get("pre")]
    out: dict[str, Any] = {"edits_done": len(edits), "post": aggregate(post)}
    protocol = next((m["protocol"] for m in post if m.get("protocol")), None)
    if protocol is not None:  # zsRE: ES / PS / NS are token accuracies (evals.zsre_scoring)
        out["protocol"] = protocol
    if pre:
        out["pre"] = aggregate(pre)
    rescored = [r.metrics for r in store.rescores(run_id)]
    if rescored:
        out["final"] = aggregate(rescored)
        out["survived"] = float(sum(1 for m in rescored if (m.get("es") or 0) >= 1.0))
    # the headline figures: after the final re-scoring when there was one
    head = out.get("final") or out["post"]
    out.update({k: head.get(k) for k in ("es", "ps", "ns", "s")})
    last = edits[-1] if edits else None
    if last is not None and last.metrics and "w_delta_norm" in last.metrics:
        out["w_delta_norm"] = last.metrics["w_delta_norm"]
        out["w_norm_ratio"] = last.metrics["w_norm_ratio"]
    return out


__all__ = ["stored_figures"]
