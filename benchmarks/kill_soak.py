"""Kill soak: SIGKILL a replay at random points, resume it each time, check nothing broke.

A replay on a tiny model is started, killed with SIGKILL at a random moment
after it reports that it is editing (so kills land in edits, checkpoints and
writes, not in the interpreter's start-up), resumed with ``--resume`` and
killed again, ``--kills`` times in a row, then left to finish. The same
replay runs once uninterrupted into another database. Checked and printed:
every edit stored exactly once, ``PRAGMA integrity_check`` ok on the
database, the final weights (base plus the stored updates, rebuilt in order)
equal to the uninterrupted run's (``torch.equal``), and the last stored
fingerprints equal.

    python benchmarks/kill_soak.py [--kills 20] [--n 40] [--seed 0]
"""

from __future__ import annotations

import argparse
import os
import random
import signal
import sqlite3
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from rome import Editor, load_model
from workbench.store import Store

MODEL = "tiny-gpt2"


def replay_cmd(db: Path, n: int, resume: str | None) -> list[str]:
    cmd = [sys.executable, "-m", "workbench.cli", "replay", "--model", MODEL, "--db", str(db)]
    cmd += ["--n-edits", str(n), "--glue-every", "4", "--glue-limit", "4", "--glue-tasks", "sst2"]
    return cmd + (["--resume", resume] if resume else [])


def run_id_in(db: Path) -> str | None:
    if not db.exists():
        return None
    with sqlite3.connect(db) as conn:
        row = conn.execute("SELECT id FROM runs ORDER BY created_at LIMIT 1").fetchone()
    return row[0] if row else None


def status_of(db: Path) -> str | None:
    run_id = run_id_in(db)
    with sqlite3.connect(db) as conn:
        row = conn.execute("SELECT status FROM runs WHERE id = ?", (run_id,)).fetchone()
    return row[0] if row else None


def edits_in(db: Path) -> int:
    if not db.exists():
        return 0
    with sqlite3.connect(db) as conn:
        try:
            return int(conn.execute("SELECT count(*) FROM edits").fetchone()[0])
        except sqlite3.OperationalError:  # killed before the schema was written
            return 0


def final_weight(db: Path, run_id: str) -> tuple[torch.Tensor, str | None]:
    """The edited weight rebuilt from the base model and the stored factors."""
    lm = load_model(MODEL)
    ed = Editor(lm.model, lm.tokenizer, lm.hparams, keep_undo=False, cache_dir=None)
    with Store.open(db) as store:
        for e, u, v in store.iter_factors(run_id):
            ed.apply_factors(e.layer, u, v, force=True)
        last = store.last_edit(run_id)
    return ed.module(lm.hparams.layer).weight.detach().clone(), last.fingerprint if last else None


def started(proc: subprocess.Popen[str], lines: list[str]) -> threading.Event:
    """Set once the replay reports it has started editing ("run X: N edits, from edit K");
    every stderr line is kept in ``lines``."""
    ready = threading.Event()

    def read() -> None:
        assert proc.stderr is not None
        for line in proc.stderr:
            lines.append(line)
            if " edits, from edit " in line:
                ready.set()
        ready.set()  # the process ended

    threading.Thread(target=read, daemon=True).start()
    return ready


def parse_args() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--kills", type=int, default=20)
    ap.add_argument("--n", type=int, default=40, help="edits in the replay")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument(
        "--max-delay",
        type=float,
        default=None,
        help="seconds after the replay starts editing before a kill, at most "
        "(default: the time of two edits in the uninterrupted run)",
    )
    return ap.parse_args()


def launch(db: Path, n: int, resume: str | None, env: dict[str, str]) -> subprocess.Popen[str]:
    """A replay into ``db`` (resuming ``resume`` if given), its stderr piped."""
    return subprocess.Popen(
        replay_cmd(db, n, resume),
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )


@dataclass
class Soak:
    """What the killed-and-resumed replay went through."""

    kills: int = 0
    resumes: int = 0
    stored_at_kill: list[int] = field(default_factory=list)
    seconds: float = 0.0


