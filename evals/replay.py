"""Sequential replay: N CounterFact edits applied in order to one model, evaluated as it goes.

``replay`` is a generator of events (a CLI or a TUI consumes them). Every
finished edit is committed to the store with its factors and the weight
fingerprint after it, so a killed run loses nothing finished. Resuming
rebuilds the weights from the base model plus the stored updates in order,
checks the fingerprint, and goes on from the next edit.
"""

from __future__ import annotations

import json
import logging
import statistics
import threading
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any

from rome import Editor, LoadedModel, RomeError
from rome.errors import BadRequestError

from .counterfact import CounterFactRecord, load_counterfact
from .glue import TASKS, evaluate_glue
from .metrics import aggregate, generate, generation_entropy, record_metrics

if TYPE_CHECKING:  # the store lives in workbench/, which depends on evals
    from workbench.store import Store

log = logging.getLogger(__name__)

FLUENCY_PROMPTS = (
    "The history of the city began",
    "My favourite book is about",
    "Scientists have recently discovered that",
    "The best way to learn a language is",
    "Yesterday the weather was",
    "The company announced that",
)


class ReplayError(RomeError):
    """A replay that cannot start or resume (wrong model, fingerprint mismatch...)."""


@dataclass
class ReplayConfig:
    dataset: str = "sample"
    n_edits: int = 100
    mode: str = "rrome"
    glue_every: int = 10
    glue_tasks: tuple[str, ...] = TASKS
    glue_limit: int | None = 50
    glue_dir: str | None = None
    glue_scoring: str = "logprob"
    guard: bool = False
    layer: int | None = None
    flag_norm_factor: float = 4.0  # flag when ‖ΔW‖ > factor × the running median
    flag_min_history: int = 3
    flag_entropy_ratio: float = 0.6  # flag when fluency < ratio × the start's
    fluency_tokens: int = 40
    generation_metrics: bool = False  # GE per edit (costs a generation per edit)
    rescore: bool = True

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class ReplayStarted:
    run_id: str
    total: int
    start_seq: int


@dataclass
class EditDone:
    seq: int
    total: int
    case_id: int
    subject: str
    target_new: str
    update_norm: float
    update_norm_ratio: float
    metrics: dict[str, Any]
    flagged: bool
    flag_reason: str | None
    refused: bool
    seconds: float


@dataclass
class CheckpointDone:
    step: int
    glue: dict[str, dict[str, Any]]
    fluency: float | None


@dataclass
class ReplayWarning:
    message: str


@dataclass
class ReplayFinished:
    run_id: str
    status: str
    summary: dict[str, Any] = field(default_factory=dict)


ReplayEvent = ReplayStarted | EditDone | CheckpointDone | ReplayWarning | ReplayFinished


def fluency(lm: LoadedModel, tokens: int) -> float:
    """Generation entropy of greedy continuations of fixed prompts (a collapse probe)."""
    conts = generate(lm.model, lm.tokenizer, list(FLUENCY_PROMPTS), tokens)
    return generation_entropy([p + c for p, c in zip(FLUENCY_PROMPTS, conts, strict=True)])


def norm_flag(norm: float, history: list[float], cfg: ReplayConfig) -> str | None:
    """Why an update norm looks disabling, measured against the run's running median."""
    if len(history) < cfg.flag_min_history:
        return None
    med = statistics.median(history)
    if med > 0 and norm > cfg.flag_norm_factor * med:
        return f"update norm {norm:.3g} is {norm / med:.1f}x the running median {med:.3g}"
    return None


