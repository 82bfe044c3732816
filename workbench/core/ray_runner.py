"""Running a comparison's runs on a Ray cluster: each run one Ray task asking for one
GPU (where the cluster has GPUs) or one CPU. Ray is an optional extra
(``pip install 'rome-workbench[ray]'``), imported only here and only when asked for.

A task runs the same ``replay`` process as a local worker, on its node, into a
database under the node's temporary folder (SQLite is not shared across hosts):
the driver ships the copy it holds of an unfinished run with the task, the task
resumes whichever copy (shipped or left on its node by an earlier try) holds more
edits, and hands the database back when its replay ends, however it ends. A task
whose worker dies is not retried (``max_retries=0``): the run is reported failed,
and running the spec again resumes it from the copy its node kept. The replay dies
with its worker (``PR_SET_PDEATHSIG`` on Linux, as a local one dies with ``compare``),
so no orphan keeps writing.
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import sqlite3
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

from rome import BadRequestError

from .compare import RunState, read_run
from .compare_runner import RunProgress, die_with_parent, eta, failure_note, initial_row, name_run

log = logging.getLogger(__name__)

#: how long a Ray address has to answer before it is refused
PROBE_TIMEOUT_S = 5.0
#: the folder under a node's temporary folder that holds its runs' databases
WORKDIR = "rome-workbench-compare"


class RaySetupError(BadRequestError):
    """No Ray to run on: not installed, or the address does not answer (exit 2)."""


def _host_port(address: str) -> tuple[str, int]:
    rest = address.split("://", 1)[1] if "://" in address else address
    default = 10001 if address.startswith("ray://") else 6379
    host, _, port = rest.rstrip("/").rpartition(":")
    if not host:
        return rest.rstrip("/"), default
    try:
        return host, int(port)
    except ValueError:
        raise RaySetupError(
            f"Ray address {address!r}: give HOST:PORT, ray://HOST:PORT, auto or local"
        ) from None


def probe(address: str, timeout_s: float = PROBE_TIMEOUT_S) -> None:
    """Refuse an address nothing answers at (a TCP connect), before Ray is started."""
    host, port = _host_port(address)
    try:
        with socket.create_connection((host, port), timeout=timeout_s):
            pass
    except OSError as exc:
        why = exc.strerror or type(exc).__name__
        raise RaySetupError(
            f"the Ray address {address} does not answer ({why}); nothing was started"
        ) from None


def connect(address: str) -> Any:
    """Connect to the cluster at ``address`` ('auto': the one this machine is part of;
    'local': start one on this machine); the ``ray`` module. :class:`RaySetupError`
    (one line) where Ray is missing or nothing answers."""
    if address not in ("auto", "local"):
        probe(address)
    try:
        import ray
    except ImportError:
        raise RaySetupError(
            "Ray is not installed: pip install 'rome-workbench[ray]' (or run without --ray)"
        ) from None
    try:
        ray.init(
            address=None if address == "local" else address,
            ignore_reinit_error=True,
            log_to_driver=False,
            logging_level=logging.WARNING,
            include_dashboard=False,
        )
    except (ConnectionError, RuntimeError, ValueError, TimeoutError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise RaySetupError(f"no Ray cluster at {address}: {first}; nothing was started") from None
    return ray


# ------------------------------------------------------------------- on the worker


def _write_copy(db: Path, data: bytes) -> None:
    for suffix in ("-wal", "-shm", "-journal"):
        Path(f"{db}{suffix}").unlink(missing_ok=True)
    tmp = db.with_suffix(".db.part")
    tmp.write_bytes(data)
    os.replace(tmp, db)


def db_bytes(db: Path) -> bytes | None:
    """The database at ``db`` as one file's bytes (its WAL folded in), or ``None``."""
    if not db.is_file():
        return None
    with tempfile.TemporaryDirectory() as tmp:
        copy = Path(tmp) / "copy.db"
        src = sqlite3.connect(db.absolute().as_uri() + "?mode=ro", uri=True)
        dst = sqlite3.connect(str(copy))
        try:
            src.backup(dst)
        finally:
            dst.close()
            src.close()
        return copy.read_bytes()