def uninterrupted(db: Path, n: int, env: dict[str, str]) -> tuple[float, float, str]:
    """The reference replay: its seconds in all, its seconds from the start of editing,
    and its run id. Exits with its stderr's tail if it fails."""
    t0 = time.perf_counter()
    ref = launch(db, n, None, env)
    ref_lines: list[str] = []
    started(ref, ref_lines).wait()
    work_t0 = time.perf_counter()
    if ref.wait() != 0:
        sys.exit(f"the uninterrupted replay failed: {''.join(ref_lines)[-500:]}")
    ref_s, work_s = time.perf_counter() - t0, time.perf_counter() - work_t0
    ref_id = run_id_in(db)
    assert ref_id is not None
    return ref_s, work_s, ref_id


def soak(
    db: Path, n: int, n_kills: int, max_delay: float, rng: random.Random, env: dict[str, str]
) -> Soak:
    """Start (or resume) the replay, SIGKILL it at a random moment after it starts editing,
    ``n_kills`` times, then let it finish. Exits if the last resume fails."""
    out, t0 = Soak(), time.perf_counter()
    while True:
        run_id = run_id_in(db)
        proc = launch(db, n, run_id, env)
        lines: list[str] = []
        ready = started(proc, lines)
        out.resumes += run_id is not None
        if out.kills < n_kills:
            ready.wait()
            try:
                proc.wait(timeout=rng.uniform(0.0, max_delay))
            except subprocess.TimeoutExpired:
                proc.send_signal(signal.SIGKILL)
                proc.wait()
                out.kills += 1
                out.stored_at_kill.append(edits_in(db))
                continue
        proc.wait()
        if proc.returncode == 0 and status_of(db) == "finished":
            break
        if proc.returncode != 0 and out.kills >= n_kills:
            sys.exit(f"the last resume failed ({proc.returncode}): {''.join(lines)[-500:]}")
    out.seconds = time.perf_counter() - t0
    return out


def check(
    ref_db: Path, ref_id: str, soak_db: Path, n: int, ran: Soak, max_delay: float, ref_s: float
) -> bool:
    """Print the checks and timings; True when every check holds."""
    run_id = run_id_in(soak_db)
    assert run_id is not None
    with sqlite3.connect(soak_db) as conn:
        seqs = [r[0] for r in conn.execute("SELECT seq FROM edits WHERE run_id = ?", (run_id,))]
        integrity = conn.execute("PRAGMA integrity_check").fetchone()[0]
        status = conn.execute("SELECT status FROM runs WHERE id = ?", (run_id,)).fetchone()[0]
    w_ref, fp_ref = final_weight(ref_db, ref_id)
    w_soak, fp_soak = final_weight(soak_db, run_id)
    once = sorted(seqs) == list(range(n))
    same = torch.equal(w_ref, w_soak)
    soak_s = ran.seconds
    print(f"kills {ran.kills}, resumes {ran.resumes}, run status {status}")
    print(f"edits stored when each kill landed: {ran.stored_at_kill}")
    print(f"edits stored {len(seqs)} of {n}, each exactly once: {once}")
    print(f"PRAGMA integrity_check: {integrity}")
    print(f"final weights torch.equal to the uninterrupted run: {same}")
    print(f"last fingerprints equal: {fp_ref == fp_soak}")
    print(f"kill delay after the start of editing: 0 to {max_delay:.1f} s")
    print(f"uninterrupted {ref_s:.1f} s, soak {soak_s:.1f} s ({soak_s / ref_s:.1f}x)")
    return once and same and integrity == "ok" and fp_ref == fp_soak


def main() -> None:
    args = parse_args()
    rng = random.Random(args.seed)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    with tempfile.TemporaryDirectory() as tmp:
        env.setdefault("ROME_WORKBENCH_CACHE", str(Path(tmp) / "cache"))
        ref_db, soak_db = Path(tmp) / "ref.db", Path(tmp) / "soak.db"
        ref_s, work_s, ref_id = uninterrupted(ref_db, args.n, env)
        max_delay = args.max_delay or 2 * work_s / args.n
        ran = soak(soak_db, args.n, args.kills, max_delay, rng, env)
        if not check(ref_db, ref_id, soak_db, args.n, ran, max_delay, ref_s):
            sys.exit(1)


if __name__ == "__main__":
    main()
