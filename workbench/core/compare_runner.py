"""Running a comparison's runs on local workers, each run its own ``replay`` process.

A worker is one GPU (its own ``CUDA_VISIBLE_DEVICES``) where there are GPUs, else
one CPU core (``OMP_NUM_THREADS=1``). Each takes the next run that is not finished,
runs ``python -m workbench.cli replay`` (a new run, or ``--resume`` of the one its
database holds) with its output in ``OUT/logs/{run}.log``, and takes the next. A
run that fails or is killed is reported failed; running the spec again resumes it.
Progress is a list of :class:`RunProgress` handed to a callback about once a second.
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
import os
import signal
import subprocess
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Protocol

from .compare import RunState, read_run

log = logging.getLogger(__name__)

#: what a progress row's status is: not started yet, at work, finished (this time or
#: before), stopped before its end
STATUSES = ("waiting", "running", "done", "failed")


@dataclass(frozen=True)
class RunProgress:
    """One row of the live table."""

    name: str
    status: str
    edits: int
    total: int
    worker: str = ""
    eta_s: float | None = None
    note: str = ""


class Runner(Protocol):
    """What runs a comparison's runs (:class:`LocalRunner`, ``ray_runner.RayRunner``)."""

    def run(self) -> list[RunProgress]: ...


@dataclass(frozen=True)
class Worker:
    """A local worker: its label and the environment its replays run with."""

    label: str
    env: dict[str, str]


def visible_gpus() -> list[str]:
    """The GPU ids this process may use (``CUDA_VISIBLE_DEVICES``, else all of them)."""
    import torch

    if not torch.cuda.is_available():
        return []
    n = torch.cuda.device_count()
    given = os.environ.get("CUDA_VISIBLE_DEVICES")
    ids = [g.strip() for g in given.split(",") if g.strip()] if given else []
    return ids[:n] if ids else [str(i) for i in range(n)]


