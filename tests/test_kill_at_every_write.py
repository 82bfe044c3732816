"""A replay killed at any write of the store, then resumed, ends with the rows of an
uninterrupted run (issue 31, items 1 and 2): every step once, every checkpoint whole,
retention included, batched runs whose checkpoints do not fall on a multiple of
``--glue-every`` included.

The kill: the store's write transaction (``StoreBase._write``, the one way every row is
written) raises at its N-th call, and every write after it raises too, as a killed
process writes nothing more (not even its ``interrupted`` status). The fast tests kill
at the two places the issue names; the ``slow`` ones at every N up to the run's total.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from evals.replay import ReplayConfig, ReplayFinished, replay
from rome import load_model
from workbench.store import Store
from workbench.store.connection import StoreBase

# the reference runs: a batched one whose checkpoints are at 0, 6, 9 and 11
BATCHED = dict(
    n_edits=11, method="memit", batch_size=3, glue_every=4, glue_limit=4, glue_tasks=("sst2",),
    retention_size=5, fluency_tokens=8,
)  # fmt: skip
# and a ROME one checkpointing at 0, 4 and 5
ROME = dict(n_edits=5, glue_every=4, glue_limit=4, glue_tasks=("sst2",), retention_size=5,
            fluency_tokens=8)  # fmt: skip


class Killed(BaseException):
    """The process died here (a BaseException: nothing in the replay handles it)."""


class Writes:
    """Counts the store's write transactions; from the ``kill_at``-th on, each dies."""

    def __init__(self, kill_at: int | None = None) -> None:
        self.kill_at = kill_at
        self.n = 0
        self.calls: list[str] = []

    @contextlib.contextmanager
    def patched(self, monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
        original = StoreBase._write
        writes = self

        @contextlib.contextmanager
        def _write(store: StoreBase) -> Iterator[Any]:
            import inspect

            writes.n += 1
            writes.calls.append(inspect.stack()[2].function)
            if writes.kill_at is not None and writes.n >= writes.kill_at:
                raise Killed(f"write {writes.n}")
            with original(store) as conn:
                yield conn

        with monkeypatch.context() as m:
            m.setattr(StoreBase, "_write", _write)
            yield


def rows(store: Store, run_id: str) -> dict[str, Any]:
    """What the run stored, less the times: checkpoints, edits, re-scoring, status."""
    checkpoints = sorted(
        (
            c.step, c.task, c.accuracy, c.f1, c.mcc, c.invalid, c.n, c.value,
            sorted((k, repr(v)) for k, v in (c.extra or {}).items() if k != "seconds"),
        )
        for c in store.checkpoints(run_id)
    )  # fmt: skip
    edits = [
        (e.seq, e.step_index, e.applied, e.refused, e.flagged, e.flag_reason, e.fingerprint)
        for e in store.edits(run_id)
    ]
    rescore = [(r.seq, sorted(r.metrics.items())) for r in store.rescores(run_id)]
    return {
        "status": store.get_run(run_id).status,
        "checkpoints": checkpoints,
        "edits": edits,
        "rescore": rescore,
    }


def straight(db: Path, settings: dict, monkeypatch: pytest.MonkeyPatch) -> tuple[dict, Writes]:
    writes = Writes()
    with writes.patched(monkeypatch), Store.open(db) as store:
        events = list(replay(load_model("tiny-gpt2"), store, ReplayConfig(**settings)))
        fin = events[-1]
        assert isinstance(fin, ReplayFinished) and fin.status == "finished"
        return rows(store, fin.run_id), writes


def killed_then_resumed(
    db: Path, settings: dict, kill_at: int, monkeypatch: pytest.MonkeyPatch
) -> dict | None:
    """The run killed at write ``kill_at``, then resumed by a fresh process (a fresh
    base model, a fresh store); its rows, or None where it died before its run existed."""
    writes = Writes(kill_at)
    with writes.patched(monkeypatch), Store.open(db) as store:
        with pytest.raises(Killed):
            for _ in replay(load_model("tiny-gpt2"), store, ReplayConfig(**settings)):
                pass
    with Store.open(db) as store:
        runs = store.list_runs()
        if not runs:
            return None
        (run,) = runs
        events = list(replay(load_model("tiny-gpt2"), store, resume=run.id))
        fin = events[-1]
        assert isinstance(fin, ReplayFinished) and fin.status == "finished", events
        return rows(store, run.id)


def write_index(writes: Writes, what: str, occurrence: int) -> int:
    """The 1-based index of the ``occurrence``-th (0-based) write made by ``what``."""
    hits = [i + 1 for i, name in enumerate(writes.calls) if name == what]
    return hits[occurrence]


def test_a_batched_checkpoint_lost_to_a_kill_after_its_step_is_made_on_resume(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Item 1: killed right after the step ending at edit 6 is committed (the write after
    it, the checkpoint's first row, dies); the resumed run still checkpoints at 6."""
    want, writes = straight(tmp_path / "straight.db", BATCHED, monkeypatch)
    assert sorted({c[0] for c in want["checkpoints"]}) == [0, 6, 9, 11]
    after_step_3 = write_index(writes, "add_step", 1) + 1  # the steps start at 0, 3, 6, 9
    got = killed_then_resumed(tmp_path / "cut.db", BATCHED, after_step_3, monkeypatch)
    assert got == want


def test_a_kill_inside_the_retention_pass_is_completed_on_resume(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Item 2: killed at the retention row of the checkpoint at 4 (after its GLUE,
    fluency and perplexity rows); the resumed run has its retention row at 4."""
    want, writes = straight(tmp_path / "straight.db", ROME, monkeypatch)
    tasks_at_4 = {c[1] for c in want["checkpoints"] if c[0] == 4}
    assert tasks_at_4 == {"sst2", "fluency", "perplexity", "retention"}
    retention_rows = [
        i + 1
        for i, name in enumerate(writes.calls)
        if name == "add_checkpoint" and i >= write_index(writes, "add_step", 3)
    ]
    at_retention = retention_rows[3]  # sst2, fluency, perplexity, then retention
    got = killed_then_resumed(tmp_path / "cut.db", ROME, at_retention, monkeypatch)
    assert got == want


@pytest.mark.slow
@pytest.mark.parametrize("settings", [BATCHED, ROME], ids=["memit-batched", "rome"])
def test_a_kill_at_every_write_resumes_to_the_same_rows(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, settings: dict
) -> None:
    want, writes = straight(tmp_path / "straight.db", settings, monkeypatch)
    for n in range(1, writes.n + 1):
        db = tmp_path / f"cut-{n}.db"
        got = killed_then_resumed(db, settings, n, monkeypatch)
        if got is None:  # died creating the run: nothing to resume
            assert n == 1
            continue
        assert got == want, f"killed at write {n} ({writes.calls[n - 1]})"