class _Run:
    """State of one replay while it runs (kept out of the generator for readability)."""

    def __init__(self, lm: LoadedModel, store: Store, cfg: ReplayConfig, run_id: str):
        self.lm, self.store, self.cfg, self.run_id = lm, store, cfg, run_id
        hp = lm.hparams if cfg.layer is None else lm.hparams.replace(layer=cfg.layer)
        self.editor = Editor(lm.model, lm.tokenizer, hp, keep_undo=False)
        self.layer = hp.layer
        self.norms: list[float] = []
        self.base_fluency: float | None = None

    def checkpoint(self, step: int, last_seq: int | None) -> Iterator[ReplayEvent]:
        cfg = self.cfg
        glue = evaluate_glue(
            self.lm.model,
            self.lm.tokenizer,
            cfg.glue_tasks,
            cfg.glue_limit,
            cfg.glue_scoring,
            source=cfg.glue_dir,
        )
        for task, r in glue.items():
            self.store.add_checkpoint(
                self.run_id,
                step,
                task,
                accuracy=r.accuracy,
                f1=r.f1,
                mcc=r.mcc,
                invalid=r.invalid,
                n=r.n,
                replace=True,
            )
        ent = fluency(self.lm, cfg.fluency_tokens)
        self.store.add_fluency(self.run_id, step, ent, replace=True)
        if step == 0:
            self.base_fluency = ent
        elif self.base_fluency and ent < cfg.flag_entropy_ratio * self.base_fluency:
            reason = f"fluency entropy fell to {ent:.2f} from {self.base_fluency:.2f} at the start"
            if last_seq is not None:
                self.store.flag_edit(self.run_id, last_seq, reason)
            yield ReplayWarning(f"after edit {step}: {reason}")
        yield CheckpointDone(step, {t: _glue_row(r) for t, r in glue.items()}, ent)

    def edit(self, seq: int, rec: CounterFactRecord, total: int) -> EditDone:
        t0 = time.perf_counter()
        cfg = self.cfg
        result = self.editor.compute(rec.to_request(), cfg.mode, self.layer)
        reason = norm_flag(result.update_norm, self.norms, cfg)
        refused_reason = result.unsafe_reason or (reason if cfg.guard and reason else None)
        if refused_reason is None:
            self.editor.apply(result)
            self.norms.append(result.update_norm)
        metrics = record_metrics(
            self.lm.model, self.lm.tokenizer, rec, generation=cfg.generation_metrics
        ).as_dict()
        flag = reason or result.unsafe_reason
        self.store.add_edit_result(
            self.run_id,
            seq,
            result,
            case_id=rec.case_id,
            metrics=metrics,
            flagged=flag is not None,
            flag_reason=flag,
            refused=refused_reason is not None,
            applied=refused_reason is None,
            fingerprint=self.editor.fingerprint([self.layer]),
        )
        return EditDone(
            seq=seq,
            total=total,
            case_id=rec.case_id,
            subject=rec.subject,
            target_new=rec.target_new,
            update_norm=result.update_norm,
            update_norm_ratio=result.update_norm_ratio,
            metrics=metrics,
            flagged=flag is not None,
            flag_reason=flag,
            refused=refused_reason is not None,
            seconds=time.perf_counter() - t0,
        )

    def rescore(self, records: list[CounterFactRecord], n_done: int) -> dict[str, Any]:
        done = {e.seq for e in self.store.edits(self.run_id, applied_only=True)}
        scored = []
        for seq, rec in enumerate(records[:n_done]):
            if seq not in done:
                continue
            m = record_metrics(self.lm.model, self.lm.tokenizer, rec)
            self.store.add_rescore(self.run_id, seq, m.as_dict())
            scored.append(m)
        agg = aggregate(scored)
        agg["survived"] = float(sum(1 for m in scored if m.es >= 1.0))
        return agg


def _glue_row(r: Any) -> dict[str, Any]:
    return {"accuracy": r.accuracy, "f1": r.f1, "mcc": r.mcc, "invalid": r.invalid, "n": r.n}


def _config_of(run: Any) -> ReplayConfig:
    data = json.loads(run.hparams) if isinstance(run.hparams, str) else (run.hparams or {})
    cfg = data.get("replay") if isinstance(data, dict) else None
    if not cfg:
        raise ReplayError(f"run {run.id} has no replay configuration; it cannot be resumed")
    cfg["glue_tasks"] = tuple(cfg["glue_tasks"])
    return ReplayConfig(**cfg)


