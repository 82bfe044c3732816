"""The SQLite store, on real database files in tmp_path."""

from __future__ import annotations

import csv
import json
import os
import signal
import sqlite3
import subprocess
import sys
import textwrap
import threading
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

from workbench import store as store_mod
from workbench.store import (
    MIGRATIONS,
    SCHEMA_VERSION,
    AmbiguousRunError,
    CorruptDatabaseError,
    DatabaseLockedError,
    DuplicateCheckpointError,
    DuplicateEditError,
    ForeignDatabaseError,
    InvalidFieldError,
    MissingFactorsError,
    RunLockedError,
    SchemaTooNewError,
    Store,
    StoreClosedError,
    StoreError,
    StoreNotFoundError,
    UnknownEditError,
    UnknownRunError,
    default_db_path,
)

REPO = Path(__file__).resolve().parents[1]

REQ = {
    "prompt": "{} is located in the city of",
    "subject": "The Eiffel Tower",
    "target_new": "Rome",
    "target_true": "Paris",
}


@pytest.fixture
def db_path(tmp_path: Path) -> Path:
    return tmp_path / "wb.db"


@pytest.fixture
def store(db_path: Path):
    with Store.open(db_path) as s:
        yield s


def _add(store: Store, run_id: str, seq: int, **kw):
    gen = torch.Generator().manual_seed(seq)
    u = kw.pop("u", torch.randn(8, generator=gen))
    v = kw.pop("v", torch.randn(6, generator=gen))
    args = dict(request=REQ, mode="rrome", layer=5, weight_name="w.5", u=u, v=v)
    args.update(kw)
    return store.add_edit(run_id, seq, **args)


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


# ------------------------------------------------------------------ schema & errors


def test_fresh_and_empty_file_get_latest_schema(tmp_path: Path):
    empty = tmp_path / "empty.db"
    empty.write_bytes(b"")
    for path in (tmp_path / "sub" / "new.db", empty):
        with Store.open(path) as s:
            assert s.schema_version() == SCHEMA_VERSION == len(MIGRATIONS)
            assert s.integrity_ok()
            mode = s.db.execute("PRAGMA journal_mode").fetchone()[0]
            assert mode == "wal"


def test_migrates_older_schema_keeping_data(db_path: Path):
    conn = sqlite3.connect(db_path)
    with conn:
        MIGRATIONS[0](conn)
        conn.execute("INSERT INTO meta(key, value) VALUES ('schema_version', '1')")
        conn.execute(
            "INSERT INTO runs(id, kind, model, mode, status, created_at, updated_at) "
            "VALUES ('old00001', 'replay', 'gpt2-xl', 'original', 'finished', 't', 't')"
        )
        conn.execute(
            "INSERT INTO edits(run_id, seq, request, mode, layer, weight_name, created_at) "
            "VALUES ('old00001', 0, ?, 'original', 17, 'w', 't')",
            (json.dumps(REQ),),
        )
        conn.execute(
            "INSERT INTO checkpoints(run_id, step, task, accuracy, created_at) "
            "VALUES ('old00001', 0, 'sst2', 0.9, 't')"
        )
    conn.close()

    with Store.open(db_path) as s:
        assert s.schema_version() == SCHEMA_VERSION
        run = s.get_run("old00001")
        assert run.model == "gpt2-xl" and run.n_edits == 1
        assert s.edits(run.id)[0].request == REQ
        (cp,) = s.checkpoints(run.id)
        assert cp.accuracy == 0.9 and cp.value is None and cp.extra == {}
        s.add_fluency(run.id, 0, 4.2)  # columns and tables from migration 2 work
        s.add_rescore(run.id, 0, {"ES": 1.0})
        assert s.integrity_ok()


def test_newer_schema_is_refused(db_path: Path):
    with Store.open(db_path) as s:
        s.create_run(model="m")
    conn = sqlite3.connect(db_path)
    with conn:
        conn.execute("UPDATE meta SET value = '99' WHERE key = 'schema_version'")
    conn.close()
    with pytest.raises(SchemaTooNewError, match="upgrade rome-workbench") as exc:
        Store.open(db_path)
    assert exc.value.found == 99 and exc.value.known == SCHEMA_VERSION


def test_corrupt_file(tmp_path: Path):
    bad = tmp_path / "bad.db"
    bad.write_bytes(b"this is not sqlite at all\n" * 200)
    with pytest.raises(CorruptDatabaseError) as exc:
        Store.open(bad)
    assert str(bad) in str(exc.value) and "ROME_WORKBENCH_DB" in str(exc.value)
    assert bad.read_bytes().startswith(b"this is not sqlite")  # untouched


