"""Steps: a replay's unit of work (one edit, or one batch of a batched method).

A step is stored whole or not at all: its edit rows (one per request) and,
for a multi-layer or rank-k method, each edited layer's factors ``U`` (k × in),
``V`` (out × k) and the keys the method's carried state is rebuilt from, in
one transaction. ROME's rank-one steps keep their ``u``/``v`` in the edit row
as before, so databases written before steps existed read and resume as they did.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Required, TypedDict, Unpack

import torch

from .codec import FACTOR_KEYS, dumps, jsonable, now, opt_float, opt_int, pack_factors
from .connection import StoreBase
from .errors import DuplicateEditError, InvalidFieldError, MissingFactorsError
from .records import Edit


class EditFields(TypedDict, total=False):
    """The fields of one stored edit besides its run and seq: the one signature of
    :meth:`Store.add_edit`, :func:`edit_row` and each edit of :meth:`add_step`."""

    request: Required[Any]  # a dict or an EditRequest-like object
    mode: Required[str]
    layer: Required[int]
    weight_name: Required[str]
    u: torch.Tensor | None  # ROME's factors, kept in the row (both or neither)
    v: torch.Tensor | None
    case_id: int | None
    update_norm: float | None
    update_norm_ratio: float | None
    denominator: float | None
    cos_kstar_ks: float | None
    record: Any  # the engine's result or its dict; top-level factor keys dropped
    metrics: Mapping[str, Any] | None
    timings: Mapping[str, Any] | None
    flagged: bool  # default False
    flag_reason: str | None
    refused: bool  # default False; a refused edit was not applied
    applied: bool  # default True
    fingerprint: str | None
    step: int | None  # None: its own seq
    method: str | None  # None: rome


def edit_row(run_id: str, seq: int, **f: Unpack[EditFields]) -> dict[str, Any]:
    """The ``edits`` row of one request (see :class:`EditFields` for the fields)."""
    refused, applied = f.get("refused", False), f.get("applied", True)
    if refused and applied:
        raise InvalidFieldError("a refused edit was not applied: pass applied=False")
    u, v = f.get("u"), f.get("v")
    if (u is None) != (v is None):
        raise InvalidFieldError("pass both factors u and v, or neither")
    seq = int(seq)
    if seq < 0:
        raise InvalidFieldError(f"seq must be >= 0, not {seq}")
    record = f.get("record")
    rec = jsonable(record) if record is not None else {}
    if isinstance(rec, dict):
        rec = {k: val for k, val in rec.items() if k not in FACTOR_KEYS}
    layer, weight_name = f["layer"], f["weight_name"]
    blob = None
    if u is not None and v is not None:
        meta = {"run_id": run_id, "seq": str(seq), "layer": str(layer)}
        blob = pack_factors(u, v, {**meta, "weight_name": weight_name})
    return {
        "run_id": run_id,
        "seq": seq,
        "request": dumps(f["request"]),
        "mode": str(f["mode"]),
        "layer": int(layer),
        "weight_name": str(weight_name),
        "factors": blob,
        "case_id": opt_int(f.get("case_id")),
        "update_norm": opt_float(f.get("update_norm")),
        "update_norm_ratio": opt_float(f.get("update_norm_ratio")),
        "denominator": opt_float(f.get("denominator")),
        "cos_kstar_ks": opt_float(f.get("cos_kstar_ks")),
        "record": dumps(rec),
        "metrics": dumps(dict(f.get("metrics") or {})),
        "timings": dumps(dict(f.get("timings") or {})),
        "flagged": bool(f.get("flagged", False)),
        "flag_reason": f.get("flag_reason"),
        "refused": bool(refused),
        "applied": bool(applied),
        "fingerprint": f.get("fingerprint"),
        "created_at": now(),
        "step": opt_int(f.get("step")),
        "method": f.get("method"),
    }


@dataclass
class StoredLayer:
    """One layer's factors of a stored step (ΔW = V @ U, (out, in))."""

    layer: int
    weight_name: str
    U: torch.Tensor
    V: torch.Tensor
    keys: torch.Tensor | None


@dataclass
class StoredStep:
    """A stored step: its edit rows (seq order) and, per edited layer, its factors."""

    step: int
    method: str
    edits: list[Edit]
    layers: list[StoredLayer]