def replay(
    lm: LoadedModel,
    store: Store,
    cfg: ReplayConfig | None = None,
    *,
    cancel: threading.Event | None = None,
    resume: str | None = None,
) -> Iterator[ReplayEvent]:
    """Run (or resume) a replay; yields events. ``lm`` must hold the base weights."""
    cancel = cancel or threading.Event()
    if resume is not None:
        run = store.get_run(resume)
        if run.model != lm.name:
            raise ReplayError(f"run {run.id} was made with {run.model}, not {lm.name}")
        cfg = _config_of(run)
    elif cfg is None:
        raise BadRequestError("replay needs a ReplayConfig or a run id to resume")
    loaded = load_counterfact(cfg.dataset, limit=cfg.n_edits)
    records = loaded.records
    total = len(records)
    if total == 0:
        raise BadRequestError(f"no usable CounterFact records in {cfg.dataset!r}")
    if resume is None:
        probe = Editor(lm.model, lm.tokenizer, lm.hparams, keep_undo=False)
        layer = cfg.layer if cfg.layer is not None else lm.hparams.layer
        run = store.create_run(
            model=lm.name,
            kind="replay",
            mode=cfg.mode,
            preset=lm.hparams.name,
            hparams={"hparams": lm.hparams.to_dict(), "replay": cfg.to_dict()},
            data_source=cfg.dataset,
            n_edits_planned=total,
            glue_every=cfg.glue_every,
            glue_tasks=list(cfg.glue_tasks),
            glue_limit=cfg.glue_limit,
            guard=cfg.guard,
            base_fingerprint=probe.fingerprint([layer]),
        )
    state = _Run(lm, store, cfg, run.id)
    with store.acquire_writer(run.id):
        try:
            yield from _drive(state, records, total, resume is not None, cancel, loaded.skipped)
        except BaseException as exc:
            store.set_status(
                run.id,
                "failed" if isinstance(exc, Exception) else "interrupted",
                error=str(exc)[:500],
            )
            raise


def _drive(
    st: _Run,
    records: list[CounterFactRecord],
    total: int,
    resuming: bool,
    cancel: threading.Event,
    skipped: list[Any],
) -> Iterator[ReplayEvent]:
    store, cfg, run_id = st.store, st.cfg, st.run_id
    for case_id, why in skipped:
        yield ReplayWarning(f"skipped CounterFact record {case_id}: {why}")
    start = 0
    if resuming:
        run = store.get_run(run_id)
        if st.editor.fingerprint([st.layer]) != run.base_fingerprint:
            raise ReplayError("the loaded model is not the base model this run started from")
        for e, u, v in store.iter_factors(run_id):
            st.editor.apply_factors(e.layer, u, v, force=True)
            st.norms.append(float(e.update_norm or 0.0))
        last = store.last_edit(run_id)
        if last is not None and last.fingerprint != st.editor.fingerprint([st.layer]):
            raise ReplayError(
                "rebuilt weights do not match the stored fingerprint of edit "
                f"{last.seq}; the run cannot be resumed onto the same weights"
            )
        start = store.next_seq(run_id)
        base = [c for c in store.checkpoints(run_id, task="fluency") if c.step == 0]
        st.base_fluency = base[0].value if base else None
        store.set_status(run_id, "running")
    yield ReplayStarted(run_id, total, start)
    steps_done = {c.step for c in store.checkpoints(run_id)}
    if 0 not in steps_done:
        yield from st.checkpoint(0, None)
    elif start and start not in steps_done and (start % cfg.glue_every == 0 or start == total):
        yield from st.checkpoint(start, start - 1)
    for seq in range(start, total):
        if cancel.is_set():
            store.set_status(run_id, "cancelled")
            yield ReplayFinished(run_id, "cancelled", {"edits_done": seq})
            return
        ev = st.edit(seq, records[seq], total)
        yield ev
        if ev.flagged:
            yield ReplayWarning(f"edit {seq} (case {ev.case_id}) flagged: {ev.flag_reason}")
        step = seq + 1
        if step % cfg.glue_every == 0 or step == total:
            yield from st.checkpoint(step, seq)
    summary = st.rescore(records, total) if cfg.rescore else {}
    summary["edits_done"] = total
    store.set_status(run_id, "finished")
    yield ReplayFinished(run_id, "finished", summary)
