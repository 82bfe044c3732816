"""The SQLite store, on real database files in tmp_path: schema and migrations, damaged,
foreign and missing files, locks and concurrent writers, the default path."""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import subprocess
import sys
import textwrap
import threading
from pathlib import Path

import pytest
from store_helpers import REQ, _add

from workbench import store as store_mod
from workbench.store import (
    MIGRATIONS,
    SCHEMA_VERSION,
    CorruptDatabaseError,
    DatabaseLockedError,
    ForeignDatabaseError,
    RunLockedError,
    SchemaTooNewError,
    Store,
    StoreClosedError,
    StoreNotFoundError,
    default_db_path,
)

REPO = Path(__file__).resolve().parents[1]


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
