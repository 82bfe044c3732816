"""One step of a replay: B requests (1 for a method that edits one at a time) edited together
by the run's method, through :meth:`rome.Editor.edit` like every other caller.

Every step is stored the same way, through the sink's ``add_step``: one row per
request (built by :class:`StepFacts`) and the step's per-layer factors (a
one-request rank-one step, every ROME step, keeps its ``u``, ``v`` in its row). Every request is
scored just before its step (``pre``) and just after it (``post``); a batched
step's per-layer update norms and the cumulative drift of every edited layer
go with each request's row, and the step is stored whole (its rows and its
factors in one transaction) or not at all.
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from rome import Editor
from rome.methods import Update

from .counterfact import CounterFactRecord
from .events import EditDone
from .flags import norm_flag
from .metrics import record_metrics
from .probe_after import score_applied, trial, without_trial
from .run_state import RunState


def layer_drift(ed: Editor, layers: Sequence[int]) -> dict[str, Any]:
    """Cumulative drift per edited layer and over all of them (√Σ‖W_n − W_0‖²)."""
    per = {}
    for layer in layers:
        d, r = ed.drift(layer)
        per[str(layer)] = {"w_delta_norm": d, "w_norm_ratio": r}
    total = math.sqrt(sum(v["w_delta_norm"] ** 2 for v in per.values()))
    ratio = max((v["w_norm_ratio"] for v in per.values()), default=1.0)
    return {"w_delta_norm": total, "w_norm_ratio": ratio, "layers": per}


def weight_norm(ed: Editor, layers: Sequence[int]) -> float:
    """√Σ‖W_l‖²_F over the edited layers, as they are now."""
    from rome.update import weight_out_in

    return math.sqrt(
        sum(float(weight_out_in(ed.module(layer)).detach().float().norm()) ** 2 for layer in layers)
    )


@dataclass
class StepFacts:
    """What one step did, the same for each of its requests (one row and one event each)."""

    method: str
    mode: str
    layer: int  # the last edited layer (a rome step's only one)
    weight_name: str
    update_norm: float
    update_norm_ratio: float
    flag: str | None  # why the step is flagged
    refused: bool
    fingerprint: str
    w_delta_norm: float
    w_norm_ratio: float
    timings: dict[str, Any]
    # a rank-one step keeps u, v (and ROME its denominator and cos(k*, k(s))) in the row
    row_extra: dict[str, Any] = field(default_factory=dict)
    cos_kstar_ks: float | None = None
    denominator: float | None = None

    def row(
        self,
        seq: int,
        rec: CounterFactRecord,
        request: Any,
        record: dict[str, Any],
        metrics: dict[str, Any],
    ) -> dict[str, Any]:
        """The ``edits`` row of one request (the keywords of the store's ``add_step``)."""
        return dict(
            seq=seq,
            request=request,
            mode=self.mode,
            layer=self.layer,
            weight_name=self.weight_name,
            case_id=rec.case_id,
            update_norm=self.update_norm,
            update_norm_ratio=self.update_norm_ratio,
            record=record,
            metrics=metrics,
            timings=self.timings,
            flagged=self.flag is not None,
            flag_reason=self.flag,
            refused=self.refused,
            applied=not self.refused,
            fingerprint=self.fingerprint,
            method=self.method,
            **self.row_extra,
        )

    def event(
        self, seq: int, total: int, rec: CounterFactRecord, metrics: dict[str, Any], seconds: float
    ) -> EditDone:
        return EditDone(
            seq=seq,
            total=total,
            case_id=rec.case_id,
            subject=rec.subject,
            target_new=rec.target_new,
            update_norm=self.update_norm,
            update_norm_ratio=self.update_norm_ratio,
            metrics=metrics,
            flagged=self.flag is not None,
            flag_reason=self.flag,
            refused=self.refused,
            seconds=seconds,
            w_delta_norm=self.w_delta_norm,
            w_norm_ratio=self.w_norm_ratio,
            cos_kstar_ks=self.cos_kstar_ks,
            denominator=self.denominator,
        )


def _pre(m: Any) -> dict[str, Any]:
    """The ``pre`` metrics stored with a request (no generations)."""
    return {k: v for k, v in m.as_dict().items() if k != "generations"}


def in_row(upd: Update, n_requests: int) -> bool:
    """Whether a step's factors go in its one edit row (``u``, ``v``: one request, one
    layer, rank one, no keys to carry: every ROME step) rather than the step's factors."""
    return (
        n_requests == 1
        and len(upd.layers) == 1
        and upd.layers[0].rank == 1
        and upd.layers[0].keys is None
    )


def edit_step(
    st: RunState, first_seq: int, recs: Sequence[CounterFactRecord], total: int
) -> list[EditDone]:
    """Edit ``recs`` as one step of the run's method starting at ``first_seq``; store it
    whole; one event per request."""
    ed, layers = st.editor, st.layers
    t0 = time.perf_counter()
    model, tok = st.lm.model, st.lm.tokenizer
    pre = [record_metrics(model, tok, r) for r in recs] if st.cfg.pre_metrics else None
    t_pre = time.perf_counter() - t0
    options, untried = without_trial(st.method, st.options)
    upd = ed.edit([r.to_request() for r in recs], st.method.name, **options)
    t_edit = time.perf_counter() - t0 - t_pre
    single = in_row(upd, len(recs))
    first = upd.records[0] if upd.records else {}
    norm, ratio, flag, refused = _judge_and_write(st, upd, first, single, untried)
    t1 = time.perf_counter()
    posts = [record_metrics(model, tok, r, generation=st.cfg.generation_metrics) for r in recs]
    drift = layer_drift(ed, layers)
    if len(layers) == 1:
        drift.pop("layers")
    timings = dict(first.get("timings") or {}) if single else {}
    timings.update(edit=t_edit, pre_metrics=t_pre, post_metrics=time.perf_counter() - t1)
    fingerprint = ed.fingerprint(layers)
    facts = _facts(upd, first, single, norm, ratio, flag, refused, fingerprint, drift, timings)
    rows, metrics_all = _rows(st, upd, facts, first_seq, recs, posts, pre, drift)
    stored = upd.layers if not refused and not single else []
    st.store.add_step(st.run_id, first_seq, rows, stored)
    seconds = (time.perf_counter() - t0) / len(recs)
    return [
        facts.event(first_seq + i, total, rec, metrics_all[i], seconds)
        for i, rec in enumerate(recs)
    ]


def _judge_and_write(
    st: RunState, upd: Update, first: dict[str, Any], single: bool, untried: bool
) -> tuple[float, float, str | None, bool]:
    """The step's norm, its ratio to the norm of the weights it writes (before it), why
    it is flagged (the run's norm rule, or unsafe), and whether it is refused (unsafe, or
    flagged under the run's guard). Unless refused, the step is written (the step's one
    write of each edited weight) and its probes after scored on it; a refused step's
    probes after are scored in a trial."""
    ed, cfg = st.editor, st.cfg
    # a method that states its rank-one norm in its record (ROME's float32 ‖u‖‖v‖) keeps it
    norm = float(first["update_norm"]) if single and "update_norm" in first else upd.norm
    w_norm = math.sqrt(sum(ed.weight_norm(lu) ** 2 for lu in upd.layers))
    w_norm = w_norm or weight_norm(ed, st.layers)
    reason = norm_flag(norm, st.norms, cfg)
    unsafe = upd.unsafe_reason or ed.update_unsafe_reason(upd)
    refused = unsafe or (reason if cfg.guard and reason else None)
    if refused is None:
        ed.apply_step(upd, force=True)  # the step's one write of each edited weight
        st.norms.append(norm)
        if untried:
            score_applied(ed, upd)
    elif untried:
        trial(ed, upd, lambda: None)
    ratio = norm / w_norm if w_norm else math.inf
    return norm, ratio, reason or unsafe, refused is not None


def _facts(
    upd: Update,
    first: dict[str, Any],
    single: bool,
    norm: float,
    ratio: float,
    flag: str | None,
    refused: bool,
    fingerprint: str,
    drift: dict[str, Any],
    timings: dict[str, Any],
) -> StepFacts:
    """What the step did, the same for each request; a rank-one step (``single``) keeps
    its ``u``, ``v``, denominator and cos(k*, k(s)) in its row."""
    last = upd.layers[-1]
    extra: dict[str, Any] = {
        k: first[k] for k in ("denominator", "cos_kstar_ks") if single and k in first
    }
    return StepFacts(
        method=upd.method,
        mode=upd.mode,
        layer=last.layer,
        weight_name=last.weight_name,
        update_norm=norm,
        update_norm_ratio=ratio,
        flag=flag,
        refused=refused,
        fingerprint=fingerprint,
        w_delta_norm=drift["w_delta_norm"],
        w_norm_ratio=drift["w_norm_ratio"],
        timings=timings,
        row_extra={**extra, **({"u": last.U[0], "v": last.V[:, 0]} if single else {})},
        cos_kstar_ks=extra.get("cos_kstar_ks"),
        denominator=extra.get("denominator"),
    )


def _rows(
    st: RunState,
    upd: Update,
    facts: StepFacts,
    first_seq: int,
    recs: Sequence[CounterFactRecord],
    posts: list[Any],
    pre: list[Any] | None,
    drift: dict[str, Any],
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Each request's ``edits`` row and its metrics."""
    layer_norms = {str(k): v for k, v in upd.layer_norms().items()}
    rows: list[dict[str, Any]] = []
    metrics_all = []
    for i, rec in enumerate(recs):
        metrics = posts[i].as_dict()
        metrics.update(drift)
        if pre is not None:
            metrics["pre"] = _pre(pre[i])
        record = dict(upd.records[i]) if i < len(upd.records) else {}
        record.update(
            counterfact=rec.to_dict(),
            method=upd.method,
            method_options={k: v for k, v in upd.options.items() if _jsonable(v)},
            layer_norms=layer_norms,
            batch_size=len(recs),
        )
        metrics_all.append(metrics)
        rows.append(facts.row(first_seq + i, rec, rec.to_request().to_dict(), record, metrics))
    return rows, metrics_all


def _jsonable(v: Any) -> bool:
    return isinstance(v, (str, int, float, bool, type(None), list, dict))