def pack_layer(
    U: torch.Tensor, V: torch.Tensor, keys: torch.Tensor | None, meta: dict[str, str]
) -> bytes:
    import safetensors.torch

    tensors = {
        "U": U.detach().to("cpu").contiguous().clone(),
        "V": V.detach().to("cpu").contiguous().clone(),
    }
    if keys is not None:
        tensors["keys"] = keys.detach().to("cpu").contiguous().clone()
    return safetensors.torch.save(tensors, metadata=meta)


def unpack_layer(blob: bytes) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    import safetensors.torch

    t = safetensors.torch.load(bytes(blob))
    return t["U"], t["V"], t.get("keys")


class StepTables(StoreBase):
    """Writing a step whole and reading a run back as steps."""

    def add_step(
        self, run_id: str, step: int, edits: Sequence[Mapping[str, Any]], layers: Sequence[Any]
    ) -> None:
        """Store a step whole, in one transaction: its edits (each a mapping of
        :meth:`Store.add_edit`'s keyword arguments, with ``seq``) and its layers (objects
        with ``layer``, ``weight_name``, ``U``, ``V``, ``keys``, ``norm``)."""
        if not edits:
            raise InvalidFieldError("a step holds at least one edit")
        rows = [edit_row(run_id, **e) for e in edits]
        self._require_run(run_id)  # type: ignore[attr-defined]
        self._check_writable(run_id)  # type: ignore[attr-defined]
        stamp = now()
        with self._write() as conn:
            for row in rows:
                try:
                    self._insert(conn, "edits", {**row, "step": int(step), "created_at": stamp})
                except sqlite3.IntegrityError as exc:
                    if "UNIQUE" not in str(exc):
                        raise
                    raise DuplicateEditError(run_id, row["seq"], -1) from exc
            for lu in layers:
                meta = {"run_id": run_id, "step": str(step), "layer": str(lu.layer)}
                self._insert(
                    conn,
                    "step_factors",
                    {
                        "run_id": run_id,
                        "step": int(step),
                        "layer": int(lu.layer),
                        "weight_name": str(lu.weight_name),
                        "factors": pack_layer(lu.U, lu.V, lu.keys, meta),
                        "update_norm": opt_float(lu.norm),
                        "created_at": stamp,
                    },
                )
            self._update(conn, "runs", {"id": run_id}, {"updated_at": stamp})

    def step_layers(self, run_id: str, step: int) -> list[StoredLayer]:
        """A step's stored per-layer factors, ascending layer (empty for a ROME step)."""
        with self._op():
            rows = self._conn.execute(
                "SELECT layer, weight_name, factors FROM step_factors "
                "WHERE run_id = ? AND step = ? ORDER BY layer",
                (run_id, int(step)),
            ).fetchall()
        out = []
        for layer, name, blob in rows:
            U, V, keys = unpack_layer(blob)
            out.append(StoredLayer(int(layer), str(name), U, V, keys))
        return out

    def iter_steps(self, run_id: str, *, applied_only: bool = True) -> Iterator[StoredStep]:
        """The run's steps in order, each with the factors a resume re-applies.

        A ROME step's rank-one ``u``/``v`` (kept in its edit row) come back as a
        one-layer ``U`` (1 × in), ``V`` (out × 1). Raises MissingFactorsError on a gap.
        """
        edits = self.edits(run_id, applied_only=applied_only)  # type: ignore[attr-defined]
        groups: dict[int, list[Edit]] = {}
        for e in edits:
            groups.setdefault(e.step_index, []).append(e)
        for step in sorted(groups):
            members = groups[step]
            layers = self.step_layers(run_id, step)
            if not layers:
                first = members[0]
                if not first.has_factors:
                    raise MissingFactorsError(run_id, first.seq)
                u, v = self.load_factors(first)  # type: ignore[attr-defined]
                layers = [StoredLayer(first.layer, first.weight_name, u[None, :], v[:, None], None)]
            yield StoredStep(step, members[0].method_name, members, layers)


__all__ = ["EditFields", "StepTables", "StoredLayer", "StoredStep", "edit_row"]