def run_task(
    state: RunState, shipped: bytes | None, workdir: str, progress: Any, spec_name: str
) -> dict[str, Any]:
    """One run on a Ray worker (see the module); ``{"rc", "note", "db", "edits"}``."""
    work = Path(workdir)
    work.mkdir(parents=True, exist_ok=True)
    db = work / state.db.name
    here = read_run(db) if db.is_file() else None
    if shipped is not None and (here is None or here[2] < state.edits_done):
        _write_copy(db, shipped)
        here = read_run(db)
    local = RunState(state.run, db, "resume" if here else "start", here[0] if here else None)
    log_path = work / f"{state.run.name}.log"
    env = {**os.environ}
    if not env.get("CUDA_VISIBLE_DEVICES"):
        env.update(OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    progress.update.remote(state.run.name, here[2] if here else 0, socket.gethostname())
    done = threading.Event()

    def report() -> None:
        while not done.wait(2.0):
            found = read_run(db) if db.is_file() else None
            if found is not None:
                progress.update.remote(state.run.name, found[2], socket.gethostname())

    threading.Thread(target=report, daemon=True).start()
    with open(log_path, "ab") as out:
        proc = subprocess.Popen(
            local.argv(sys.executable), env=env, stdout=out, stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL, preexec_fn=die_with_parent,
        )  # fmt: skip
        rc = proc.wait()
    done.set()
    name_run(db, f"compare {spec_name}: {state.run.name}")
    found = read_run(db) if db.is_file() else None
    ok = rc == 0 and found is not None and found[1] == "finished"
    note = "" if ok else (failure_note(log_path, rc) if rc else "the run did not finish")
    return {"rc": rc, "ok": ok, "note": note, "db": db_bytes(db), "edits": found[2] if found else 0}


class _Progress:
    """A Ray actor the tasks report their edit counts to."""

    def __init__(self) -> None:
        self.seen: dict[str, tuple[int, str]] = {}

    def update(self, name: str, edits: int, host: str) -> None:
        self.seen[name] = (edits, host)

    def get(self) -> dict[str, tuple[int, str]]:
        return dict(self.seen)


# -------------------------------------------------------------------- the driver


class RayRunner:
    """The runs of ``states`` as Ray tasks; :meth:`run` blocks until all ended and
    writes each run's database back to its ``state.db``."""

    def __init__(
        self,
        ray: Any,
        states: Sequence[RunState],
        on_change: Callable[[list[RunProgress]], None],
        *,
        spec_name: str = "",
        workdir: str | None = None,
        poll_s: float = 1.0,
    ) -> None:
        self.ray = ray
        self.states = {s.run.name: s for s in states}
        self.rows = {s.run.name: initial_row(s) for s in states}
        self.on_change = on_change
        self.spec_name = spec_name
        self.workdir = workdir or str(Path(tempfile.gettempdir()) / WORKDIR / spec_name)
        self.poll_s = poll_s
        self.started: dict[str, tuple[float, int]] = {}

    def _submit(self) -> dict[Any, str]:
        ray = self.ray
        gpus = ray.cluster_resources().get("GPU", 0) > 0
        ask = {"num_gpus": 1} if gpus else {"num_cpus": 1}
        task = ray.remote(max_retries=0, **ask)(run_task)
        self.progress = ray.remote(num_cpus=0)(_Progress).remote()
        refs = {}
        for name, s in self.states.items():
            if s.action == "skip":
                continue
            ref = task.remote(s, db_bytes(s.db), self.workdir, self.progress, self.spec_name)
            refs[ref] = name
        return refs

    def run(self) -> list[RunProgress]:
        """Submit every unfinished run and wait for them all; on ``KeyboardInterrupt``
        cancel the tasks (their replays stop with their workers) and re-raise."""
        pending = self._submit()
        try:
            while pending:
                ready, _ = self.ray.wait(list(pending), num_returns=1, timeout=self.poll_s)
                for ref in ready:
                    self._ended(pending.pop(ref), ref)
                self._poll()
                self.on_change(list(self.rows.values()))
        except KeyboardInterrupt:
            for ref in pending:
                with contextlib.suppress(Exception):
                    self.ray.cancel(ref, force=True)
            raise
        return list(self.rows.values())

    def _poll(self) -> None:
        seen = self.ray.get(self.progress.get.remote())
        now = time.monotonic()
        for name, (edits, host) in seen.items():
            row = self.rows[name]
            if row.status not in ("waiting", "running"):
                continue
            t0, n0 = self.started.setdefault(name, (now, edits))
            left = eta(n0, edits, row.total, now - t0)
            self.rows[name] = replace(row, status="running", edits=edits, worker=host, eta_s=left)

    def _ended(self, name: str, ref: Any) -> None:
        row = self.rows[name]
        try:
            result = self.ray.get(ref)
        except Exception as exc:  # the worker died, or the task raised
            first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
            self.rows[name] = replace(row, status="failed", eta_s=None, note=first[:160])
            return
        state = self.states[name]
        if result["db"] is not None:
            state.db.parent.mkdir(parents=True, exist_ok=True)
            _write_copy(state.db, result["db"])
        status = "done" if result["ok"] else "failed"
        self.rows[name] = replace(
            row, status=status, edits=result["edits"], eta_s=None, note=result["note"]
        )
