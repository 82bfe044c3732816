"""Reading a database writes nothing to it (issue 31, item 3), and what a reader shows of
a run whose writer died (item 5): ``runs``, ``history``, ``export``, ``report``, ``plot``
and the app's browsing leave an older (schema 2) database's bytes as they were and read
it as it is; a read-only one is listed; a command that writes migrates it, saying so once.
A run killed with SIGKILL lists as interrupted; SIGINT stores its signal as SIGTERM does.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import sqlite3
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from fault_helpers import GLUE, ROOT, invoke, records, replay_args

from workbench.store import SCHEMA_VERSION, ReadOnlyStoreError, Store

DATA = Path(__file__).parent / "data"


def files(folder: Path) -> dict[str, bytes]:
    """Every file in ``folder`` (the database and any -wal beside it), as bytes. Not a
    WAL database's ``-shm``: SQLite's shared-memory index, whose read marks every reader
    sets (it holds no data; SQLite rebuilds it from the -wal)."""
    return {
        p.name: p.read_bytes()
        for p in sorted(folder.iterdir())
        if p.is_file() and not p.name.endswith("-shm")
    }


@pytest.fixture
def old(tmp_path: Path) -> Path:
    """A schema-2 database (written by the code of commit 77e3a08), alone in its folder."""
    folder = tmp_path / "old"
    folder.mkdir()
    db = folder / "v2.db"
    shutil.copy(DATA / "v2-finished.db", db)
    return db


def run_id_of(db: Path) -> str:
    """The one run's id, read with sqlite3 itself (``mode=ro``)."""
    conn = sqlite3.connect(f"file:{db}?mode=ro", uri=True)
    try:
        ((run_id,),) = conn.execute("SELECT id FROM runs").fetchall()
        return str(run_id)
    finally:
        conn.close()


@contextlib.contextmanager
def read_only(db: Path) -> Iterator[None]:
    """``db`` read-only (0444 in a 0555 folder; also immutable where ``chattr`` works,
    which binds root too); put back after."""
    folder = db.parent
    db.chmod(0o444)
    folder.chmod(0o555)
    chattr = shutil.which("chattr")
    immutable = bool(chattr) and subprocess.run([chattr, "+i", str(db)]).returncode == 0
    try:
        if not immutable and os.geteuid() == 0:
            pytest.skip("root writes a 0444 file and chattr is not available here")
        yield
    finally:
        if immutable:
            subprocess.run([chattr, "-i", str(db)], check=True)
        folder.chmod(0o755)
        db.chmod(0o644)


def test_every_read_command_leaves_an_older_database_as_it_was(old: Path, tmp_path: Path) -> None:
    run_id = run_id_of(old)
    before = files(old.parent)
    out = tmp_path / "out"
    reads = [
        ["runs"],
        ["history", run_id],
        ["export", run_id, "-o", out / "run.json"],
        ["export", run_id, "--csv", "-o", out / "run.csv"],
        ["export", run_id, "-o", "-"],
        ["report", run_id, "-o", out / "report"],
        ["plot", run_id, "-o", out / "runs.png"],
    ]
    for args in reads:
        res = invoke([*args, "--db", old])
        assert res.exit_code == 0, (args, res.output)
        assert files(old.parent) == before, f"{args[0]} changed the database"
    exported = json.loads((out / "run.json").read_text())
    assert [e["seq"] for e in exported["edits"]] == list(range(6))
    with Store.open(old, access="read") as store:
        assert store.schema_version() == SCHEMA_VERSION  # read through a migrated copy
        assert len(list(store.iter_steps(run_id))) == 6
        with pytest.raises(ReadOnlyStoreError):
            store.update_run(run_id, notes="no")
    assert files(old.parent) == before


def test_a_read_only_older_database_is_listed(old: Path) -> None:
    run_id = run_id_of(old)
    with read_only(old):
        res = invoke(["runs", "--db", old])
        assert res.exit_code == 0, res.output
        assert run_id in res.stdout and "finished" in res.stdout
        res = invoke(["history", run_id, "--db", old])
        assert res.exit_code == 0, res.output


def test_a_command_that_writes_migrates_and_says_so_once(old: Path, tmp_path: Path) -> None:
    """A resume writes: the database is migrated then (a warning, once), not before."""
    run_id = run_id_of(old)
    res = invoke(["replay", "--resume", run_id, "--rescore", "--db", old])
    assert res.exit_code == 0, res.output
    said = [line for line in res.stderr.splitlines() if "migrating" in line]
    assert len(said) == 1 and "schema 2 to 3" in said[0], res.stderr
    with Store.open(old, access="read") as store:
        assert store.schema_version() == SCHEMA_VERSION
    res = invoke(["replay", "--resume", run_id, "--rescore", "--db", old])
    assert res.exit_code == 0 and "migrating" not in res.stderr, res.output


