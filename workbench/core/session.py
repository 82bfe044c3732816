"""The interactive editing session: one loaded model, compute, compare, apply,
record, undo, revert, re-apply, and a replay that gives the weights back.

One application path for every method: :meth:`Session.compute` asks
``Editor.edit`` for the form's method (``get_method`` behind it), :meth:`Session.apply`
writes the update once (``Editor.apply_step``: one undo entry, the method's carried
state folded) and stores it as one step (``Store.add_step``), :meth:`Session.undo`
takes it off. A method with a shipped ``<preset>-<method>`` variant computes on a
:meth:`~rome.Editor.variant` of the one editor (the same weights, applied steps and
carried state; caches of its own).

No Textual and no rich here: the app calls these methods from thread workers,
and tests can call them directly. Methods that change the weights hold the
session's lock and bump :attr:`Session.version`. The probes and the figures live in
:mod:`.outcomes`, the store side in :mod:`.session_run`, the model's facts in
:mod:`.model_facts`, the replay driver in :mod:`.replay`.
"""

from __future__ import annotations

import dataclasses
import logging
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from typing import TYPE_CHECKING

from evals.probe_after import score_applied, trial
from evals.replay import ReplayConfig, ReplayFinished
from evals.spec import RunSpec
from rome import EditHparams, Editor, EditResult, LoadedModel, RomeError, load_model
from rome.bundle import CONVERSION_PHASE, conversion_pending
from rome.methods import Update, get_method
from rome.methods.rome import update_of
from rome.progress import Progress

from .forms import EditForm
from .generation import GenerationPair, greedy
from .history import history_rows
from .method_editors import MethodEditors, method_layers
from .model_facts import covariance_status, model_info
from .outcomes import figures, form_options, score_probes, update_ratio
from .records import AppliedInfo, EditOutcome, HistoryRow, ModelInfo, NormPoint
from .replay import ReplayHandler, replay_layer, replay_layers, run_replay
from .session_run import SessionRun, reapplied_rows, step_rows
from .verdict import DISABLING_FRACTION, Probe, Verdict, judge

if TYPE_CHECKING:
    from workbench.store import Store

log = logging.getLogger(__name__)


class NoModelError(RomeError):
    """An action that needs a model, before one is loaded."""


class ReplayNeedsBaseError(RomeError):
    """A replay asked while the session has edits on the model."""


class NotReapplicableError(RomeError):
    """A stored edit History cannot put back on the model by itself."""


