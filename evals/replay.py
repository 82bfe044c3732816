"""Sequential replay: N CounterFact edits applied in order to one model, evaluated as it goes.

``replay`` is a generator of events (a CLI or a TUI consumes them). Every
finished edit is committed to the store with its factors, the weight
fingerprint after it, the CounterFact record it came from, its metrics before
(``pre``) and after the edit, and the cumulative drift of the edited matrix,
so a killed run loses nothing finished. Resuming rebuilds the weights from
the base model plus the stored updates in order, checks the fingerprint and
the data the run was started on, and goes on from the next edit.
"""

from __future__ import annotations

import logging
import signal
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from rome import Editor, LoadedModel
from rome.errors import BadRequestError, UnsupportedArchitectureError
from rome.hparams import EditHparams, method_preset
from rome.methods import Capabilities, get_method
from rome.methods.alphaedit_state import start_from

from .counterfact import CounterFactRecord, LoadResult
from .datasets import load_records
from .events import (
    CheckpointDone,
    EditDone,
    ReplayEvent,
    ReplayFinished,
    ReplayStarted,
    ReplayWarning,
)
from .figures import stored_figures
from .flags import fluency_flag, norm_flag, perplexity_flag
from .glue import evaluate_glue
from .metrics import aggregate, record_metrics
from .probes import FLUENCY_PROMPTS, fluency, perplexity
from .protocols import FLUENCY_TASK, PERPLEXITY_TASK, RETENTION_TASK
from .resume import (
    ReplayError,
    ResumeRefused,
    check_covariance,
    check_extension,
    check_same_data,
    covariance_fingerprint,
    dataset_fingerprint,
    extend,
    freeze_templates,
    glue_fingerprint,
    rebuild,
)
from .retention import first_edits, retention_checkpoint
from .run_state import RunState, run_layers, run_options
from .sink import ReplaySink, RunRow
from .spec import ReplayConfig, RunSpec
from .steps import edit_step
from .zsre import ZsreRecord, record_of

log = logging.getLogger(__name__)

__all__ = [
    "FLUENCY_PROMPTS",
    "PERPLEXITY_TASK",
    "CheckpointDone",
    "EditDone",
    "ReplayConfig",
    "ReplayError",
    "ReplayEvent",
    "ReplayFinished",
    "ReplayStarted",
    "ReplayWarning",
    "fluency",
    "fluency_flag",
    "norm_flag",
    "perplexity_flag",
    "replay",
]


def _record_of(data: dict[str, Any]) -> CounterFactRecord:
    return record_of(data)


class _Run(RunState):
    """A replay's :class:`~evals.run_state.RunState` and its checkpoints and re-scoring."""

    def checkpoint(self, step: int, last_seq: int | None) -> Iterator[ReplayEvent]:
        cfg, model, tok = self.cfg, self.lm.model, self.lm.tokenizer
        glue = evaluate_glue(
            model,
            tok,
            cfg.glue_tasks,
            cfg.glue_limit,
            cfg.glue_scoring,
            source=cfg.glue_dir,
            calibration=cfg.glue_calibration,
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
                extra={"calibration": cfg.glue_calibration, **r.per_example()},
                replace=True,
            )
        ent = fluency(model, tok, cfg.fluency_tokens)
        self.store.add_checkpoint(self.run_id, step, FLUENCY_TASK, value=ent, replace=True)
        reasons = []
        if step == 0:
            self.base_fluency = ent
        elif (why := fluency_flag(ent, self.base_fluency, cfg)) is not None:
            reasons.append(why)
        ppl = None
        if cfg.perplexity:
            p = perplexity(model, tok)
            ppl = p.perplexity
            self.store.add_checkpoint(
                self.run_id,
                step,
                PERPLEXITY_TASK,
                value=p.nll,
                n=p.n_tokens,
                extra={"perplexity": ppl},
                replace=True,
            )
            if step == 0:
                self.base_ppl = ppl
            elif (why := perplexity_flag(ppl, self.base_ppl, cfg)) is not None:
                reasons.append(why)
        for reason in reasons:
            if last_seq is not None:
                self.store.flag_edit(self.run_id, last_seq, reason)
            yield ReplayWarning(f"after edit {step}: {reason}")
        held = retention_checkpoint(model, tok, self.store, self.run_id, step, cfg.retention_size)
        retention = held.as_dict() if held is not None else None
        yield CheckpointDone(step, {t: _glue_row(r) for t, r in glue.items()}, ent, ppl, retention)

    def stored_records(self, records: list[CounterFactRecord]) -> Iterator[tuple[int, Any]]:
        """(seq, record) of every applied edit, from the record stored with it.

        Runs from before records were stored fall back to the dataset, only
        where the case id still matches.
        """
        for e in self.store.edits(self.run_id, applied_only=True):
            stored = (e.record or {}).get("counterfact")
            if stored:
                yield e.seq, _record_of(stored)
            elif e.seq < len(records) and records[e.seq].case_id == e.case_id:
                yield e.seq, records[e.seq]
            else:
                log.warning("edit %d: no stored record and the dataset differs; skipped", e.seq)

    def rescore(self, records: list[CounterFactRecord]) -> dict[str, Any]:
        scored = []
        for seq, rec in self.stored_records(records):
            m = record_metrics(self.lm.model, self.lm.tokenizer, rec)
            self.store.add_rescore(self.run_id, seq, m.as_dict())
            scored.append(m)
        agg: dict[str, Any] = {"final": aggregate(scored)}
        agg["survived"] = float(sum(1 for m in scored if m.es >= 1.0))
        return agg


