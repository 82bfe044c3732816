"""What the fault tests (issue 20) share: the CLI runner, the one-error-line check,
preset files, replay arguments, a small finished replay, and a replay killed once it
stored some edits."""

from __future__ import annotations

import json
import signal
import subprocess
import time
from pathlib import Path

from cli_helpers import runner

from workbench.cli import app
from workbench.store import Store

ROOT = Path(__file__).resolve().parent.parent
PRESETS = ROOT / "rome" / "presets"
SAMPLE = ROOT / "evals" / "data" / "counterfact" / "sample.json"
GLUE = ROOT / "evals" / "data" / "glue"


def invoke(args: list) -> object:
    return runner.invoke(app, [str(a) for a in args])


def error_line(res, code: int) -> str:
    """The one ``error:`` line of a failed command (last on stderr), exit ``code``."""
    assert res.exit_code == code, res.output
    assert "Traceback" not in res.output
    assert res.exception is None or isinstance(res.exception, SystemExit), res.exception
    lines = res.stderr.splitlines()
    assert lines and lines[-1].startswith("error: "), res.stderr
    assert sum("error:" in line for line in lines) == 1, res.stderr
    return lines[-1]


def preset_file(tmp_path: Path, base: str = "tiny-gpt2", name: str = "mine", **changes) -> Path:
    data = json.loads((PRESETS / f"{base}.json").read_text())
    data.update(name=name, **changes)
    path = tmp_path / f"{name}.json"
    path.write_text(json.dumps(data))
    return path


def records(n: int, start: int = 0) -> list[dict]:
    return json.loads(SAMPLE.read_text())[start : start + n]


def replay_args(db: Path, dataset: Path, glue: Path, n: int, every: int | None = None) -> list:
    return [
        "replay", "--model", "tiny-gpt2", "--dataset", dataset, "--n-edits", n,
        "--glue-every", every or n, "--glue-limit", 2, "--glue-tasks", "sst2",
        "--glue-dir", glue, "--no-perplexity", "--db", db,
    ]  # fmt: skip


class Done:
    """A finished 2-edit replay (GLUE after each edit) on a 3-record file."""

    def __init__(self, root: Path) -> None:
        self.dataset = root / "records.json"
        self.dataset.write_text(json.dumps(records(3)))
        self.glue = root / "glue"
        self.glue.mkdir()
        (self.glue / "sst2.jsonl").write_text((GLUE / "sst2.jsonl").read_text())
        self.db = root / "w.db"
        res = invoke(replay_args(self.db, self.dataset, self.glue, 2, every=1))
        assert res.exit_code == 0, res.output
        with Store.open(self.db) as store:
            (run,) = store.list_runs()
            store._conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        self.run_id = run.id

    def copy(self, tmp_path: Path) -> Path:
        db = tmp_path / "copy.db"
        db.write_bytes(self.db.read_bytes())
        return db


def run_of(db: Path, run_id: str | None = None):
    with Store.open(db) as store:
        return store.get_run(run_id) if run_id else store.list_runs()[0]


def stored_edits(
    db: Path, n: int, proc: subprocess.Popen, timeout: float = 300, writer: bool = False
) -> tuple[str | None, int, int | None]:
    """Poll ``db`` every 0.2 s while ``proc`` runs until its first run holds ``n`` edits
    (and, with ``writer``, a writer's pid): (the run's id, the edits stored, the writer's
    pid); what was last seen if ``proc`` ends or ``timeout`` passes first."""
    deadline = time.time() + timeout
    run_id, done, pid = None, 0, None
    while time.time() < deadline and proc.poll() is None:
        time.sleep(0.2)
        if not db.exists():
            continue
        with Store.open(db) as s:
            runs = s.list_runs()
            if runs:
                run_id, done = runs[0].id, len(s.edits(runs[0].id))
                holder = s.writer_info(run_id) if writer else None
                pid = holder.pid if holder is not None else None
        if done >= n and (pid or not writer):
            break
    return run_id, done, pid


def kill_after(db: Path, n: int, child: subprocess.Popen, timeout: float = 300):
    """SIGKILL ``child`` once the replay it runs stored ``n`` edits in ``db`` (killed in
    any case when it outlives this): (the run's id, the edits stored when killed)."""
    try:
        run_id, done, _ = stored_edits(db, n, child, timeout)
        if done >= n:
            child.send_signal(signal.SIGKILL)
        child.wait(timeout=60)
    finally:
        if child.poll() is None:
            child.kill()
    return run_id, done