class Session:
    """One loaded model, its editor, the applied edits and their store records."""

    def __init__(self, store: Store | None = None, store_error: str | None = None):
        self.run = SessionRun(store, store_error)
        self.lm: LoadedModel | None = None
        self.editor: Editor | None = None
        self._editors = MethodEditors()  # a method's preset on the same edits
        self.refs: list[tuple[str, int] | None] = []  # parallel to editor.applied
        self.timeline: list[NormPoint] = []
        self._lock = threading.RLock()
        self.version = 0  # bumped whenever the weights change
        self.base_fingerprint: str | None = None  # of the preset's layer, as loaded

    # ----------------------------------------------------------- model
    @property
    def store(self) -> Store | None:
        return self.run.store

    @store.setter
    def store(self, value: Store | None) -> None:
        self.run.store = value

    @property
    def store_error(self) -> str | None:
        return self.run.store_error

    @store_error.setter
    def store_error(self, value: str | None) -> None:
        self.run.store_error = value

    @property
    def run_id(self) -> str | None:
        return self.run.run_id

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
        return model_info(*self.require())

    def covariance_status(self, layer: int) -> tuple[str, bool]:
        """A description of layer's covariance and whether it is ready (in memory or cached)."""
        return covariance_status(*self.require(), layer)

    def prepare(self, layer: int | None = None, progress: Progress | None = None) -> str:
        """Templates and the covariance factor for ``layer``; returns the corpus description."""
        lm, ed = self.require()
        layer = lm.hparams.layer if layer is None else layer
        ed.prepare(layer, progress)
        return ed.factor(layer).description

    def editor_for(self, method: str, progress: Progress | None = None) -> Editor:
        """The editor ``method`` computes on (:mod:`.method_editors`)."""
        lm, ed = self.require()
        return self._editors.get(ed, lm.hparams, method, progress)

    def method_layers(self, methods: Sequence[str]) -> dict[str, tuple[str, list[int]]]:
        """Each of ``methods``' preset and edited layers on the loaded model."""
        return method_layers(self.require()[0].hparams, methods)

    # ----------------------------------------------------------- compute
    def compute(
        self, form: EditForm, progress: Progress | None = None, *, trial: bool = True
    ) -> EditOutcome:
        """The form's method's update, with probes before and after. Nothing applied.

        The probes after are scored once, in the method's own trial (the update added
        for a moment, then put back) or, for a method without one, in the session's.
        ``trial=False`` (computing to apply at once) asks for no trial: an outcome
        without probes after gets them from :meth:`apply`, on the applied weights."""
        with self._lock:
            lm, _ = self.require()
            ed = self.editor_for(form.method, progress)
            t0 = time.perf_counter()
            before = score_probes(lm, form)
            seen: list[list[Probe]] = []
            opts = form_options(get_method(form.method), form, trial)
            upd = ed.edit(
                [form.request()], form.method, progress=progress, layer=form.layer,
                while_applied=lambda: seen.append(score_probes(lm, form)), **opts,
            )  # fmt: skip
            after = seen[0] if seen else None
            if after is None and trial:
                after = self._trial(upd, form)
            return self._outcome(ed, form, upd, before, after, t0)

    def compare(self, form: EditForm, progress: Progress | None = None) -> dict[str, EditOutcome]:
        """ROME's update in every key mode (one v* shared), each probed in one trial.
        Nothing applied."""
        with self._lock:
            lm, ed = self.require()
            t0 = time.perf_counter()
            before = score_probes(lm, form)
            results = ed.compare(
                form.request(), layer=form.layer, progress=progress, probe_after=False
            )
            out = {}
            for mode, res in results.items():
                upd, f = update_of(res), form.with_mode(mode)
                others = results.values()
                out[mode] = self._outcome(ed, f, upd, before, self._trial(upd, f), t0, others)
            return out

    def _trial(self, update: Update, form: EditForm) -> list[Probe] | None:
        lm, ed = self.require()
        return trial(ed, update, lambda: score_probes(lm, form))

    def _outcome(
        self,
        ed: Editor,
        form: EditForm,
        update: Update,
        before: list[Probe],
        after: list[Probe] | None,
        t0: float,
        others: Iterable[EditResult] = (),
    ) -> EditOutcome:
        verdict = self._judge(ed, update, before, after, others)
        secs = time.perf_counter() - t0
        ratio = update_ratio(ed, update)
        return EditOutcome(
            form, update, before, after, verdict, secs, self.version, ratio, ed.hp.name
        )

    def _judge(
        self,
        ed: Editor,
        update: Update,
        before: list[Probe],
        after: list[Probe] | None,
        others: Iterable[EditResult] = (),
    ) -> Verdict:
        res = figures(ed, update)
        return judge(
            res,
            before,
            after,
            others=[o for o in others if o is not res],
            history_norms=self.history_norms(update.layers[-1].layer),
            disabling_ratio=DISABLING_FRACTION * ed.hp.max_update_ratio,
        )

    def tried(self, outcome: EditOutcome) -> EditOutcome:
        """``outcome`` with its probes after from a trial (the update added for a moment,
        then undone), judged with them: for an outcome computed without one and not
        applied. Nothing applied."""
        with self._lock:
            if outcome.after is not None:
                return outcome
            after = self._trial(outcome.update, outcome.form)
            return self._rejudged(outcome, after)

    def _rejudged(self, outcome: EditOutcome, after: list[Probe] | None) -> EditOutcome:
        ed = self.editor_for(outcome.method)
        verdict = self._judge(ed, outcome.update, outcome.before, after)
        return dataclasses.replace(outcome, after=after, verdict=verdict)

    def history_norms(self, layer: int) -> list[float]:
        return [p.norm for p in self.timeline if p.active and p.layer == layer]

    # ----------------------------------------------------------- apply / undo
    def generate(self, prompts: Sequence[str], max_new_tokens: int = 24) -> list[str]:
        lm, _ = self.require()
        return greedy(lm.model, lm.tokenizer, prompts, max_new_tokens)

    def cumulative_norm(self, layer: int) -> float:
        """‖W − W₀‖ at ``layer``, as the engine measures it."""
        _, ed = self.require()
        return ed.drift(layer)[0]

    def apply(
        self, outcome: EditOutcome, progress: Progress | None = None, generate: bool = True
    ) -> AppliedInfo:
        """Apply a computed step of any method as one session edit: generations before /
        after, one write of its weights (``Editor.apply_step``: one undo entry, the
        method's carried state folded), one stored step, one point on the timeline.

        An outcome without probes after (computed with ``trial=False``) is scored on the
        applied weights and judged again; one without probes before (a comparison row's
        update, :meth:`MethodCompare.outcome_of`) is scored first and keeps the
        comparison's verdict. ``progress`` may raise to cancel only before the weights
        change; a failure after undoes the step.
        """
        with self._lock:
            lm, ed = self.require()
            judged = bool(outcome.before)  # else a comparison row's: its verdict stands
            if not judged:
                outcome = dataclasses.replace(outcome, before=score_probes(lm, outcome.form))
            prompts = outcome.form.generation_texts() if generate else []
            if progress:
                progress("generating before", 0, 2)
            before = self.generate(prompts) if prompts else []
            if progress:
                progress("applying", 1, 2)
            ed.apply_step(outcome.update)  # refuses an unsafe update, the weights unchanged
            self.version += 1
            try:
                after = self.generate(prompts) if prompts else []
                done = self._settled(outcome, judged)
            except BaseException:
                ed.undo()  # the weights and the carried state as they were
                self.version += 1
                raise
            pairs = [GenerationPair(*g) for g in zip(prompts, before, after, strict=True)]
            return self._recorded(done, pairs)

    def _settled(self, outcome: EditOutcome, judge_again: bool) -> EditOutcome:
        """On the applied weights: what the outcome lacks scored (a rank-one record's
        probes after, the form's), judged again with them if ``judge_again``."""
        lm, ed = self.require()
        score_applied(ed, outcome.update)
        if outcome.after is not None:
            return outcome
        after = score_probes(lm, outcome.form)
        if not judge_again:
            return dataclasses.replace(outcome, after=after)
        return self._rejudged(outcome, after)

    def _recorded(self, done: EditOutcome, pairs: list[GenerationPair]) -> AppliedInfo:
        """Store an applied outcome and put it on the timeline."""
        _, ed = self.require()
        layers = [lu.layer for lu in done.update.layers]
        fp = ed.fingerprint(layers)
        run_id, seq, err = self.run.record(self._start(), step_rows(done, fp), pairs, done.mode)
        self.refs.append((run_id, seq) if run_id is not None and seq is not None else None)
        req = done.form.request()
        v = done.verdict
        point = (done.mode, layers[-1], done.norm, done.ratio, v.disabling, v.summary)
        self._add_point(f"{req.subject} → {req.target_new}", *point)
        return AppliedInfo(len(self.timeline), done, pairs, fp, run_id, seq, err)

    def _start(self) -> tuple[str, EditHparams, str]:
        """What the session's run is made from: the model, its preset, its base fingerprint."""
        lm, ed = self.require()
        hp = lm.hparams
        return lm.name, hp, self.base_fingerprint or ed.fingerprint([hp.layer])

    def _add_point(
        self, label: str, mode: str, layer: int, norm: float, ratio: float, flagged: bool,
        reason: str,
    ) -> None:  # fmt: skip
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
            )  # fmt: skip
        )

    def undo(self) -> str:
        """Undo the last applied edit (weights and carried state restored bit for bit);
        returns a description."""
        with self._lock:
            _, ed = self.require()
            entry = ed.undo()
            self.version += 1
            ref = self.refs.pop() if self.refs else None
            for p in reversed(self.timeline):
                if p.active:
                    p.active = False
                    break
            self.run.mark_undone([ref])
            req = entry.result.request if entry.result is not None else None
            what = f"{req.subject} → {req.target_new}" if req else f"layer {entry.layer}"
            return f"undid {what}"

    def revert_all(self) -> int:
        """Put the model back to its base weights; returns how many edits were undone."""
        with self._lock:
            _, ed = self.require()
            n = ed.revert_all()
            self.version += 1
            self.run.mark_undone(self.refs)
            self.refs = []
            for p in self.timeline:
                p.active = False
            return n

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
            for i, edit in enumerate(edits):
                if progress:
                    progress("re-applying", i, len(keys))
                u, v = self.store.load_factors(edit, device=lm.device)
                ed.apply_factors(edit.layer, u, v)
                self.version += 1
                rows = reapplied_rows(edit, u, v, ed.fingerprint([edit.layer]))
                run_id, seq, _ = self.run.record(self._start(), rows, what="re-applied")
                self.refs.append((run_id, seq) if run_id is not None and seq is not None else None)
                req = edit.request
                self._add_point(
                    f"{req.get('subject')} → {req.get('target_new')}", edit.mode, edit.layer,
                    float(edit.update_norm or 0.0), float(edit.update_norm_ratio or 0.0),
                    edit.flagged, edit.flag_reason or "",
                )  # fmt: skip
            return len(edits)

    # ----------------------------------------------------------- store reads
    def history(self, model: str | None = None) -> list[HistoryRow]:
        """Every edit in the store for this model (all models before one is loaded)."""
        if self.store is None:
            return []
        if model is None and self.lm is not None:
            model = self.lm.name
        return history_rows(self.store, model, self.run_id)

    # ----------------------------------------------------------- replay
    def replay_layer(self, cfg: ReplayConfig | None = None, resume: str | None = None) -> int:
        """The layer the replay ``cfg`` (or the resumed run ``resume``) edits."""
        return replay_layer(self.require()[0], cfg, self._run_hparams(resume))

    def replay_layers(
        self, cfg: ReplayConfig | None = None, resume: str | None = None
    ) -> list[int]:
        """Every layer the replay may write: ROME's layer and the method's edited layers."""
        lm, ed = self.require()
        return replay_layers(lm, ed, cfg, self._run_hparams(resume))

    def _run_hparams(self, resume: str | None) -> dict | None:
        if resume is None or self.store is None:
            return None
        return RunSpec.of(self.store.get_run(resume)).to_dict()

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
        self.run.finish()
