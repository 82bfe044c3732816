"""One step of a batched replay: B requests edited together by a batched method.

Every request is scored just before its batch (``pre``) and just after it
(``post``); the step's per-layer update norms and the cumulative drift of
every edited layer go with each request's row, and the step is stored whole
(its rows and its factors in one transaction) or not at all.
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
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


def batch_step(
    st: _Run, first_seq: int, recs: Sequence[CounterFactRecord], total: int
) -> list[EditDone]:
    """Edit ``recs`` as one step starting at ``first_seq``; store it; one event per request."""
    ed, store, run_id, cfg, layers, norms = (
        st.editor,
        st.store,
        st.run_id,
        st.cfg,
        st.layers,
        st.norms,
    )
    t0 = time.perf_counter()
    model, tok = st.lm.model, st.lm.tokenizer
    pre = [record_metrics(model, tok, r) for r in recs] if cfg.pre_metrics else None
    t_pre = time.perf_counter() - t0
    upd: Update = ed.edit([r.to_request() for r in recs], cfg.method, **cfg.method_options)
    t_edit = time.perf_counter() - t0 - t_pre
    norm = upd.norm
    w_norm = weight_norm(ed, layers)
    reason = norm_flag(norm, norms, cfg)
    unsafe = upd.unsafe_reason or ed.update_unsafe_reason(upd)
    refused = unsafe or (reason if cfg.guard and reason else None)
    if refused is None:
        ed.apply_step(upd, force=True)
        norms.append(norm)
    t1 = time.perf_counter()
    posts = [record_metrics(model, tok, r, generation=cfg.generation_metrics) for r in recs]
    drift = layer_drift(ed, layers)
    fingerprint = ed.fingerprint(layers)
    why = reason or unsafe
    layer_norms = {str(k): v for k, v in upd.layer_norms().items()}
    timings = {"pre_metrics": t_pre, "edit": t_edit, "post_metrics": time.perf_counter() - t1}
    last = upd.layers[-1]
    ratio = norm / w_norm if w_norm else math.inf
    rows: list[dict[str, Any]] = []
    metrics_all = []
    for i, rec in enumerate(recs):
        metrics = posts[i].as_dict()
        metrics.update(drift)
        if pre is not None:
            metrics["pre"] = {k: v for k, v in pre[i].as_dict().items() if k != "generations"}
        record = dict(upd.records[i]) if i < len(upd.records) else {}
        record.update(
            counterfact=rec.to_dict(),
            method=upd.method,
            method_options={k: v for k, v in upd.options.items() if _jsonable(v)},
            layer_norms=layer_norms,
            batch_size=len(recs),
        )
        metrics_all.append(metrics)
        rows.append(
            dict(
                seq=first_seq + i,
                request=rec.to_request().to_dict(),
                mode="",
                layer=last.layer,
                weight_name=last.weight_name,
                case_id=rec.case_id,
                update_norm=norm,
                update_norm_ratio=ratio,
                record=record,
                metrics=metrics,
                timings=timings,
                flagged=why is not None,
                flag_reason=why,
                refused=refused is not None,
                applied=refused is None,
                fingerprint=fingerprint,
                method=upd.method,
            )
        )
    store.add_step(run_id, first_seq, rows, upd.layers if refused is None else [])
    seconds = (time.perf_counter() - t0) / len(recs)
    return [
        EditDone(
            seq=first_seq + i,
            total=total,
            case_id=rec.case_id,
            subject=rec.subject,
            target_new=rec.target_new,
            update_norm=norm,
            update_norm_ratio=ratio,
            metrics=metrics_all[i],
            flagged=why is not None,
            flag_reason=why,
            refused=refused is not None,
            seconds=seconds,
            w_delta_norm=drift["w_delta_norm"],
            w_norm_ratio=drift["w_norm_ratio"],
        )
        for i, rec in enumerate(recs)
    ]


def _jsonable(v: Any) -> bool:
    return isinstance(v, (str, int, float, bool, type(None), list, dict))