def _glue_row(r: Any) -> dict[str, Any]:
    return {"accuracy": r.accuracy, "f1": r.f1, "mcc": r.mcc, "invalid": r.invalid, "n": r.n}


def _config_of(run: RunRow) -> ReplayConfig:
    cfg = RunSpec.of(run).replay
    if cfg is None:
        raise ReplayError(f"run {run.id} has no replay configuration; it cannot be resumed")
    return cfg


def _hparams_of(run: RunRow, lm: LoadedModel) -> EditHparams:
    """The preset the run was started with (so a resume edits exactly as before)."""
    return RunSpec.of(run).edit_hparams(lm.hparams)


def _editor_for(lm: LoadedModel, hp: EditHparams, cfg: ReplayConfig) -> Editor:
    """The one editor of a replay (its caches: templates, covariance, method state)."""
    if cfg.batch_size < 1:
        raise BadRequestError(f"the batch size must be at least 1, not {cfg.batch_size}")
    method = get_method(cfg.method)
    if not method.capabilities.batched and cfg.batch_size != 1:
        raise BadRequestError(
            f"{method.name} edits one request at a time: use --batch-size 1, or a batched method"
        )
    hp = hp if cfg.layer is None else hp.replace(layer=cfg.layer)
    return Editor(lm.model, lm.tokenizer, hp, keep_undo=False)


def replay(
    lm: LoadedModel,
    store: ReplaySink,
    cfg: ReplayConfig | None = None,
    *,
    cancel: threading.Event | None = None,
    resume: str | None = None,
    hparams: EditHparams | None = None,
    rescore_finished: bool = False,
    extend_to: int | None = None,
) -> Iterator[ReplayEvent]:
    """Run (or resume) a replay; yields events. ``lm`` must hold the base weights.

    ``hparams`` (default ``lm.hparams``) is the preset a new run edits with;
    a resumed run always edits with the preset stored with it. Resuming a
    finished run does nothing unless ``rescore_finished``, or ``extend_to``
    (more edits than the run planned: the next records of the same dataset,
    whose first ones must be the records the run already edited).
    """
    cancel = cancel or threading.Event()
    notes: list[str] = []
    if extend_to is not None and resume is None:
        raise BadRequestError("extending a run needs the run to resume")
    if resume is not None:
        run = store.get_run(resume)
        cfg, hp = _resumable(run, lm, extend_to)
        if run.status == "finished" and not rescore_finished and extend_to is None:
            yield ReplayWarning(f"run {run.id} is already finished; nothing to do")
            yield ReplayFinished(run.id, "finished", stored_figures(store, run.id))
            return
        ed = _resumed_editor(store, run, lm, hp, cfg, notes)
    elif cfg is None:
        raise BadRequestError("replay needs a ReplayConfig or a run id to resume")
    else:
        hp = hparams or method_preset(lm.hparams, cfg.method)
        ed = _new_editor(lm, hp, cfg)
    loaded = _load(lm, cfg, extend_to)
    records = loaded.records
    if resume is not None:
        notes += _resume_notes(store, run, ed, cfg, records, extend_to)
    else:
        run = _create_run(store, lm, cfg, ed, hp, records)
    state = _Run(lm, store, cfg, run.id, ed)
    resuming, extending = resume is not None, resume is not None and extend_to is not None
    yield from _locked(state, records, notes, resuming, extending, cancel, loaded.skipped)


def _resumable(
    run: RunRow, lm: LoadedModel, extend_to: int | None
) -> tuple[ReplayConfig, EditHparams]:
    """The settings and preset of a run to resume on ``lm`` (refused: another model, no
    replay settings, an extension to no more edits than it plans)."""
    if run.model != lm.name:
        raise ReplayError(f"run {run.id} was made with {run.model}, not {lm.name}")
    cfg = _config_of(run)
    hp = _hparams_of(run, lm)
    if extend_to is not None and extend_to <= cfg.n_edits:
        raise BadRequestError(
            f"run {run.id} already plans {cfg.n_edits} edits; extend it to more than that"
        )
    return cfg, hp