async def test_the_app_browses_an_older_database_without_writing_it(
    old: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Started on it with --db, and opened with "Open database…": listed, a run's charts
    shown, the bytes as they were."""
    pytest.importorskip("textual")
    from tui_helpers import settle, wait_idle

    from workbench.tui.app import WorkbenchApp

    monkeypatch.setenv("ROME_WORKBENCH_CACHE", str(tmp_path / "cache"))
    other = tmp_path / "other" / "v2.db"
    other.parent.mkdir()
    shutil.copy(old, other)
    run_id = run_id_of(old)
    before, before_other = files(old.parent), files(other.parent)

    async def browse(app: WorkbenchApp, pilot: object) -> None:
        deadline = time.monotonic() + 60
        while not app.runs_pane.runs:
            assert time.monotonic() < deadline, "the runs were not listed"
            await pilot.pause(0.1)  # type: ignore[attr-defined]
        assert [r.id for r in app.runs_pane.runs] == [run_id]
        app.runs_pane.post_message(app.runs_pane.Show("open", run_id))
        while not app.runs_pane.series:
            assert time.monotonic() < deadline, "the run's charts were not shown"
            await pilot.pause(0.1)  # type: ignore[attr-defined]
        await settle(app)

    app = WorkbenchApp(model="tiny-gpt2", device="cpu", db_path=old, autoload=False)
    async with app.run_test(size=(160, 50)) as pilot:
        await wait_idle(app, pilot)
        app.show_tab("runs")
        await browse(app, pilot)
        app.switch_database(other)  # what Ctrl+O's dialog does with the path given
        await wait_idle(app, pilot)
        await browse(app, pilot)
    assert files(old.parent) == before
    assert files(other.parent) == before_other


# ------------------------------------------------------------- a writer killed


N_KILLED = 150


def _replay_killed(tmp_path: Path, sig: signal.Signals) -> tuple[Path, str]:
    """A CLI replay sent ``sig`` after its first edit; the database and stderr. The stream
    is long (150 edits) so that a fast machine cannot finish it between the poll that sees
    the first edit and the signal (8 edits could: the run was found finished)."""
    data = tmp_path / "stream.json"
    data.write_text(json.dumps(records(N_KILLED)))
    glue = tmp_path / "glue"
    glue.mkdir()
    (glue / "sst2.jsonl").write_text((GLUE / "sst2.jsonl").read_text())
    db = tmp_path / "w.db"
    args = [sys.executable, "-m", "workbench.cli", *map(str, replay_args(db, data, glue, N_KILLED))]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "COLUMNS": "200"}
    proc = subprocess.Popen(
        args,
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        # a shell's background job inherits SIGINT ignored, and Python then keeps it ignored:
        # give the child the default, as a terminal's replay has
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )
    try:
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline and proc.poll() is None:
            if db.exists():
                with Store.open(db, access="read") as store:
                    runs = store.list_runs()
                    if runs and store.edits(runs[0].id):
                        break
            time.sleep(0.2)
        proc.send_signal(sig)
        _, stderr = proc.communicate(timeout=120)
    finally:
        proc.kill()
    return db, stderr.decode()


def test_a_run_killed_with_sigkill_lists_as_interrupted(tmp_path: Path) -> None:
    db, _ = _replay_killed(tmp_path, signal.SIGKILL)
    before = files(db.parent)
    with Store.open(db, access="read") as store:
        (run,) = store.list_runs()
        assert run.status == "interrupted" and run.n_edits < N_KILLED  # the lock: no writer alive
    res = invoke(["runs", "--db", db])
    assert res.exit_code == 0 and "interrupted" in res.stdout and "running" not in res.stdout
    res = invoke(["report", run.id, "-o", tmp_path / "report", "--db", db])
    assert res.exit_code == 0, res.output
    page = (tmp_path / "report" / "README.md").read_text()
    assert "interrupted" in page and "| running" not in page
    assert files(db.parent) == before
    with Store.open(db) as store:  # what is stored is still what the writer left
        assert store.get_run(run.id).status == "running"


def test_sigint_stores_its_signal_as_sigterm_does(tmp_path: Path) -> None:
    db, stderr = _replay_killed(tmp_path, signal.SIGINT)
    with Store.open(db, access="read") as store:
        (run,) = store.list_runs()
    assert run.status == "interrupted", stderr
    assert run.error == "signal 2", stderr


def test_opened_to_read_until_it_writes_migrates_at_the_first_write(old: Path) -> None:
    """What the app opens: reads write nothing; the first write migrates the file, and
    the store says so once (the app shows it as a notice)."""
    run_id = run_id_of(old)
    before = files(old.parent)
    said: list[str] = []
    with Store.open(old, access="read-until-write") as store:
        store.on_migrate = said.append
        assert [r.id for r in store.list_runs()] == [run_id]
        assert len(store.edits(run_id)) == 6
        assert files(old.parent) == before and said == []
        store.update_run(run_id, notes="kept")
        store.update_run(run_id, notes="kept again")
        assert store.get_run(run_id).notes == "kept again"
    assert len(said) == 1 and "from schema 2 to 3" in said[0]
    with Store.open(old, access="read") as store:
        assert store.schema_version() == SCHEMA_VERSION
        assert store.get_run(run_id).notes == "kept again"