def test_foreign_database(tmp_path: Path):
    other = tmp_path / "other.db"
    conn = sqlite3.connect(other)
    with conn:
        conn.execute("CREATE TABLE foo (x)")
    conn.close()
    with pytest.raises(ForeignDatabaseError):
        Store.open(other)


def test_missing_file_without_create(tmp_path: Path):
    with pytest.raises(StoreNotFoundError):
        Store.open(tmp_path / "nope.db", create=False)
    assert not (tmp_path / "nope.db").exists()


def test_closed_store(db_path: Path):
    s = Store.open(db_path)
    run = s.create_run(model="m")
    s.close()
    s.close()  # idempotent
    assert s.closed
    with pytest.raises(StoreClosedError, match="open it again"):
        s.list_runs()
    with pytest.raises(StoreClosedError):
        _add(s, run.id, 0)
    with Store.open(db_path) as s2:  # nothing written was lost
        assert s2.get_run(run.id).id == run.id


def test_database_locked_by_another_connection(db_path: Path):
    with Store.open(db_path, busy_timeout=0.2) as s:
        run = s.create_run(model="m")
        _add(s, run.id, 0)
        other = sqlite3.connect(db_path, isolation_level=None)
        other.execute("BEGIN IMMEDIATE")
        other.execute("INSERT INTO meta(key, value) VALUES ('x', 'y')")
        try:
            with pytest.raises(DatabaseLockedError, match="locked") as exc:
                _add(s, run.id, 1)
            assert "\n" not in str(exc.value)
        finally:
            other.execute("ROLLBACK")
            other.close()
        assert [e.seq for e in s.edits(run.id)] == [0]
        _add(s, run.id, 1)  # usable again once the other writer is gone
        assert s.next_seq(run.id) == 2


def test_threads_share_a_store(store: Store):
    run = store.create_run(model="m")
    errors: list[BaseException] = []

    def work(k: int) -> None:
        try:
            for i in range(10):
                store.add_checkpoint(run.id, k * 100 + i, "sst2", accuracy=0.5)
                store.list_runs()
        except BaseException as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(k,)) for k in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    assert len(store.checkpoints(run.id)) == 40


# -------------------------------------------------------------------- writer lock

_HOLDER = textwrap.dedent(
    """
    import sys, time
    from workbench.store import Store
    s = Store.open(sys.argv[1])
    lease = s.acquire_writer(sys.argv[2])
    print("LOCKED", flush=True)
    time.sleep(120)
    """
)


def _spawn_holder(db_path: Path, run_id: str) -> subprocess.Popen:
    env = dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.Popen(
        [sys.executable, "-c", _HOLDER, str(db_path), run_id],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )
    line = proc.stdout.readline()
    if line.strip() != "LOCKED":
        proc.kill()
        raise AssertionError(f"holder failed: {line!r} {proc.stderr.read()}")
    return proc


def test_second_writer_gets_run_locked_error_and_dead_lock_is_taken_over(db_path: Path):
    with Store.open(db_path) as s:
        run = s.create_run(model="m")
    proc = _spawn_holder(db_path, run.id)
    try:
        with Store.open(db_path) as s:
            with pytest.raises(RunLockedError) as exc:
                s.acquire_writer(run.id, wait_s=0.2)
            assert f"pid {proc.pid}" in str(exc.value) and exc.value.pid == proc.pid
            assert s.writer_info(run.id).pid == proc.pid
            # writes without the lease are refused too, and nothing is written
            with pytest.raises(RunLockedError):
                _add(s, run.id, 0)
            assert s.edits(run.id) == []
            # other runs are not affected
            other = s.create_run(model="m")
            with s.acquire_writer(other.id):
                _add(s, other.id, 0)
            # stale-run recovery leaves a run with a live writer alone
            assert run.id not in s.recover_stale_runs(min_age_s=0)

            os.kill(proc.pid, signal.SIGKILL)
            proc.wait(timeout=10)
            assert s.lock_path(run.id).exists()  # the dead process left its file
            assert s.writer_info(run.id) is None
            assert s.recover_stale_runs(min_age_s=0) == [run.id]
            assert s.get_run(run.id).status == "interrupted"
            with s.acquire_writer(run.id) as lease:
                assert lease.held
                _add(s, run.id, 0)
                s.set_status(run.id, "running")
            assert not s.lock_path(run.id).exists()
            assert s.next_seq(run.id) == 1
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_second_writer_in_same_process(db_path: Path):
    with Store.open(db_path) as a, Store.open(db_path) as b:
        run = a.create_run(model="m")
        lease = a.acquire_writer(run.id)
        with pytest.raises(RunLockedError, match=str(os.getpid())):
            b.acquire_writer(run.id, wait_s=0)
        with pytest.raises(RunLockedError):
            a.acquire_writer(run.id, wait_s=0)
        with pytest.raises(RunLockedError):
            _add(b, run.id, 0)
        _add(a, run.id, 0)
        lease.release()
        lease.release()  # idempotent
        with b.acquire_writer(run.id):
            _add(b, run.id, 1)
    # closing a store releases its leases
    with Store.open(db_path) as c:
        c.acquire_writer(run.id)
    with Store.open(db_path) as d, d.acquire_writer(run.id):
        pass


