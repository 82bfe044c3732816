"""Two ``replay`` processes write different runs into one SQLite database at once.

Both start on an empty cache, so they also race to sample the context
templates and collect the covariance statistics of the same layer: the cache
files are written atomically, so neither reads half a file.
"""

from __future__ import annotations

import os
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest

from workbench.store import Store

N_EDITS = 4


def _replay_cmd(db: Path, mode: str) -> list[str]:
    return [
        sys.executable,
        "-m",
        "workbench.cli",
        "replay",
        "--model",
        "tiny-gpt2",
        "--mode",
        mode,
        "--n-edits",
        str(N_EDITS),
        "--glue-every",
        "2",
        "--glue-limit",
        "4",
        "--glue-tasks",
        "sst2",
        "--db",
        str(db),
    ]


@pytest.mark.slow
@pytest.mark.ci  # about a minute on 2 busy cores; CI keeps it: concurrency regressions are silent
def test_two_replays_share_one_database(tmp_path: Path) -> None:
    db = tmp_path / "grid.db"
    env = {
        **os.environ,
        "OMP_NUM_THREADS": "1",
        "COLUMNS": "200",  # rich would cut the run ids off at 80 columns
        "ROME_WORKBENCH_CACHE": str(tmp_path / "cache"),  # empty: both race to fill it
    }
    t0 = time.perf_counter()
    procs = [
        subprocess.Popen(
            _replay_cmd(db, mode),
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for mode in ("original", "rrome")
    ]
    # while they run: how many runs the database lists as running at once
    most_running = 0
    while any(p.poll() is None for p in procs):
        if db.exists():
            try:
                runs = Store.open(db, create=False).list_runs()
                most_running = max(most_running, sum(r.status == "running" for r in runs))
            except Exception:  # the file may not have its schema yet
                pass
        time.sleep(0.5)
    outs = [p.communicate() for p in procs]
    wall = time.perf_counter() - t0
    for p, (_stdout, stderr) in zip(procs, outs, strict=True):
        assert p.returncode == 0, stderr[-2000:]
        assert "Traceback" not in stderr

    store = Store.open(db, create=False)
    runs = store.list_runs()
    assert sorted(r.mode for r in runs) == ["original", "rrome"]
    assert all(r.status == "finished" for r in runs)
    for r in runs:
        assert [e.seq for e in store.edits(r.id)] == list(range(N_EDITS))

    con = sqlite3.connect(db)
    try:
        assert con.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
        assert con.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        dupes = con.execute(
            "SELECT run_id, seq, COUNT(*) FROM edits GROUP BY run_id, seq HAVING COUNT(*) > 1"
        ).fetchall()
        assert dupes == []
        per_run = dict(con.execute("SELECT run_id, COUNT(*) FROM edits GROUP BY run_id"))
    finally:
        con.close()
    assert sorted(per_run.values()) == [N_EDITS, N_EDITS]

    listed = subprocess.run(
        [sys.executable, "-m", "workbench.cli", "runs", "--db", str(db)],
        env=env,
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    for r in runs:
        assert r.id in listed
    print(
        f"\ntwo concurrent replays of {N_EDITS} edits: {wall:.1f} s wall, "
        f"at most {most_running} run(s) listed as running at once, "
        f"{sum(per_run.values())} edits stored, integrity ok"
    )
