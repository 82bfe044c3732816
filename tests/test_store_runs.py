"""The SQLite store, on real database files in tmp_path: runs, their edits and factors,
checkpoints, generations and re-scoring."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from store_helpers import REQ, _add

from workbench.store import (
    AmbiguousRunError,
    DuplicateCheckpointError,
    DuplicateEditError,
    InvalidFieldError,
    MissingFactorsError,
    Store,
    StoreError,
    UnknownEditError,
    UnknownRunError,
)

# ----------------------------------------------------------------------------- runs


def test_create_and_get_run(store: Store):
    run = store.create_run(
        model="smollm2-135m",
        mode="rrome",
        preset="smollm2-135m",
        hparams={"layer": 5, "v_lr": 0.5},
        data_source="bundled sample",
        n_edits_planned=100,
        glue_every=20,
        glue_tasks=["sst2", "rte"],
        glue_limit=50,
        guard=True,
        base_fingerprint="abc",
    )
    assert len(run.id) == 8 and run.status == "running" and run.kind == "replay"
    got = store.get_run(run.id)
    assert got == run
    assert got.hparams == {"layer": 5, "v_lr": 0.5}
    assert got.glue_tasks == ["sst2", "rte"] and got.guard is True
    assert got.label == f"{run.id} rrome"
    assert store.get_run(run.id[:5]).id == run.id  # unique prefix

    other = store.create_run(model="gpt2-xl", mode="original", kind="session")
    assert [r.id for r in store.list_runs(model="smollm2-135m")] == [run.id]
    assert {r.id for r in store.list_runs()} == {run.id, other.id}
    assert [r.id for r in store.list_runs(kind="session")] == [other.id]


def test_run_label_names_the_stabilisers(store: Store):
    hp = {"hparams": {"v_norm_anchor": True, "v_stop": "most_probable"}, "replay": {}}
    run = store.create_run(model="m", mode="rrome", hparams=hp)
    assert run.label == f"{run.id} rrome + norm anchor + MPES"
    plain = store.create_run(model="m", mode="rrome", hparams={"hparams": {"v_stop": "loss"}})
    assert plain.label == f"{plain.id} rrome"


def test_run_fields_validated(store: Store):
    with pytest.raises(InvalidFieldError):
        store.create_run(model="m", kind="batch")  # type: ignore[arg-type]
    run = store.create_run(model="m", run_id="my-run")
    with pytest.raises(InvalidFieldError):
        store.create_run(model="m", run_id="my-run")
    with pytest.raises(InvalidFieldError):
        store.set_status(run.id, "done")  # type: ignore[arg-type]
    store.set_status(run.id, "failed", error="CUDA out of memory")
    got = store.get_run(run.id)
    assert got.status == "failed" and got.error == "CUDA out of memory"
    assert store.update_run(run.id, notes="first try").notes == "first try"
    with pytest.raises(InvalidFieldError):
        store.update_run(run.id, status="finished")


def test_ambiguous_prefix(store: Store):
    store.create_run(model="m", run_id="abcd0001")
    store.create_run(model="m", run_id="abcd0002")
    with pytest.raises(AmbiguousRunError, match="abcd"):
        store.get_run("abcd")
    assert store.get_run("abcd0002").id == "abcd0002"


def test_unknown_run(store: Store, db_path: Path):
    with pytest.raises(UnknownRunError) as exc:
        store.get_run("nope1234")
    msg = str(exc.value)
    assert "nope1234" in msg and str(db_path) in msg and "\n" not in msg
    assert isinstance(exc.value, StoreError)
    with pytest.raises(UnknownRunError):
        _add(store, "nope1234", 0)
    with pytest.raises(UnknownRunError):
        store.acquire_writer("nope1234")


# ---------------------------------------------------------------------------- edits


def test_add_edits_ordered(store: Store):
    run = store.create_run(model="m", mode="rrome")
    for seq in (2, 0, 1):
        _add(
            store,
            run.id,
            seq,
            case_id=100 + seq,
            update_norm=10.0 * (seq + 1),
            update_norm_ratio=0.1,
            denominator=0.38,
            cos_kstar_ks=0.15,
            record={"u": [1.0, 2.0], "v": [3.0], "efficacy": {"bare": 0.9}},
            metrics={"ES": 1.0, "PS": 0.5},
            timings={"vstar_s": 1.5},
            fingerprint=f"fp{seq}",
        )
    edits = store.edits(run.id)
    assert [e.seq for e in edits] == [0, 1, 2]
    e = edits[1]
    assert e.case_id == 101 and e.request == REQ and e.layer == 5 and e.weight_name == "w.5"
    assert e.record == {"efficacy": {"bare": 0.9}}  # factors never go into the JSON record
    assert e.metrics == {"ES": 1.0, "PS": 0.5} and e.timings == {"vstar_s": 1.5}
    assert e.applied and not e.refused and not e.flagged and e.has_factors
    assert store.next_seq(run.id) == 3
    assert store.last_edit(run.id).fingerprint == "fp2"
    assert store.get_run(run.id).n_edits == 3
    assert [x.seq for x in store.edits(run.id, since_seq=1)] == [1, 2]


def test_duplicate_edit_rejected(store: Store):
    run = store.create_run(model="m")
    _add(store, run.id, 0, metrics={"ES": 1.0})
    with pytest.raises(DuplicateEditError, match="seq 0") as exc:
        _add(store, run.id, 0, metrics={"ES": 0.0})
    assert exc.value.next_seq == 1
    edits = store.edits(run.id)
    assert len(edits) == 1 and edits[0].metrics == {"ES": 1.0}
    _add(store, run.id, 1)  # the store is still usable
    assert store.next_seq(run.id) == 2


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64])
def test_factors_round_trip_bit_identical(store: Store, dtype: torch.dtype):
    run = store.create_run(model="m")
    u = torch.randn(1536, dtype=torch.float64).to(dtype)
    base = torch.randn(4, 576, dtype=torch.float64).to(dtype)
    v = base.t()[:, 1]  # a non-contiguous view
    u.requires_grad_(dtype.is_floating_point)
    edit = _add(store, run.id, 0, u=u, v=v)
    u2, v2 = store.load_factors(edit)
    assert u2.dtype == dtype and v2.dtype == dtype
    assert u2.shape == u.shape and v2.shape == v.shape
    assert torch.equal(u2.view(torch.uint8), u.detach().contiguous().view(torch.uint8))
    assert torch.equal(v2.contiguous().view(torch.uint8), v.contiguous().view(torch.uint8))


def test_undo_and_iter_factors(store: Store):
    run = store.create_run(model="m", kind="session")
    for seq in range(3):
        _add(store, run.id, seq)
    store.mark_undone(run.id, 1)
    assert [e.applied for e in store.edits(run.id)] == [True, False, True]
    seqs = [e.seq for e, _, _ in store.iter_factors(run.id)]
    assert seqs == [0, 2]
    u0, _ = store.load_factors(store.edit(run.id, 0))
    first = next(iter(store.iter_factors(run.id)))
    assert torch.equal(first[1], u0)
    store.set_applied(run.id, 1, True)
    assert [e.seq for e, _, _ in store.iter_factors(run.id)] == [0, 1, 2]
    with pytest.raises(UnknownEditError):
        store.mark_undone(run.id, 9)


def test_refused_and_missing_factors(store: Store):
    run = store.create_run(model="m")
    with pytest.raises(InvalidFieldError, match="applied=False"):
        _add(store, run.id, 0, refused=True)
    e = _add(store, run.id, 0, refused=True, applied=False, u=None, v=None)
    assert e.refused and not e.applied and not e.has_factors
    with pytest.raises(MissingFactorsError):
        store.load_factors(e)
    # a refused edit is not re-applied on resume
    assert list(store.iter_factors(run.id)) == []
    with pytest.raises(InvalidFieldError):
        _add(store, run.id, 1, v=None)


def test_flag_and_update_edit(store: Store):
    run = store.create_run(model="m")
    _add(store, run.id, 0, update_norm=3.0)
    e = store.flag_edit(run.id, 0, "norm 40x the running median")
    assert e.flagged and e.flag_reason == "norm 40x the running median"
    assert store.get_run(run.id).n_flagged == 1
    e = store.update_edit(run.id, 0, metrics={"ES": 0.0})
    assert e.metrics == {"ES": 0.0} and e.flagged


@dataclass
class _FakeRequest:
    prompt: str
    subject: str
    target_new: str
    target_true: str | None = None

    def to_dict(self) -> dict:
        return dict(vars(self))


@dataclass
class _FakeResult:
    """Shaped like rome.result.EditResult (duck-typed, so engine changes don't break this)."""

    request: _FakeRequest
    mode: str
    layer: int
    weight_name: str
    u: torch.Tensor
    v: torch.Tensor
    update_norm: float
    denominator: float
    cos_kstar_ks: float
    timings: dict

    @property
    def update_norm_ratio(self) -> float:
        return self.update_norm / 100.0

    def to_dict(self, factors: bool = True) -> dict:
        out = {"request": self.request.to_dict(), "mode": self.mode, "p_new_after": 0.9}
        if factors:
            out["u"] = self.u.tolist()
            out["v"] = self.v.tolist()
        return out


def test_add_edit_result(store: Store):
    run = store.create_run(model="m", mode="original")
    res = _FakeResult(
        _FakeRequest(**REQ),
        "original",
        5,
        "w.5",
        torch.randn(8),
        torch.randn(6),
        254.0,
        0.38,
        0.15,
        {"vstar_s": 2.0},
    )
    e = store.add_edit_result(run.id, 0, res, case_id=7, metrics={"ES": 1.0}, fingerprint="f")
    assert e.request == REQ and e.mode == "original" and e.layer == 5 and e.case_id == 7
    assert e.update_norm == 254.0 and e.update_norm_ratio == 2.54 and e.cos_kstar_ks == 0.15
    assert e.record == {"request": REQ, "mode": "original", "p_new_after": 0.9}
    assert e.timings == {"vstar_s": 2.0} and e.fingerprint == "f"
    u, v = store.load_factors(e)
    assert torch.equal(u, res.u) and torch.equal(v, res.v)


def test_json_of_numpy_and_tensor_scalars(store: Store):
    import numpy as np

    run = store.create_run(model="m", hparams={"lr": np.float32(0.5), "layers": (5,)})
    assert store.get_run(run.id).hparams == {"lr": 0.5, "layers": [5]}
    e = _add(store, run.id, 0, metrics={"ES": torch.tensor(1.0), "n": np.int64(3)})
    assert e.metrics == {"ES": 1.0, "n": 3}
    with pytest.raises(InvalidFieldError, match="u= and v="):
        _add(store, run.id, 1, record={"delta": torch.zeros(10, 10)})


# ------------------------------------------------------------ checkpoints & friends


def test_checkpoints_generations_rescore(store: Store):
    run = store.create_run(model="m")
    store.add_checkpoint(run.id, 0, "sst2", accuracy=0.9, f1=0.88, mcc=0.8, invalid=0, n=100)
    store.add_checkpoint(run.id, 0, "rte", accuracy=0.6, n=50)
    store.add_fluency(run.id, 0, 5.5)
    store.add_checkpoint(run.id, 20, "sst2", accuracy=0.7, extra={"protocol": "logprob"})
    with pytest.raises(DuplicateCheckpointError, match="replace=True"):
        store.add_checkpoint(run.id, 20, "sst2", accuracy=0.1)
    store.add_checkpoint(run.id, 20, "sst2", accuracy=0.65, replace=True)
    cps = store.checkpoints(run.id)
    assert [(c.step, c.task) for c in cps] == [
        (0, "fluency"),
        (0, "rte"),
        (0, "sst2"),
        (20, "sst2"),
    ]
    assert cps[0].value == 5.5 and cps[2].f1 == 0.88 and cps[3].accuracy == 0.65
    assert [c.accuracy for c in store.checkpoints(run.id, task="sst2")] == [0.9, 0.65]

    store.add_generation(run.id, 0, "Hamlet was written by", "Shakespeare", "Dickens")
    gens = store.generations(run.id)
    assert len(gens) == 1 and gens[0].after == "Dickens" and gens[0].edit_seq == 0

    store.add_rescore(run.id, 0, {"ES": 0.0})
    store.add_rescore(run.id, 0, {"ES": 1.0})  # replaces
    assert [(r.seq, r.metrics) for r in store.rescores(run.id)] == [(0, {"ES": 1.0})]