def local_workers(n: int | None = None, gpus: Sequence[str] | None = None) -> list[Worker]:
    """``n`` workers (default: one per GPU, else one per CPU core); GPU workers take
    the GPUs in turn and share the cores, CPU workers one thread each."""
    gpus = visible_gpus() if gpus is None else list(gpus)
    cores = os.cpu_count() or 1
    n = n or len(gpus) or cores
    if gpus:
        threads = str(max(1, cores // n))
        return [
            Worker(f"gpu {g}", {"CUDA_VISIBLE_DEVICES": g, "OMP_NUM_THREADS": threads,
                                "MKL_NUM_THREADS": threads})
            for g in (gpus[i % len(gpus)] for i in range(n))
        ]  # fmt: skip
    one = {"CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    return [Worker(f"cpu {i}", dict(one)) for i in range(n)]


def eta(edits_then: int, edits_now: int, total: int, since_s: float) -> float | None:
    """Seconds to ``total`` at the rate seen since this session started the run."""
    done = edits_now - edits_then
    if done <= 0 or since_s <= 0:
        return None
    return max(0.0, (total - edits_now) * since_s / done)


def die_with_parent() -> None:  # pragma: no cover - runs in the child, before exec
    """Linux: the replay gets SIGKILL when the process that started it dies (a killed
    ``compare`` or Ray worker leaves no replay writing on its own; the run resumes)."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG


def failure_note(log_path: Path, rc: int) -> str:
    """Why a replay process ended badly: a signal, or its last ``error:`` line."""
    if rc < 0:
        try:
            return f"killed by {signal.Signals(-rc).name}"
        except ValueError:
            return f"killed by signal {-rc}"
    lines = []
    with contextlib.suppress(OSError):
        lines = log_path.read_text(encoding="utf-8", errors="replace").splitlines()
    errors = [ln for ln in lines if ln.startswith("error:")]
    last = errors[-1] if errors else next((ln for ln in reversed(lines) if ln.strip()), "")
    return f"exit {rc}" + (f": {last.strip()[:160]}" if last else "")


def name_run(db: Path, text: str) -> None:
    """Keep the comparison's name for the run in its ``notes`` (once its writer is gone)."""
    from workbench.store import Store, StoreError

    found = read_run(db) if db.is_file() else None
    if found is None:
        return
    try:
        with Store.open(db) as store:
            if store.get_run(found[0]).notes != text:
                store.update_run(found[0], notes=text)
    except StoreError as exc:  # a run still held elsewhere keeps its notes for now
        log.warning("could not name run %s in %s: %s", found[0], db, exc)


def initial_row(state: RunState) -> RunProgress:
    """A run's row before this session touched it (finished before, to resume, new)."""
    done = state.action == "skip"
    return RunProgress(
        state.run.name, "done" if done else "waiting", state.edits_done, state.run.n_edits,
        note="finished before" if done else ("to resume" if state.action == "resume" else ""),
    )  # fmt: skip


class LocalRunner:
    """The runs of ``states`` on ``workers``; :meth:`run` blocks until all ended."""

    def __init__(
        self,
        states: Sequence[RunState],
        workers: Sequence[Worker],
        log_dir: Path,
        on_change: Callable[[list[RunProgress]], None],
        *,
        spec_name: str = "",
        poll_s: float = 1.0,
    ) -> None:
        self.states = {s.run.name: s for s in states}
        self.rows = {s.run.name: initial_row(s) for s in states}
        self.queue = deque(s for s in states if s.action != "skip")
        self.workers = list(workers)
        self.log_dir = log_dir
        self.on_change = on_change
        self.spec_name = spec_name
        self.poll_s = poll_s
        self.lock = threading.Lock()
        self.stop = threading.Event()
        self.procs: dict[str, subprocess.Popen[bytes]] = {}
        self.started: dict[str, tuple[float, int]] = {}

    def snapshot(self) -> list[RunProgress]:
        with self.lock:
            return [self.rows[n] for n in self.states]

    def _set(self, name: str, **changes: object) -> None:
        with self.lock:
            self.rows[name] = replace(self.rows[name], **changes)  # type: ignore[arg-type]

    def run(self) -> list[RunProgress]:
        """Run every run not finished; on ``KeyboardInterrupt`` stop the replays
        (SIGTERM: each marks its run interrupted) and re-raise."""
        threads = [
            threading.Thread(target=self._work, args=(w,), daemon=True)
            for w in self.workers[: max(1, len(self.queue))]
        ]
        for t in threads:
            t.start()
        try:
            while any(t.is_alive() for t in threads):
                self._poll()
                self.on_change(self.snapshot())
                self.stop.wait(self.poll_s)
        except KeyboardInterrupt:
            self.stop.set()
            self._terminate()
            for t in threads:
                t.join()
            raise
        self.on_change(self.snapshot())
        return self.snapshot()

    def _terminate(self) -> None:
        with self.lock:
            procs = list(self.procs.values())
        for p in procs:
            with contextlib.suppress(ProcessLookupError):
                p.send_signal(signal.SIGTERM)
        for p in procs:
            try:
                p.wait(timeout=60)
            except subprocess.TimeoutExpired:
                p.kill()

    def _poll(self) -> None:
        now = time.monotonic()
        for name, (t0, n0) in list(self.started.items()):
            if self.rows[name].status != "running":
                continue
            found = read_run(self.states[name].db) if self.states[name].db.is_file() else None
            if found is not None:
                total = self.rows[name].total
                self._set(name, edits=found[2], eta_s=eta(n0, found[2], total, now - t0))

    def _next(self) -> RunState | None:
        with self.lock:
            return self.queue.popleft() if self.queue and not self.stop.is_set() else None

    def _work(self, worker: Worker) -> None:
        while (state := self._next()) is not None:
            self._one(state, worker)

    def _one(self, state: RunState, worker: Worker) -> None:
        name = state.run.name
        self.log_dir.mkdir(parents=True, exist_ok=True)
        log_path = self.log_dir / f"{name}.log"
        env = {**os.environ, **worker.env}
        self._set(name, status="running", worker=worker.label, note="")
        self.started[name] = (time.monotonic(), state.edits_done)
        with open(log_path, "ab") as out:
            proc = subprocess.Popen(
                state.argv(), env=env, stdout=out, stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL, start_new_session=True, preexec_fn=die_with_parent,
            )  # fmt: skip
            with self.lock:
                self.procs[name] = proc
            rc = proc.wait()
        with self.lock:
            self.procs.pop(name, None)
        name_run(state.db, f"compare {self.spec_name}: {name}")
        found = read_run(state.db) if state.db.is_file() else None
        edits = found[2] if found else 0
        if rc == 0 and found is not None and found[1] == "finished":
            self._set(name, status="done", edits=edits, eta_s=None, note="")
        else:
            note = failure_note(log_path, rc) if rc else f"run {found[1] if found else 'missing'}"
            self._set(name, status="failed", edits=edits, eta_s=None, note=note)