def _resumed_editor(
    store: ReplaySink,
    run: RunRow,
    lm: LoadedModel,
    hp: EditHparams,
    cfg: ReplayConfig,
    notes: list[str],
) -> Editor:
    """The editor of a resumed run: its initial state put back, the templates it edits
    with stored with it when it kept none (and a note of that in ``notes``)."""
    ed = _editor_for(lm, hp, cfg)
    if cfg.initial_state:
        start_from(ed, cfg.method, cfg.initial_state, cfg.initial_state_sha256 or "")
    if hp.context_templates is None:
        ed = freeze_templates(store, run, ed)
        notes.append(
            "this run stored no context templates (made before they were kept with "
            "the run): the ones sampled here are used from now on and stored with it"
        )
    return ed


def _new_editor(lm: LoadedModel, hp: EditHparams, cfg: ReplayConfig) -> Editor:
    """The editor of a new run; refused before the run exists where the method cannot edit
    this model or the initial state does not fit (then kept as an absolute path and hash)."""
    ed = _editor_for(lm, hp, cfg)
    method = get_method(cfg.method)
    why = method.cannot_edit(ed.context(method), method.settings(ed.hp, run_options(cfg)))
    if why is not None:  # refused before the run exists (UltraEdit on GPT-2)
        raise UnsupportedArchitectureError(why)
    if cfg.initial_state:  # refused here, before the run exists, when it does not fit
        cfg.initial_state = str(Path(cfg.initial_state).expanduser().absolute())
        cfg.initial_state_sha256 = start_from(ed, cfg.method, cfg.initial_state)
    return ed


def _load(lm: LoadedModel, cfg: ReplayConfig, extend_to: int | None) -> LoadResult:
    """The records the run edits (``extend_to`` of them when extending); none: refused."""
    loaded = load_records(
        cfg.dataset, extend_to or cfg.n_edits, lm.tokenizer, order_seed=cfg.order_seed
    )
    if len(loaded.records) == 0:
        why = "; ".join(f"case {c}: {w}" for c, w in loaded.skipped[:3])
        raise BadRequestError(
            f"no usable {loaded.kind} records in {cfg.dataset!r}"
            + (f" ({len(loaded.skipped)} skipped; {why})" if why else "")
        )
    return loaded


def _resume_notes(
    store: ReplaySink,
    run: RunRow,
    ed: Editor,
    cfg: ReplayConfig,
    records: list[CounterFactRecord],
    extend_to: int | None,
) -> list[str]:
    """A resume's checks of its data and statistics: refused on changed data, else notes."""
    if extend_to is not None:
        notes = check_extension(run, cfg, records)
    else:
        notes = check_same_data(cfg, records)
    return notes + check_covariance(store, run, ed, cfg)


def _create_run(
    store: ReplaySink,
    lm: LoadedModel,
    cfg: ReplayConfig,
    ed: Editor,
    hp: EditHparams,
    records: list[CounterFactRecord],
) -> RunRow:
    """A new run in the store, with the fingerprints of its data and statistics and the
    templates it edits with (``hp``: the preset before the run's ``layer``)."""
    cfg.dataset_fingerprint = dataset_fingerprint(records)
    cfg.glue_fingerprint = glue_fingerprint(cfg)
    caps = _keep_templates(ed, cfg)
    hp = ed.hp if cfg.layer is None else ed.hp.replace(layer=hp.layer)
    cfg.covariance_fingerprint = covariance_fingerprint(ed, cfg)
    return store.create_run(
        model=lm.name,
        kind="replay",
        mode=cfg.mode if caps.key_modes else cfg.method,
        preset=hp.name,
        hparams=RunSpec.new(hp, cfg).to_dict(),
        data_source=cfg.dataset,
        n_edits_planned=len(records),
        glue_every=cfg.glue_every,
        glue_tasks=list(cfg.glue_tasks),
        glue_limit=cfg.glue_limit,
        guard=cfg.guard,
        base_fingerprint=ed.fingerprint(run_layers(ed, cfg)),
    )


def _keep_templates(ed: Editor, cfg: ReplayConfig) -> Capabilities:
    """Sample the templates a new run edits with into the editor's preset (kept with the
    run); the method's capabilities."""
    if ed.hp.context_templates is None:
        # Sampled templates depend on the machine (thread count, BLAS): kept with the
        # run, so a resume anywhere edits with the same ones.
        ed.hp = ed.hp.replace(context_templates=ed.templates())
    caps = get_method(cfg.method).capabilities
    if caps.templates == "family" and ed.hp.family_context_templates is None:
        from rome.methods.family.templates import family_templates

        ed.hp = ed.hp.replace(family_context_templates=family_templates(ed))
    return caps


