"""What a replay checks before it resumes or extends a run: the data it edits and scores
(their fingerprints), the statistics it edits with, the templates kept with the run;
and the rebuild of its weights from the stored steps (:func:`rebuild`).

:func:`evals.replay.replay` calls these; a check raises :class:`ReplayError` (nothing
written) or returns the notes the replay yields as warnings.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from typing import Any

from rome import Editor
from rome.errors import BadRequestError, RomeError
from rome.methods import LayerUpdate, Update, get_method

from .counterfact import CounterFactRecord
from .glue import load_glue
from .protocols import FLUENCY_TASK, PERPLEXITY_TASK
from .run_state import RunState, run_layers
from .sink import ReplaySink, RunRow
from .spec import ReplayConfig, RunSpec


class ReplayError(RomeError):
    """A replay that cannot start or resume (wrong model, fingerprint mismatch...)."""


class ResumeRefused(ReplayError):
    """A resume refused before anything is written: the run is left as it was."""


def digest(obj: Any) -> str:
    """A short hash of a JSON-serialisable object (its keys sorted)."""
    return hashlib.sha256(json.dumps(obj, sort_keys=True).encode()).hexdigest()[:16]


def dataset_fingerprint(records: Sequence[CounterFactRecord]) -> str:
    """A hash of the records a run edits (their content, in order)."""
    return digest([r.to_dict() for r in records])


def glue_fingerprint(cfg: ReplayConfig) -> str:
    """A hash of the GLUE examples a run scores."""
    return digest(
        {
            t: [(e.idx, e.label, e.text) for e in load_glue(t, cfg.glue_dir, cfg.glue_limit)]
            for t in cfg.glue_tasks
        }
    )


def covariance_fingerprint(ed: Editor, cfg: ReplayConfig) -> str:
    """The fingerprint of the statistics of every layer the run edits (one layer: as before;
    "" for a method that reads none: ``needs_c0`` false)."""
    if not get_method(cfg.method).capabilities.needs_c0:
        return ""
    prints = [ed.caches.stats_fingerprint(layer) for layer in run_layers(ed, cfg)]
    return prints[0] if len(prints) == 1 else digest(prints)


def freeze_templates(store: ReplaySink, run: RunRow, ed: Editor) -> Editor:
    """Store the context templates in use with a run that has none stored."""
    hp = ed.hp.replace(context_templates=list(ed.templates()))
    store.update_run(run.id, hparams=RunSpec.of(run).with_hparams(hp).to_dict())
    ed.hp = hp
    return ed


def check_covariance(store: ReplaySink, run: RunRow, ed: Editor, cfg: ReplayConfig) -> list[str]:
    """Warn when the statistics here are not the ones the run started with (they are
    sampled, so another machine may have others); a run without a record gets one."""
    now = covariance_fingerprint(ed, cfg)
    if cfg.covariance_fingerprint == now:
        return []
    if cfg.covariance_fingerprint is None:
        cfg.covariance_fingerprint = now
        stored = RunSpec.of(store.get_run(run.id)).with_replay(cfg)
        store.update_run(run.id, hparams=stored.to_dict())
        return [
            "this run stored no covariance fingerprint; the statistics used from now on "
            f"({now}) are recorded with it"
        ]
    return [
        f"the covariance statistics differ from the ones this run started with "
        f"({cfg.covariance_fingerprint} -> {now}); the next edits use these. To keep the "
        "run's own, copy the statistics file of the machine it started on into this cache"
    ]


def check_extension(run: RunRow, cfg: ReplayConfig, records: list[CounterFactRecord]) -> list[str]:
    """Whether the run can go on to ``records``: the ones it edited must come first,
    unchanged. Writes nothing (:func:`extend` does, under the writer lock)."""
    planned = cfg.n_edits
    if len(records) <= planned:
        raise BadRequestError(
            f"{cfg.dataset!r} holds no usable records beyond the {planned} run {run.id} planned"
        )
    return check_same_data(cfg, records[:planned])


def extend(
    store: ReplaySink, run_id: str, cfg: ReplayConfig, records: list[CounterFactRecord]
) -> str:
    """Plan the run's next records, with the status ``running``, in one transaction
    (a run killed after it is resumable: never ``finished`` with edits to go)."""
    planned = cfg.n_edits
    cfg.n_edits = len(records)
    cfg.dataset_fingerprint = dataset_fingerprint(records)
    store.set_status(
        run_id,
        "running",
        n_edits_planned=len(records),
        hparams=RunSpec.of(store.get_run(run_id)).with_replay(cfg).to_dict(),
    )
    return f"run {run_id} extended from {planned} to {len(records)} edits"


def check_same_data(cfg: ReplayConfig, records: list[CounterFactRecord]) -> list[str]:
    """Refuse a resume onto changed data; returns warnings for runs without fingerprints."""
    notes = []
    now = dataset_fingerprint(records)
    if cfg.dataset_fingerprint is None:
        notes.append("this run stored no dataset fingerprint; the records were not checked")
    elif now != cfg.dataset_fingerprint:
        raise ReplayError(
            f"the CounterFact records in {cfg.dataset!r} changed since the run started "
            f"(fingerprint {cfg.dataset_fingerprint} -> {now}); resume needs the same data"
        )
    if cfg.glue_fingerprint is not None:
        glue_now = glue_fingerprint(cfg)
        if glue_now != cfg.glue_fingerprint:
            where = cfg.glue_dir or "the bundled subsets"
            raise ReplayError(
                f"the GLUE examples in {where} changed since the run started "
                f"(fingerprint {cfg.glue_fingerprint} -> {glue_now}); resume needs the same data"
            )
    return notes


def rebuild(st: RunState) -> int:
    """Apply the stored updates in order onto the base weights; the next seq to run."""
    store, run_id = st.store, st.run_id
    run = store.get_run(run_id)
    if st.editor.fingerprint(st.layers) != run.base_fingerprint:
        raise ResumeRefused("the loaded model is not the base model this run started from")
    rho: float | None = None
    keyed = st.method.stores_keys(st.method.settings(st.editor.hp, st.options))
    for step in store.iter_steps(run_id):
        if step.method != st.method.name:
            raise ResumeRefused(
                f"step {step.step} of run {run_id} was made by {step.method}, "
                f"not {st.method.name}: the method's state does not match the run"
            )
        keyless = [x.layer for x in step.layers if keyed and x.keys is None]
        if keyless:  # its Σ KKᵀ would be rebuilt short: later steps would differ
            raise ResumeRefused(
                f"step {step.step} of run {run_id} has no stored keys for layer(s) "
                f"{', '.join(map(str, keyless))}: {st.method.name}'s carried state cannot "
                "be rebuilt, so the run cannot resume onto the state it had"
            )
        layers = [LayerUpdate(x.layer, x.weight_name, x.U, x.V, x.keys) for x in step.layers]
        st.editor.apply_step(Update(step.method, layers, []), force=True)
        st.norms.append(float(step.edits[0].update_norm or 0.0))
        rho = step.edits[-1].record.get("norm_anchor", rho)
    if rho is not None:  # the ρ the earlier edits were anchored to, not a new calibration
        st.editor.use_norm_anchor(st.layer, rho)
    last = store.last_edit(run_id)
    st.last_step_start = None if last is None else last.step_index
    if last is not None and last.fingerprint != st.editor.fingerprint(st.layers):
        raise ResumeRefused(
            "rebuilt weights do not match the stored fingerprint of edit "
            f"{last.seq}; the run cannot be resumed onto the same weights"
        )
    for c in store.checkpoints(run_id):
        if c.step == 0 and c.task == FLUENCY_TASK:
            st.base_fluency = c.value
        if c.step == 0 and c.task == PERPLEXITY_TASK:
            st.base_ppl = (c.extra or {}).get("perplexity")
    store.set_status(run_id, "running")
    return 0 if last is None else last.seq + 1