# --------------------------------------------------------------------------- export


def _populated(store: Store) -> str:
    run = store.create_run(model="smollm2-135m", mode="original", hparams={"layer": 5})
    for seq in range(3):
        _add(
            store,
            run.id,
            seq,
            case_id=seq,
            mode="original",
            update_norm=[12.0, 254.0, 13.0][seq],
            update_norm_ratio=[0.07, 1.48, 0.08][seq],
            metrics={"ES": 1.0, "PS": 0.5, "S": float("nan"), "probs": {"new": 0.7}},
            flagged=seq == 1,
            flag_reason="norm" if seq == 1 else None,
        )
    store.add_checkpoint(run.id, 0, "sst2", accuracy=0.9)
    store.add_fluency(run.id, 0, 5.1)
    store.add_rescore(run.id, 0, {"ES": 0.0})
    return run.id


def test_export_json(store: Store, tmp_path: Path):
    run_id = _populated(store)
    out = store.export_run(run_id, "json", tmp_path / "out" / "run.json")
    text = out.read_text()
    assert "NaN" not in text
    doc = json.loads(text)
    assert doc["schema_version"] == SCHEMA_VERSION
    assert doc["run"]["id"] == run_id and doc["run"]["hparams"] == {"layer": 5}
    assert [e["seq"] for e in doc["edits"]] == [0, 1, 2]
    assert "factors" not in doc["edits"][0] and "u" not in doc["edits"][0]
    assert doc["edits"][1]["update_norm"] == 254.0 and doc["edits"][1]["flagged"] is True
    assert doc["edits"][0]["metrics"]["S"] is None
    assert {c["task"] for c in doc["checkpoints"]} == {"sst2", "fluency"}
    assert doc["rescore"] == [{"seq": 0, "metrics": {"ES": 0.0}}]


def test_export_csv(store: Store, tmp_path: Path):
    run_id = _populated(store)
    out = store.export_run(run_id, "csv", tmp_path / "run.csv")
    rows = list(csv.DictReader(out.open()))
    assert len(rows) == 3
    assert rows[1]["subject"] == "The Eiffel Tower" and rows[1]["target_new"] == "Rome"
    assert float(rows[1]["update_norm"]) == 254.0 and rows[1]["flagged"] == "1"
    assert rows[0]["metric.ES"] == "1.0" and rows[0]["metric.probs.new"] == "0.7"
    assert rows[0]["metric.S"] == ""
    assert rows[0]["rescore.ES"] == "0.0" and rows[1]["rescore.ES"] == ""
    with pytest.raises(InvalidFieldError):
        store.export_run(run_id, "xml", tmp_path / "x")  # type: ignore[arg-type]


def test_delete_run(store: Store):
    run_id = _populated(store)
    keep = store.create_run(model="m")
    store.delete_run(run_id)
    with pytest.raises(UnknownRunError):
        store.get_run(run_id)
    assert [r.id for r in store.list_runs()] == [keep.id]
    assert store.integrity_ok()


# --------------------------------------------------------------------------- paths


def test_default_db_path(monkeypatch: pytest.MonkeyPatch, tmp_path: Path):
    monkeypatch.setenv("ROME_WORKBENCH_DB", str(tmp_path / "x.db"))
    assert default_db_path() == tmp_path / "x.db"
    monkeypatch.delenv("ROME_WORKBENCH_DB")
    p = default_db_path()
    assert p.name == "workbench.db" and "rome-workbench" in str(p)
    monkeypatch.setenv("ROME_WORKBENCH_DB", str(tmp_path / "y.db"))
    with Store.open() as s:
        assert s.path == tmp_path / "y.db"
    assert (tmp_path / "y.db").exists()


def test_memory_store():
    with Store.open(":memory:") as s:
        run = s.create_run(model="m")
        with s.acquire_writer(run.id):
            _add(s, run.id, 0)
        assert s.integrity_ok()
        assert store_mod.SCHEMA_VERSION == s.schema_version()
