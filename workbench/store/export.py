"""Exporting a run: the whole run as JSON, or one CSV row per edit."""

from __future__ import annotations

import contextlib
import csv
import dataclasses
import io
import json
import math
import os
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from .codec import nan_to_none
from .records import Checkpoint, Edit, Generation, Run

#: where each evaluation protocol's figures are in an export (the names of
#: ``evals.protocols``; the store does not import evals)
PROTOCOL_FIELDS = {
    "immediate": "edits[].metrics (scored right after the edit; .pre: just before it); "
    "CSV columns metric.*",
    "end of stream": "rescore[].metrics (re-scored on the final model); CSV columns rescore.*",
    "retention": "checkpoints[] with task 'retention' (the first M edits re-scored at "
    "each checkpoint: value = fraction holding, extra = ES/PS/NS/S, n_hold, m, lost)",
}


def run_json(
    schema_version: int,
    run: Run,
    edits: Sequence[Edit],
    checkpoints: Sequence[Checkpoint],
    generations: Sequence[Generation],
    rescores: Mapping[int, Mapping[str, Any]],
) -> str:
    """The JSON document of a run (factors left out, NaN written as null)."""
    doc = {
        "schema_version": schema_version,
        "protocols": PROTOCOL_FIELDS,
        "run": dataclasses.asdict(run),
        "edits": [dataclasses.asdict(e) for e in edits],
        "checkpoints": [dataclasses.asdict(c) for c in checkpoints],
        "generations": [dataclasses.asdict(g) for g in generations],
        "rescore": [{"seq": s, "metrics": m} for s, m in sorted(rescores.items())],
    }
    return json.dumps(nan_to_none(doc), indent=2, allow_nan=False)


def _flat_scalars(d: Mapping[str, Any], prefix: str) -> dict[str, Any]:
    """Scalars of ``d`` (one level of nested dicts as ``a.b``) under ``prefix``."""
    out: dict[str, Any] = {}
    for k, v in d.items():
        if isinstance(v, Mapping):
            for k2, v2 in v.items():
                if v2 is None or isinstance(v2, (bool, int, float, str)):
                    out[f"{prefix}{k}.{k2}"] = v2
        elif v is None or isinstance(v, (bool, int, float, str)):
            out[f"{prefix}{k}"] = v
    return out


_CSV_BASE_COLUMNS = [
    "run_id",
    "seq",
    "step",
    "method",
    "case_id",
    "subject",
    "prompt",
    "target_new",
    "target_true",
    "mode",
    "layer",
    "weight_name",
    "update_norm",
    "update_norm_ratio",
    "denominator",
    "cos_kstar_ks",
    "flagged",
    "flag_reason",
    "refused",
    "applied",
    "fingerprint",
    "created_at",
]


def edits_csv(edits: Sequence[Edit], rescores: Mapping[int, Mapping[str, Any]]) -> str:
    """One CSV row per edit: the main figures, ``metric.*`` and ``rescore.*`` columns."""
    rows: list[dict[str, Any]] = []
    extra_cols: dict[str, None] = {}
    for e in edits:
        row: dict[str, Any] = {
            "run_id": e.run_id,
            "seq": e.seq,
            "step": e.step_index,  # the first seq of the step the edit belongs to
            "method": e.method_name,
            "case_id": e.case_id,
            "subject": e.request.get("subject"),
            "prompt": e.request.get("prompt"),
            "target_new": e.request.get("target_new"),
            "target_true": e.request.get("target_true"),
            "mode": e.mode,
            "layer": e.layer,
            "weight_name": e.weight_name,
            "update_norm": e.update_norm,
            "update_norm_ratio": e.update_norm_ratio,
            "denominator": e.denominator,
            "cos_kstar_ks": e.cos_kstar_ks,
            "flagged": int(e.flagged),
            "flag_reason": e.flag_reason,
            "refused": int(e.refused),
            "applied": int(e.applied),
            "fingerprint": e.fingerprint,
            "created_at": e.created_at,
        }
        extra = _flat_scalars(e.metrics, "metric.")
        extra.update(_flat_scalars(rescores.get(e.seq, {}), "rescore."))
        for k in extra:
            extra_cols.setdefault(k, None)
        row.update(extra)
        rows.append(row)
    metric_cols = sorted(c for c in extra_cols if c.startswith("metric."))
    rescore_cols = sorted(c for c in extra_cols if c.startswith("rescore."))
    buf = io.StringIO()
    writer = csv.DictWriter(
        buf, fieldnames=_CSV_BASE_COLUMNS + metric_cols + rescore_cols, lineterminator="\n"
    )
    writer.writeheader()
    for row in rows:
        for k, v in row.items():
            if isinstance(v, float) and not math.isfinite(v):
                row[k] = ""
        writer.writerow(row)
    return buf.getvalue()


def atomic_write(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` through a temporary file and a rename."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8", newline="") as fh:
            fh.write(text)
        mask = os.umask(0o022)  # mkstemp's file is 0600: give it the umask's mode
        os.umask(mask)
        os.chmod(tmp, 0o666 & ~mask)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