def _locked(
    st: _Run,
    records: list[CounterFactRecord],
    notes: list[str],
    resuming: bool,
    extending: bool,
    cancel: threading.Event,
    skipped: list[Any],
) -> Iterator[ReplayEvent]:
    """The run driven under its writer lock (an extension planned first); a failure or
    an interruption is stored as the run's status, a refused resume leaves it as it was."""
    store, run_id = st.store, st.run_id
    with store.acquire_writer(run_id):
        if extending:
            notes.append(extend(store, run_id, st.cfg, records))
        try:
            for note in notes:
                yield ReplayWarning(note)
            yield from _drive(st, records, len(records), resuming, cancel, skipped)
        except ResumeRefused:
            raise  # nothing was written: the run keeps its status
        except BaseException as exc:
            store.set_status(
                run_id,
                "failed" if isinstance(exc, Exception) else "interrupted",
                error=_stopped_by(exc),
            )
            raise


def _stopped_by(exc: BaseException) -> str:
    """What stopped a run, for its ``error`` field: the exception's message; Ctrl-C's
    bare ``KeyboardInterrupt`` is SIGINT (SIGTERM's handler says ``signal 15``)."""
    if str(exc):
        return str(exc)[:500]
    if isinstance(exc, KeyboardInterrupt):
        return f"signal {int(signal.SIGINT)}"
    return type(exc).__name__


def _expected(st: _Run, step: int) -> set[str]:
    """The rows a complete checkpoint after ``step`` edits holds: every GLUE task,
    fluency, perplexity when on, and retention when on and an edit is there to keep."""
    cfg = st.cfg
    tasks = {*cfg.glue_tasks, FLUENCY_TASK, *([PERPLEXITY_TASK] if cfg.perplexity else [])}
    if step > 0 and cfg.retention_size > 0 and first_edits(st.store, st.run_id, 1):
        tasks.add(RETENTION_TASK)
    return tasks


def _checkpoint_due(st: _Run, end: int, total: int, rows: dict[int, set[str]]) -> bool:
    """Whether the run checkpoints after the step ending at ``end`` (the rule of the
    loop in :func:`_drive`: the step crossed a multiple of ``glue_every``, or it is the
    last; a batched step need not end on the multiple), or began to."""
    every = st.cfg.glue_every
    first = st.last_step_start if st.last_step_start is not None else end - 1
    return end in rows or end == total or end // every > first // every


def _drive(
    st: _Run,
    records: list[CounterFactRecord],
    total: int,
    resuming: bool,
    cancel: threading.Event,
    skipped: list[Any],
) -> Iterator[ReplayEvent]:
    store, cfg, run_id = st.store, st.cfg, st.run_id
    kind = "zsRE" if records and isinstance(records[0], ZsreRecord) else "CounterFact"
    for case_id, why in skipped:
        yield ReplayWarning(f"skipped {kind} record {case_id}: {why}")
    start = rebuild(st) if resuming else 0
    yield ReplayStarted(run_id, total, start)
    # A checkpoint killed or failed half-way, or never begun (a kill right after its
    # step's commit), lacks some rows: done again, on the weights it measures (the
    # last step's, where the run stopped).
    rows: dict[int, set[str]] = {}
    for c in store.checkpoints(run_id):
        rows.setdefault(c.step, set()).add(c.task)
    if 0 not in rows or (start == 0 and not _expected(st, 0) <= rows[0]):
        yield from st.checkpoint(0, None)
    elif (
        start
        and _checkpoint_due(st, start, total, rows)
        and not _expected(st, start) <= rows.get(start, set())
    ):
        yield from st.checkpoint(start, start - 1)
    seq = start
    while seq < total:
        if cancel.is_set():
            store.set_status(run_id, "cancelled")
            yield ReplayFinished(run_id, "cancelled", {"edits_done": seq})
            return
        batch = records[seq : seq + cfg.batch_size]
        events = edit_step(st, seq, batch, total)
        for ev in events:
            yield ev
        if events[-1].flagged:
            ev = events[-1]
            what = f"edit {seq}" if len(events) == 1 else f"step {seq}..{seq + len(events) - 1}"
            yield ReplayWarning(f"{what} (case {ev.case_id}) flagged: {ev.flag_reason}")
        end = seq + len(events)
        if end // cfg.glue_every > seq // cfg.glue_every or end == total:
            yield from st.checkpoint(end, end - 1)
        seq = end
    if cfg.rescore:
        st.rescore(records)
    store.set_status(run_id, "finished")
    yield ReplayFinished(run_id, "finished", stored_figures(store, run_id))
