"""One step of a replay: one ROME edit, or B requests edited together by a batched method.

Both are stored the same way, through the sink's ``add_step``: one row per
request (built by :class:`StepFacts`) and, for a batched method, the step's
per-layer factors (ROME keeps its ``u``, ``v`` in the row). Every request is
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
from typing import TYPE_CHECKING, Any

from rome import Editor
from rome.methods import Update

from .counterfact import CounterFactRecord
from .events import EditDone
from .flags import norm_flag
from .metrics import record_metrics

if TYPE_CHECKING:
    from .replay import _Run


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
    # rome keeps u, v, the denominator and cos(k*, k(s)) in the row; its event shows the last two
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


def rome_step(st: _Run, seq: int, rec: CounterFactRecord, total: int) -> list[EditDone]:
    """Edit ``rec`` with ROME in the run's key mode; store it (u, v in its row); one event."""
    t0 = time.perf_counter()
    cfg, ed = st.cfg, st.editor
    model, tok = st.lm.model, st.lm.tokenizer
    pre = record_metrics(model, tok, rec) if cfg.pre_metrics else None
    t_pre = time.perf_counter() - t0
    result = ed.compute(rec.to_request(), cfg.mode, st.layer)
    reason = norm_flag(result.update_norm, st.norms, cfg)
    refused = result.unsafe_reason or (reason if cfg.guard and reason else None)
    if refused is None:
        ed.apply(result)
        st.norms.append(result.update_norm)
    t1 = time.perf_counter()
    post = record_metrics(model, tok, rec, generation=cfg.generation_metrics)
    w_delta, w_ratio = ed.drift(st.layer)
    metrics = post.as_dict()
    metrics.update(w_delta_norm=w_delta, w_norm_ratio=w_ratio)
    if pre is not None:
        metrics["pre"] = _pre(pre)
    timings = dict(result.timings)
    timings.update(pre_metrics=t_pre, post_metrics=time.perf_counter() - t1)
    record = result.to_dict(factors=False)
    record["counterfact"] = rec.to_dict()
    facts = StepFacts(
        method="rome",
        mode=result.mode,
        layer=result.layer,
        weight_name=result.weight_name,
        update_norm=result.update_norm,
        update_norm_ratio=result.update_norm_ratio,
        flag=reason or result.unsafe_reason,
        refused=refused is not None,
        fingerprint=ed.fingerprint([st.layer]),
        w_delta_norm=w_delta,
        w_norm_ratio=w_ratio,
        timings=timings,
        row_extra=dict(
            u=result.u,
            v=result.v,
            denominator=result.denominator,
            cos_kstar_ks=result.cos_kstar_ks,
        ),
        cos_kstar_ks=result.cos_kstar_ks,
        denominator=result.denominator,
    )
    st.store.add_step(st.run_id, seq, [facts.row(seq, rec, result.request, record, metrics)], [])
    return [facts.event(seq, total, rec, metrics, time.perf_counter() - t0)]


def batch_step(
    st: _Run, first_seq: int, recs: Sequence[CounterFactRecord], total: int
) -> list[EditDone]:
    """Edit ``recs`` as one step starting at ``first_seq``; store it; one event per request."""
    ed, cfg, layers, norms = st.editor, st.cfg, st.layers, st.norms
    t0 = time.perf_counter()
    model, tok = st.lm.model, st.lm.tokenizer
    pre = [record_metrics(model, tok, r) for r in recs] if cfg.pre_metrics else None
    t_pre = time.perf_counter() - t0
    upd: Update = ed.edit([r.to_request() for r in recs], cfg.method, **cfg.method_options)
    t_edit = time.perf_counter() - t0 - t_pre
    norm = upd.norm
    w_norm = math.sqrt(sum(ed.weight_norm(lu) ** 2 for lu in upd.layers)) or weight_norm(ed, layers)
    reason = norm_flag(norm, norms, cfg)
    unsafe = upd.unsafe_reason or ed.update_unsafe_reason(upd)
    refused = unsafe or (reason if cfg.guard and reason else None)
    if refused is None:
        ed.apply_step(upd, force=True)
        norms.append(norm)
    t1 = time.perf_counter()
    posts = [record_metrics(model, tok, r, generation=cfg.generation_metrics) for r in recs]
    drift = layer_drift(ed, layers)
    layer_norms = {str(k): v for k, v in upd.layer_norms().items()}
    last = upd.layers[-1]
    facts = StepFacts(
        method=upd.method,
        mode="",
        layer=last.layer,
        weight_name=last.weight_name,
        update_norm=norm,
        update_norm_ratio=norm / w_norm if w_norm else math.inf,
        flag=reason or unsafe,
        refused=refused is not None,
        fingerprint=ed.fingerprint(layers),
        w_delta_norm=drift["w_delta_norm"],
        w_norm_ratio=drift["w_norm_ratio"],
        timings={"pre_metrics": t_pre, "edit": t_edit, "post_metrics": time.perf_counter() - t1},
    )
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
    st.store.add_step(st.run_id, first_seq, rows, upd.layers if refused is None else [])
    seconds = (time.perf_counter() - t0) / len(recs)
    return [
        facts.event(first_seq + i, total, rec, metrics_all[i], seconds)
        for i, rec in enumerate(recs)
    ]


def _jsonable(v: Any) -> bool:
    return isinstance(v, (str, int, float, bool, type(None), list, dict))
