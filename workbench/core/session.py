"""The interactive editing session: one loaded model, compute, compare, apply,
record, undo, revert, re-apply, and a replay that gives the weights back.

(Over 500 lines, not by design: the app still has two application paths, this
Session and core/method_edits.py; folding them into one (issue 28's open part)
is what shrinks this file, and splitting it before that would only move the twin
code around.)

No Textual and no rich here: the app calls these methods from thread workers,
and tests can call them directly. The engine and the store are reached only
through their public functions. Methods that change the weights hold the
session's lock and bump :attr:`Session.version`; :meth:`Session.apply_step`
applies and records an edit of any method (ROME's here, the batch methods'
from :mod:`.method_edits`, which holds the lock through :meth:`Session.locked`).

Over 500 lines on purpose: one class whose methods share that lock, the
version counter and the session run's writer lease; its records, verdicts,
history rows and the replay driver live in their own modules.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

import torch

from evals.replay import ReplayConfig, ReplayFinished
from evals.spec import RunSpec
from rome import EditHparams, Editor, EditResult, LoadedModel, RomeError, load_model
from rome.bundle import CONVERSION_PHASE, conversion_pending
from rome.hparams import method_preset
from rome.methods import Update
from rome.methods.rome import update_of
from rome.progress import Progress
from rome.scoring import score_targets

from .forms import EditForm, has_key_modes
from .generation import GenerationPair, greedy
from .history import history_rows
from .records import (
    AppliedInfo,
    AppliedStep,
    EditOutcome,
    HistoryRow,
    ModelInfo,
    NormPoint,
    carried_state,
)
from .replay import ReplayHandler, replay_layer, run_replay
from .verdict import DISABLING_FRACTION, Probe, Verdict, judge

if TYPE_CHECKING:
    from workbench.store import Edit, Run, Store

log = logging.getLogger(__name__)


#: what a re-applied edit takes over from the stored one
_COPIED_EDIT_FIELDS = (
    "request",
    "mode",
    "layer",
    "weight_name",
    "case_id",
    "update_norm",
    "update_norm_ratio",
    "denominator",
    "cos_kstar_ks",
    "record",
)


class NoModelError(RomeError):
    """An action that needs a model, before one is loaded."""


class ReplayNeedsBaseError(RomeError):
    """A replay asked while the session has edits on the model."""


class NotReapplicableError(RomeError):
    """A stored edit History cannot put back on the model by itself."""


class Session:
    """One loaded model, its editor, the applied edits and their store records."""

    def __init__(self, store: Store | None = None, store_error: str | None = None):
        self.store = store
        self.store_error = store_error
        self.lm: LoadedModel | None = None
        self.editor: Editor | None = None
        self.refs: list[tuple[str, int] | None] = []  # parallel to editor.applied
        self.timeline: list[NormPoint] = []
        self.run_id: str | None = None
        self._lease: Any = None
        self._lock = threading.RLock()
        self.version = 0  # bumped whenever the weights change
        self.base_fingerprint: str | None = None  # of the preset's layer, as loaded

    # ----------------------------------------------------------- model
    @property
    def loaded(self) -> bool:
        return self.lm is not None

    def require(self) -> tuple[LoadedModel, Editor]:
        if self.lm is None or self.editor is None:
            raise NoModelError("load a model first (F2, or the Model tab)")
        return self.lm, self.editor

    @contextmanager
    def locked(self) -> Iterator[Editor]:
        """The session's one lock on the weights (re-entrant) held over the block, which
        gets the session's editor; for code beside the session that reads or writes them."""
        with self._lock:
            yield self.require()[1]

    @property
    def n_applied(self) -> int:
        return len(self.editor.applied) if self.editor is not None else 0

    def load(
        self,
        name: str,
        device: str = "auto",
        dtype: str | None = None,
        device_map: str | None = None,
        progress: Progress | None = None,
    ) -> ModelInfo:
        """Load ``name`` (``device_map``: spread it over devices with accelerate); the
        previous model (if any) and its session end. ``progress`` hears the first
        start's conversion of the embedded model as its own phase."""
        phase = CONVERSION_PHASE if progress and conversion_pending(name) else None
        if progress and phase:
            progress(phase, 0, 1)
        lm = load_model(name, device=device, dtype=dtype, device_map=device_map)
        if progress and phase:
            progress(phase, 1, 1)
        with self._lock:
            self.finish()
            self.lm = lm
            self.editor = Editor(lm.model, lm.tokenizer, lm.hparams)
            self.base_fingerprint = self.editor.fingerprint([lm.hparams.layer])
            self.refs = []
            self.timeline = []
            self.version += 1
        return self.info()

    def info(self) -> ModelInfo:
        lm, _ = self.require()
        gpu = None
        if lm.device.type == "cuda":
            gpu = int(torch.cuda.memory_allocated(lm.device))
        cov, ready = self.covariance_status(lm.hparams.layer)
        return ModelInfo(
            name=lm.name,
            source=lm.source,
            device=str(lm.device),
            dtype=str(lm.dtype).replace("torch.", ""),
            n_layers=lm.n_layers,
            layer=lm.hparams.layer,
            weight_module=lm.hparams.weight_module(),
            memory_bytes=lm.memory_bytes(),
            gpu_memory_bytes=gpu,
            default_mode=lm.hparams.default_mode,
            covariance=cov,
            covariance_ready=ready,
            notes=lm.hparams.notes,
            seconds=lm.seconds,
        )

    def covariance_status(self, layer: int) -> tuple[str, bool]:
        """A description of layer's covariance and whether it is ready (in memory or cached)."""
        lm, ed = self.require()
        hp = lm.hparams
        if hp.covariance == "identity":
            return "identity (no covariance)", True
        meta = ed.stats_meta(layer)
        if meta is not None:
            return f"{meta.corpus}: {meta.n_texts} texts, {meta.n_tokens} tokens", True
        corpus = corpus_words(hp.mom2_dataset)
        path = ed.stats_file(layer)
        if path is not None and path.is_file():
            return f"{corpus}, {hp.mom2_n_samples} texts (cached on disk)", True
        return f"{corpus}, {hp.mom2_n_samples} texts (not computed yet)", False

    def prepare(self, layer: int | None = None, progress: Progress | None = None) -> str:
        """Templates and the covariance factor for ``layer``; returns the corpus description."""
        lm, ed = self.require()
        layer = lm.hparams.layer if layer is None else layer
        ed.prepare(layer, progress)
        return ed.factor(layer).description

    # ----------------------------------------------------------- compute
    def score_probes(self, form: EditForm) -> list[Probe]:
        lm, _ = self.require()
        probes = form.probes()
        prompts: list[str] = []
        targets: list[str] = []
        true = form.request().true_object if form.target_true else None  # not end of text
        for _, text in probes:
            prompts.append(text)
            targets.append(form.target_new)
            if true:
                prompts.append(text)
                targets.append(true)
        scores = iter(score_targets(lm.model, lm.tokenizer, prompts, targets))
        out = []
        for name, text in probes:
            p_new = next(scores).prob
            p_true = next(scores).prob if true else None
            out.append(Probe(name, text, p_new, p_true))
        return out

    def _after(self, update: Update, form: EditForm) -> list[Probe] | None:
        """Probes with the update applied for a moment (then undone, bit for bit)."""
        _, ed = self.require()
        if not all(lu.is_finite() for lu in update.layers):
            return None
        ed.apply_update(update, force=True)
        try:
            for res in update.results:
                if math.isnan(res.p_new_after):  # the engine's probes, in the same trial
                    ed.score_applied(res)
            return self.score_probes(form)
        finally:
            ed.undo()

    def tried(self, outcome: EditOutcome) -> EditOutcome:
        """``outcome`` with its probes after from a trial (the update added for a moment,
        then undone), judged with them: for an outcome computed without one and not
        applied. Nothing applied."""
        with self._lock:
            if outcome.after is not None or outcome.update is None:
                return outcome
            after = self._after(outcome.update, outcome.form)
            verdict = self._judge(outcome.result, outcome.before, after)
            return dataclasses.replace(outcome, after=after, verdict=verdict)

    @property
    def disabling_ratio(self) -> float:
        lm, _ = self.require()
        return DISABLING_FRACTION * lm.hparams.max_update_ratio

    def history_norms(self, layer: int) -> list[float]:
        return [p.norm for p in self.timeline if p.active and p.layer == layer]

    def compute(
        self, form: EditForm, progress: Progress | None = None, *, trial: bool = True
    ) -> EditOutcome:
        """The update for the form's mode, with probes before and after. Nothing applied.

        The probes after (the session's and the engine's) come from one trial: the
        update added for a moment, then undone. ``trial=False`` (computing to apply at
        once) skips it: the outcome has no probes after until :meth:`apply` scores
        them on the applied weights, so computing and applying write the weight once."""
        with self._lock:
            _, ed = self.require()
            t0 = time.perf_counter()
            before = self.score_probes(form)
            upd = ed.edit(
                [form.request()],
                "rome",
                mode=form.mode,
                layer=form.layer,
                progress=progress,
                probe_after=False,  # the engine's probes after: in the session's trial
            )
            return self._outcome(form, upd, before, upd.results, t0, trial)

    def compare(self, form: EditForm, progress: Progress | None = None) -> dict[str, EditOutcome]:
        """The update in every key mode (one v* shared), each probed in one trial.
        Nothing applied."""
        with self._lock:
            _, ed = self.require()
            t0 = time.perf_counter()
            before = self.score_probes(form)
            results = ed.compare(
                form.request(), layer=form.layer, progress=progress, probe_after=False
            )
            return {
                mode: self._outcome(
                    form.with_mode(mode), update_of(res), before, results.values(), t0
                )
                for mode, res in results.items()
            }

    def _outcome(
        self,
        form: EditForm,
        update: Update,
        before: list[Probe],
        results: Iterable[EditResult],
        t0: float,
        trial: bool = True,
    ) -> EditOutcome:
        res = update.results[0]
        after = self._after(update, form) if trial else None
        others = [r for r in results if r is not res]
        verdict = self._judge(res, before, after, others)
        secs = time.perf_counter() - t0
        return EditOutcome(form, res, before, after, verdict, secs, self.version, update)

    def _judge(
        self,
        res: EditResult,
        before: list[Probe],
        after: list[Probe] | None,
        others: Sequence[EditResult] = (),
    ) -> Verdict:
        return judge(
            res,
            before,
            after,
            others=others,
            history_norms=self.history_norms(res.layer),
            disabling_ratio=self.disabling_ratio,
        )

    # ----------------------------------------------------------- apply / undo
    def generate(self, prompts: Sequence[str], max_new_tokens: int = 24) -> list[str]:
        lm, _ = self.require()
        return greedy(lm.model, lm.tokenizer, prompts, max_new_tokens)

    def cumulative_norm(self, layer: int) -> float:
        """‖W − W₀‖ at ``layer``, as the engine measures it."""
        _, ed = self.require()
        return ed.drift(layer)[0]

    def apply(
        self,
        outcome: EditOutcome,
        progress: Progress | None = None,
        generate: bool = True,
    ) -> AppliedInfo:
        """Apply a computed ROME edit through :meth:`apply_step`: its update written once
        (``Editor.apply_update``), an outcome computed without a trial scored after it, on
        the applied weights. ``progress`` may raise to cancel only before the weights change.
        """
        res = outcome.result
        done = outcome

        def settle() -> Verdict:
            nonlocal done
            if done.after is None:
                done = self._scored_after(done)
            return done.verdict

        def write(store: Store, run_id: str, seq: int, fp: str) -> None:
            v = done.verdict
            store.add_edit_result(
                run_id, seq, res, metrics=done.metrics(), flagged=v.disabling,
                flag_reason=v.summary or None, fingerprint=fp,
            )  # fmt: skip

        step = self.apply_step(
            outcome.form, outcome.update or update_of(res), settle, write,
            mode=res.mode, norm=res.update_norm, ratio=res.update_norm_ratio,
            progress=progress, generate=generate,
        )  # fmt: skip
        return AppliedInfo(
            step.number, done, step.generations, step.fingerprint, step.run_id, step.seq,
            step.store_error,
        )  # fmt: skip

    def apply_step(
        self,
        form: EditForm,
        update: Update,
        settle: Callable[[], Verdict],
        write: Callable[[Store, str, int, str], None],
        *,
        mode: str,
        norm: float,
        ratio: float,
        carrier: Editor | None = None,
        progress: Progress | None = None,
        generate: bool = True,
    ) -> AppliedStep:
        """Apply a computed ``update`` of any method as one session edit: generations
        before / after, one write of the weights (one undo entry on the session's editor),
        one stored step, one point (``mode``, ``norm``, ``ratio``) on the timeline.

        ``carrier``: unused (an editor for a method's own preset is a
        :meth:`~rome.Editor.variant` of the session's: one state). ``settle()``, on the
        applied weights, scores what is missing and returns the verdict to record;
        ``write(store, run_id, seq, fingerprint)`` stores the step's rows (the generations
        are stored here). ``progress`` may raise to cancel only before the weights
        change; a failure after undoes the step.
        """
        with self._lock:
            _, ed = self.require()
            prompts = form.generation_texts() if generate else []
            if progress:
                progress("generating before", 0, 2)
            before = self.generate(prompts) if prompts else []
            if progress:
                progress("applying", 1, 2)
            state = carried_state(ed)
            # raises UnsafeUpdateError with the weights unchanged; folds the method's state
            entry = ed.apply_step(update)
            self.version += 1
            try:
                after = self.generate(prompts) if prompts else []
                verdict = settle()
            except BaseException:
                ed.undo()  # the weights and the carried state as they were
                self.version += 1
                raise
            layers = [lu.layer for lu in update.layers]
            fp = ed.fingerprint(layers)
            pairs = [
                GenerationPair(p, b, a) for p, b, a in zip(prompts, before, after, strict=True)
            ]
            run_id, seq, err = self._record(write, fp, pairs, mode)
            self.refs.append((run_id, seq) if run_id is not None and seq is not None else None)
            req = form.request()
            label = f"{req.subject} → {req.target_new}"
            self._add_point(
                label, mode, layers[-1], norm, ratio, verdict.disabling, verdict.summary
            )
            return AppliedStep(len(self.timeline), entry, state, pairs, fp, run_id, seq, err)

    def _scored_after(self, outcome: EditOutcome) -> EditOutcome:
        """The outcome with its probes after scored on the applied weights (the engine's
        too, when it computed without a trial), judged again with them."""
        _, ed = self.require()
        res = outcome.result
        if math.isnan(res.p_new_after):
            ed.score_applied(res)
        after = self.score_probes(outcome.form)
        verdict = self._judge(res, outcome.before, after)
        return dataclasses.replace(outcome, after=after, verdict=verdict)

    def _add_point(
        self,
        label: str,
        mode: str,
        layer: int,
        norm: float,
        ratio: float,
        flagged: bool,
        reason: str,
    ) -> None:
        self.timeline.append(
            NormPoint(
                number=len(self.timeline) + 1,
                label=label,
                mode=mode,
                layer=layer,
                norm=norm,
                ratio=ratio,
                cumulative=self.cumulative_norm(layer),
                flagged=flagged,
                reason=reason,
            )
        )

    def _ensure_run(self) -> str:
        lm, ed = self.require()
        assert self.store is not None
        if self.run_id is None:
            hp = lm.hparams
            run = self.store.create_run(
                model=lm.name,
                kind="session",
                preset=hp.name,
                hparams={"hparams": hp.to_dict()},
                # the weights as loaded: the run starts when its first edit is
                # stored, after that edit was applied
                base_fingerprint=self.base_fingerprint or ed.fingerprint([hp.layer]),
                notes="interactive session (rome-workbench TUI)",
            )
            self._lease = self.store.acquire_writer(run.id)
            self.run_id = run.id
        return self.run_id

    def _record(
        self,
        write: Callable[[Store, str, int, str], None],
        fp: str,
        pairs: Sequence[GenerationPair] = (),
        what: str = "",
    ) -> tuple[str | None, int | None, str | None]:
        """Store a step in the session's run: ``write``'s rows at the next seq, then the
        generations; ``(run_id, seq, None)``, or ``(None, None, why not)``."""
        if self.store is None:
            return None, None, self.store_error or "no database open"
        from workbench.store import StoreError

        try:
            run_id = self._ensure_run()
            seq = self.store.next_seq(run_id)
            write(self.store, run_id, seq, fp)
            for g in pairs:
                self.store.add_generation(run_id, seq, g.prompt, g.before, g.after)
            return run_id, seq, None
        except StoreError as exc:
            log.warning("could not store the %s edit: %s", what, exc)
            return None, None, str(exc)

    def undo(self) -> str:
        """Undo the last applied edit (weights restored bit for bit); returns a description."""
        with self._lock:
            _, ed = self.require()
            entry = ed.undo()
            self.version += 1
            ref = self.refs.pop() if self.refs else None
            for p in reversed(self.timeline):
                if p.active:
                    p.active = False
                    break
            self._mark_undone([ref])
            req = entry.result.request if entry.result is not None else None
            what = f"{req.subject} → {req.target_new}" if req else f"layer {entry.layer}"
            return f"undid {what}"

    def revert_all(self) -> int:
        """Put the model back to its base weights; returns how many edits were undone."""
        with self._lock:
            _, ed = self.require()
            n = ed.revert_all()
            self.version += 1
            self._mark_undone(self.refs)
            self.refs = []
            for p in self.timeline:
                p.active = False
            return n

    def _mark_undone(self, refs: Iterable[tuple[str, int] | None]) -> None:
        if self.store is None:
            return
        from workbench.store import StoreError

        for ref in refs:
            if ref is None:
                continue
            try:
                self.store.mark_undone(*ref)
            except StoreError as exc:
                log.warning("could not mark %s:%s undone: %s", *ref, exc)

    def reapply(self, keys: Sequence[tuple[str, int]], progress: Progress | None = None) -> int:
        """Apply stored edits (``(run_id, seq)``, in order) onto the model; returns how many.

        ``progress`` is called before each edit and may raise to stop there.
        """
        with self._lock:
            lm, ed = self.require()
            if self.store is None:
                raise NoModelError("no database is open: nothing to re-apply from")
            edits = [self.store.edit(run_id, seq) for run_id, seq in keys]
            for edit in edits:  # checked before any weight changes
                if not edit.has_factors:  # a one-request rank-one step keeps u, v in its row
                    raise NotReapplicableError(
                        f"edit {edit.seq} of run {edit.run_id} is one request of a {edit.method} "
                        "batch: its update is the batch's, over several layers, and is not "
                        "re-applied from History; replay or extend its run instead"
                    )
            done = 0
            for i, edit in enumerate(edits):
                if progress:
                    progress("re-applying", i, len(keys))
                u, v = self.store.load_factors(edit, device=lm.device)
                ed.apply_factors(edit.layer, u, v)
                self.version += 1
                self.refs.append(self._record_reapplied(edit, u, v))
                req = edit.request
                self._add_point(
                    f"{req.get('subject')} → {req.get('target_new')}",
                    edit.mode,
                    edit.layer,
                    float(edit.update_norm or 0.0),
                    float(edit.update_norm_ratio or 0.0),
                    edit.flagged,
                    edit.flag_reason or "",
                )
                done += 1
            return done

    def _record_reapplied(
        self, edit: Edit, u: torch.Tensor, v: torch.Tensor
    ) -> tuple[str, int] | None:
        """Store a re-applied edit in this session's run; its ``(run_id, seq)``, or None."""
        _, ed = self.require()
        copied = {k: getattr(edit, k) for k in _COPIED_EDIT_FIELDS}
        metrics = {"source": "reapplied", "from": f"{edit.run_id}:{edit.seq}"}

        def write(store: Store, run_id: str, seq: int, fp: str) -> None:
            store.add_edit(run_id, seq, u=u, v=v, metrics=metrics, fingerprint=fp, **copied)

        run_id, seq, _ = self._record(write, ed.fingerprint([edit.layer]), what="re-applied")
        return (run_id, seq) if run_id is not None and seq is not None else None

    # ----------------------------------------------------------- store reads
    def history(self, model: str | None = None) -> list[HistoryRow]:
        """Every edit in the store for this model (all models before one is loaded)."""
        if self.store is None:
            return []
        if model is None and self.lm is not None:
            model = self.lm.name
        return history_rows(self.store, model, self.run_id)

    def replay_runs(self) -> list[Run]:
        if self.store is None:
            return []
        model = self.lm.name if self.lm is not None else None
        return self.store.list_runs(model=model, kind="replay")

    # ----------------------------------------------------------- replay
    def replay_layer(self, cfg: ReplayConfig | None = None, resume: str | None = None) -> int:
        """The layer the replay ``cfg`` (or the resumed run ``resume``) edits."""
        lm, _ = self.require()
        hparams = None
        if resume is not None and self.store is not None:
            hparams = self.store.get_run(resume).hparams or {}
        return replay_layer(lm, cfg, hparams)

    def replay_layers(
        self, cfg: ReplayConfig | None = None, resume: str | None = None
    ) -> list[int]:
        """Every layer the replay may write: ROME's layer and the method's edited layers."""
        lm, ed = self.require()
        layers = {self.replay_layer(cfg, resume)}
        if resume is not None and self.store is not None:
            spec = RunSpec.of(self.store.get_run(resume))
            method, hp = spec.method, spec.edit_hparams(lm.hparams)
        else:
            method = cfg.method if cfg is not None else "rome"
            hp = method_preset(lm.hparams, method)
        if not has_key_modes(method):  # a key-mode method (ROME) writes its one layer
            layers |= set(hp.edited_layers())
        return sorted(ed.check_layer(x) for x in layers)

    def run_replay(
        self,
        cfg: ReplayConfig | None,
        cancel: threading.Event,
        on_event: Callable[[object], None] | ReplayHandler,
        resume: str | None = None,
        hparams: EditHparams | None = None,
    ) -> ReplayFinished | None:
        """Run ``evals.replay.replay`` on the loaded model, then put its weights back.

        ``hparams`` (default the model's preset) is what a new run edits with.

        ``on_event`` is a :class:`ReplayHandler` (called by event type) or a
        function given every event (the app posts them to its UI thread). The
        replay edits the model in place from its base weights; afterwards the
        edited layer is restored bit for bit, so the session goes on as before.
        """
        with self._lock:
            lm, ed = self.require()
            if self.store is None:
                raise NoModelError("no database is open: a replay needs one to record its edits")
            if ed.applied:
                raise ReplayNeedsBaseError(
                    f"the model has {len(ed.applied)} applied edit(s) and a replay starts from "
                    "the base weights: revert them first (History → Revert all)"
                )
            try:
                with ed.base_weights(self.replay_layers(cfg, resume)):
                    return run_replay(
                        lm, self.store, on_event, cfg if resume is None else None,
                        resume=resume, cancel=cancel, hparams=hparams,
                    )  # fmt: skip
            finally:
                self.version += 1

    # ----------------------------------------------------------- end
    def finish(self) -> None:
        """Close this model's session run in the store (status finished, lock released)."""
        if self.store is None or self.run_id is None:
            return
        from workbench.store import StoreError

        try:
            self.store.set_status(self.run_id, "finished")
        except StoreError as exc:
            log.warning("could not close session run %s: %s", self.run_id, exc)
        if self._lease is not None:
            self._lease.release()
            self._lease = None
        self.run_id = None


def corpus_words(dataset: str) -> str:
    """The covariance corpus in words."""
    return {
        "sampled": "text sampled from the model",
        "wikipedia": "Wikipedia",
        "wikitext": "WikiText-103",
    }.get(dataset, dataset)
