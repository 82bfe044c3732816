"""The model session behind the app: load, compute, compare, apply, undo, store.

No Textual here: the app calls these methods from thread workers, and tests
can call them directly. The engine and the store are reached only through
their public functions.
"""

from __future__ import annotations

import logging
import math
import statistics
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch

from rome import Editor, EditResult, LoadedModel, RomeError, load_model
from rome.scoring import score_targets

from .format import fprob
from .forms import EditForm
from .generation import GenerationPair, greedy

if TYPE_CHECKING:
    from workbench.store import Edit, Store

log = logging.getLogger(__name__)

Progress = Callable[[str, int, int], None]

#: ‖ΔW‖ / ‖W‖ from which an update is called disabling, as a fraction of the preset's
#: ``max_update_ratio`` (the engine's refusal limit): 0.05 × 10 = 0.5 with the default
#: limit (the Hamlet case on SmolLM2: 1.48; clean edits: about 0.07).
DISABLING_FRACTION = 0.05
#: a mode whose norm is this many times the smallest mode's is called disabling.
MODE_NORM_FACTOR = 4.0
#: cos(k*, k(s)) below this warns that the original mode's denominator is small.
LOW_COS = 0.3
#: a session edit whose norm is this many times the session's median is flagged.
HISTORY_FACTOR = 4.0


class NoModelError(RomeError):
    """An action that needs a model, before one is loaded."""


class ReplayNeedsBaseError(RomeError):
    """A replay asked while the session has edits on the model."""


# --------------------------------------------------------------------------- records


@dataclass(frozen=True)
class Probe:
    """p(target_new) and p(target_true) after one prompt."""

    name: str
    text: str
    p_new: float
    p_true: float | None


@dataclass(frozen=True)
class Verdict:
    """Whether an update looks safe: level ok / warn / bad (disabling) / refused."""

    level: str
    reasons: tuple[str, ...] = ()

    @property
    def disabling(self) -> bool:
        return self.level in ("bad", "refused")

    @property
    def label(self) -> str:
        return {"ok": "ok", "warn": "check", "bad": "DISABLING", "refused": "REFUSED"}[self.level]

    @property
    def summary(self) -> str:
        return "; ".join(self.reasons)


@dataclass
class EditOutcome:
    """A computed (not yet applied) edit with its probes before and after."""

    form: EditForm
    result: EditResult
    before: list[Probe]
    after: list[Probe] | None
    verdict: Verdict
    seconds: float = 0.0
    version: int = 0  # Session.version when computed: the weights it was computed on

    @property
    def mode(self) -> str:
        return self.result.mode

    def probe(self, name: str, after: bool) -> Probe | None:
        for p in (self.after or []) if after else self.before:
            if p.name == name:
                return p
        return None

    def metrics(self) -> dict[str, Any]:
        """What the store keeps besides the engine's record."""
        out: dict[str, Any] = {
            "source": "session",
            "verdict": self.verdict.level,
            "verdict_reasons": list(self.verdict.reasons),
        }
        for when, probes in (("before", self.before), ("after", self.after or [])):
            for p in probes:
                out[f"{p.name}_p_new_{when}"] = p.p_new
                if p.p_true is not None:
                    out[f"{p.name}_p_true_{when}"] = p.p_true
        for name, text in self.form.probes():
            out[f"{name}_text"] = text
        return out


@dataclass
class ModelInfo:
    name: str
    source: str
    device: str
    dtype: str
    n_layers: int
    layer: int
    weight_module: str
    memory_bytes: int
    gpu_memory_bytes: int | None
    default_mode: str
    covariance: str
    covariance_ready: bool
    notes: str
    seconds: float


@dataclass
class AppliedInfo:
    number: int  # this session's edit number (1-based)
    outcome: EditOutcome
    generations: list[GenerationPair]
    fingerprint: str
    run_id: str | None
    seq: int | None
    store_error: str | None = None


@dataclass
class NormPoint:
    """One edit on the Weights chart."""

    number: int
    label: str
    mode: str
    layer: int
    norm: float
    ratio: float
    cumulative: float
    flagged: bool
    active: bool = True
    reason: str = ""


@dataclass
class HistoryRow:
    run_id: str
    run_kind: str
    run_status: str
    seq: int
    created_at: str
    prompt: str
    subject: str
    target_new: str
    target_true: str | None
    mode: str
    layer: int
    norm: float | None
    ratio: float | None
    denominator: float | None
    cos: float | None
    flagged: bool
    flag_reason: str | None
    refused: bool
    applied: bool
    has_factors: bool
    in_session: bool
    metrics: dict[str, Any] = field(default_factory=dict)
    record: dict[str, Any] = field(default_factory=dict)

    @property
    def key(self) -> str:
        return f"{self.run_id}:{self.seq}"

    @property
    def state(self) -> str:
        if self.refused:
            return "refused"
        return "applied" if self.applied else "undone"


# --------------------------------------------------------------------------- verdicts


def judge(
    result: EditResult,
    before: Sequence[Probe] = (),
    after: Sequence[Probe] | None = None,
    others: Iterable[EditResult] = (),
    history_norms: Sequence[float] = (),
    disabling_ratio: float = 0.5,
) -> Verdict:
    """Say whether an update looks disabling, and why (see the thresholds above)."""
    if result.unsafe_reason:
        return Verdict("refused", (result.unsafe_reason,))
    bad: list[str] = []
    warn: list[str] = []
    ratio = result.update_norm_ratio
    if ratio >= disabling_ratio:
        bad.append(f"‖ΔW‖ is {ratio:.2f}× ‖W‖")
    norms = [o.update_norm for o in others if o.mode != result.mode and o.update_norm > 0]
    if norms and result.update_norm >= MODE_NORM_FACTOR * min(norms):
        low = min((o for o in others if o.mode != result.mode), key=lambda o: o.update_norm)
        bad.append(f"‖ΔW‖ is {result.update_norm / low.update_norm:.1f}× {low.mode}'s")
    if len(history_norms) >= 3:
        med = statistics.median(history_norms)
        if med > 0 and result.update_norm > HISTORY_FACTOR * med:
            bad.append(f"‖ΔW‖ is {result.update_norm / med:.1f}× this session's median")
    if result.mode == "original" and result.cos_kstar_ks < LOW_COS:
        (bad if bad else warn).append(
            f"cos(k*, k(s)) = {result.cos_kstar_ks:.2f} is low: small denominator"
        )
    if after is not None:
        b = {p.name: p for p in before}
        for p in after:
            q = b.get(p.name)
            if p.name == "neighbour" and q and q.p_true is not None and p.p_true is not None:
                if q.p_true > 0.05 and p.p_true < 0.5 * q.p_true:
                    warn.append(f"neighbour p(true) fell {q.p_true:.2f}→{p.p_true:.2f}")
            if p.name == "prompt" and q and p.p_new <= q.p_new:
                warn.append("p(new) on the prompt did not rise")
            elif p.name == "prompt" and p.p_new < 0.5:
                warn.append(
                    f"weak on the bare prompt: p(new) {fprob(p.p_new)} "
                    f"(templated {fprob(result.p_new_after_templated)})"
                )
            if p.name == "paraphrase" and p.p_new < 0.1 and (q is None or p.p_new <= 2 * q.p_new):
                warn.append("does not carry over to the paraphrase")
    if bad:
        return Verdict("bad", tuple(bad + warn))
    if warn:
        return Verdict("warn", tuple(warn))
    return Verdict("ok", ())


# --------------------------------------------------------------------------- the session


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

    # ----------------------------------------------------------- model
    @property
    def loaded(self) -> bool:
        return self.lm is not None

    def require(self) -> tuple[LoadedModel, Editor]:
        if self.lm is None or self.editor is None:
            raise NoModelError("load a model first (F2, or the Model tab)")
        return self.lm, self.editor

    @property
    def n_applied(self) -> int:
        return len(self.editor.applied) if self.editor is not None else 0

    def load(self, name: str, device: str = "auto", dtype: str | None = None) -> ModelInfo:
        """Load ``name``; the previous model (if any) and its session end."""
        lm = load_model(name, device=device, dtype=dtype)
        with self._lock:
            self.finish()
            self.lm = lm
            self.editor = Editor(lm.model, lm.tokenizer, lm.hparams)
            self.refs = []
            self.timeline = []
            self.version += 1
        return self.info()

    def info(self) -> ModelInfo:
        lm, ed = self.require()
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
        for _, text in probes:
            prompts.append(text)
            targets.append(form.target_new)
            if form.target_true:
                prompts.append(text)
                targets.append(form.target_true)
        scores = score_targets(lm.model, lm.tokenizer, prompts, targets)
        out = []
        k = 0
        for name, text in probes:
            p_new = scores[k].prob
            k += 1
            p_true = None
            if form.target_true:
                p_true = scores[k].prob
                k += 1
            out.append(Probe(name, text, p_new, p_true))
        return out

    def _after(self, result: EditResult, form: EditForm) -> list[Probe] | None:
        """Probes with the update applied for a moment (then undone, bit for bit)."""
        _, ed = self.require()
        if not (torch.isfinite(result.u).all() and torch.isfinite(result.v).all()):
            return None
        ed.apply(result, force=True)
        try:
            return self.score_probes(form)
        finally:
            ed.undo()

    @property
    def disabling_ratio(self) -> float:
        lm, _ = self.require()
        return DISABLING_FRACTION * lm.hparams.max_update_ratio

    def history_norms(self, layer: int) -> list[float]:
        return [p.norm for p in self.timeline if p.active and p.layer == layer]

    def compute(self, form: EditForm, progress: Progress | None = None) -> EditOutcome:
        """The update for the form's mode, with probes before and after. Nothing applied."""
        with self._lock:
            _, ed = self.require()
            t0 = time.perf_counter()
            before = self.score_probes(form)
            res = ed.compute(form.request(), mode=form.mode, layer=form.layer, progress=progress)
            after = self._after(res, form)
            verdict = judge(
                res,
                before,
                after,
                history_norms=self.history_norms(res.layer),
                disabling_ratio=self.disabling_ratio,
            )
            secs = time.perf_counter() - t0
            return EditOutcome(form, res, before, after, verdict, secs, self.version)

    def compare(self, form: EditForm, progress: Progress | None = None) -> dict[str, EditOutcome]:
        """The update in every key mode (one v* shared), each probed. Nothing applied."""
        with self._lock:
            _, ed = self.require()
            t0 = time.perf_counter()
            before = self.score_probes(form)
            results = ed.compare(form.request(), layer=form.layer, progress=progress)
            out: dict[str, EditOutcome] = {}
            for mode, res in results.items():
                after = self._after(res, form)
                verdict = judge(
                    res,
                    before,
                    after,
                    others=results.values(),
                    history_norms=self.history_norms(res.layer),
                    disabling_ratio=self.disabling_ratio,
                )
                out[mode] = EditOutcome(
                    form.with_mode(mode),
                    res,
                    before,
                    after,
                    verdict,
                    time.perf_counter() - t0,
                    self.version,
                )
            return out

    # ----------------------------------------------------------- apply / undo
    def generate(self, prompts: Sequence[str], max_new_tokens: int = 24) -> list[str]:
        lm, _ = self.require()
        return greedy(lm.model, lm.tokenizer, prompts, max_new_tokens)

    def cumulative_norm(self, layer: int) -> float:
        """‖W − W₀‖ at ``layer``: the norm of the sum of the applied rank-one updates."""
        _, ed = self.require()
        total: torch.Tensor | None = None
        for entry in ed.applied:
            if entry.layer != layer:
                continue
            outer = torch.outer(entry.v.float().cpu(), entry.u.float().cpu())
            total = outer if total is None else total + outer
        return 0.0 if total is None else float(total.norm())

    def apply(
        self,
        outcome: EditOutcome,
        progress: Progress | None = None,
        generate: bool = True,
    ) -> AppliedInfo:
        """Apply a computed edit: generations before/after, store record, undo entry.

        ``progress`` may raise to cancel only before the weights change.
        """
        with self._lock:
            lm, ed = self.require()
            res = outcome.result
            prompts = outcome.form.generation_texts() if generate else []
            if progress:
                progress("generating before", 0, 2)
            before = self.generate(prompts) if prompts else []
            if progress:
                progress("applying", 1, 2)
            ed.apply(res)  # raises UnsafeUpdateError for a refused update, weights unchanged
            self.version += 1
            try:
                after = self.generate(prompts) if prompts else []
                if outcome.after is None:
                    outcome.after = self.score_probes(outcome.form)
            except BaseException:
                ed.undo()
                self.version += 1
                raise
            fp = ed.fingerprint([res.layer])
            pairs = [
                GenerationPair(p, b, a) for p, b, a in zip(prompts, before, after, strict=True)
            ]
            run_id, seq, err = self._store_result(outcome, fp, pairs)
            self.refs.append((run_id, seq) if run_id is not None and seq is not None else None)
            number = len(self.timeline) + 1
            self.timeline.append(
                NormPoint(
                    number=number,
                    label=f"{res.request.subject} → {res.request.target_new}",
                    mode=res.mode,
                    layer=res.layer,
                    norm=res.update_norm,
                    ratio=res.update_norm_ratio,
                    cumulative=self.cumulative_norm(res.layer),
                    flagged=outcome.verdict.disabling,
                    reason=outcome.verdict.summary,
                )
            )
            return AppliedInfo(number, outcome, pairs, fp, run_id, seq, err)

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
                base_fingerprint=ed.fingerprint([hp.layer]),
                notes="interactive session (rome-workbench TUI)",
            )
            self._lease = self.store.acquire_writer(run.id)
            self.run_id = run.id
        return self.run_id

    def _store_result(
        self, outcome: EditOutcome, fp: str, pairs: list[GenerationPair]
    ) -> tuple[str | None, int | None, str | None]:
        if self.store is None:
            return None, None, self.store_error or "no database open"
        from workbench.store import StoreError

        try:
            run_id = self._ensure_run()
            seq = self.store.next_seq(run_id)
            self.store.add_edit_result(
                run_id,
                seq,
                outcome.result,
                metrics=outcome.metrics(),
                flagged=outcome.verdict.disabling,
                flag_reason=outcome.verdict.summary or None,
                fingerprint=fp,
            )
            for g in pairs:
                self.store.add_generation(run_id, seq, g.prompt, g.before, g.after)
            return run_id, seq, None
        except StoreError as exc:
            log.warning("could not store the edit: %s", exc)
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
            done = 0
            for i, (run_id, seq) in enumerate(keys):
                if progress:
                    progress("re-applying", i, len(keys))
                edit = self.store.edit(run_id, seq)
                u, v = self.store.load_factors(edit, device=lm.device)
                ed.apply_factors(edit.layer, u, v)
                self.version += 1
                self._record_reapplied(edit, u, v)
                done += 1
            return done

    def _record_reapplied(self, edit: Edit, u: torch.Tensor, v: torch.Tensor) -> None:
        _, ed = self.require()
        fp = ed.fingerprint([edit.layer])
        ref: tuple[str, int] | None = None
        assert self.store is not None
        from workbench.store import StoreError

        try:
            run_id = self._ensure_run()
            seq = self.store.next_seq(run_id)
            self.store.add_edit(
                run_id,
                seq,
                request=edit.request,
                mode=edit.mode,
                layer=edit.layer,
                weight_name=edit.weight_name,
                u=u,
                v=v,
                case_id=edit.case_id,
                update_norm=edit.update_norm,
                update_norm_ratio=edit.update_norm_ratio,
                denominator=edit.denominator,
                cos_kstar_ks=edit.cos_kstar_ks,
                record=edit.record,
                metrics={"source": "reapplied", "from": f"{edit.run_id}:{edit.seq}"},
                fingerprint=fp,
            )
            ref = (run_id, seq)
        except StoreError as exc:
            log.warning("could not store the re-applied edit: %s", exc)
        self.refs.append(ref)
        req = edit.request
        self.timeline.append(
            NormPoint(
                number=len(self.timeline) + 1,
                label=f"{req.get('subject')} → {req.get('target_new')}",
                mode=edit.mode,
                layer=edit.layer,
                norm=float(edit.update_norm or 0.0),
                ratio=float(edit.update_norm_ratio or 0.0),
                cumulative=self.cumulative_norm(edit.layer),
                flagged=edit.flagged,
                reason=edit.flag_reason or "",
            )
        )

    # ----------------------------------------------------------- history
    def history(self, model: str | None = None) -> list[HistoryRow]:
        """Every edit in the store for this model (all models before one is loaded)."""
        if self.store is None:
            return []
        if model is None and self.lm is not None:
            model = self.lm.name
        rows: list[HistoryRow] = []
        for run in self.store.list_runs(model=model):
            for e in self.store.edits(run.id):
                req = e.request or {}
                rows.append(
                    HistoryRow(
                        run_id=run.id,
                        run_kind=run.kind,
                        run_status=run.status,
                        seq=e.seq,
                        created_at=e.created_at,
                        prompt=str(req.get("prompt", "")),
                        subject=str(req.get("subject", "")),
                        target_new=str(req.get("target_new", "")),
                        target_true=req.get("target_true"),
                        mode=e.mode,
                        layer=e.layer,
                        norm=e.update_norm,
                        ratio=e.update_norm_ratio,
                        denominator=e.denominator,
                        cos=e.cos_kstar_ks,
                        flagged=e.flagged,
                        flag_reason=e.flag_reason,
                        refused=e.refused,
                        applied=e.applied,
                        has_factors=e.has_factors,
                        in_session=run.id == self.run_id,
                        metrics=dict(e.metrics or {}),
                        record=dict(e.record or {}),
                    )
                )
        rows.sort(key=lambda r: (r.created_at, r.seq), reverse=True)
        return rows

    # ----------------------------------------------------------- replay
    def replay_layer(self, cfg: Any = None, resume: str | None = None) -> int:
        lm, _ = self.require()
        layer = getattr(cfg, "layer", None)
        if resume is not None and self.store is not None:
            data = self.store.get_run(resume).hparams or {}
            layer = (data.get("replay") or {}).get("layer")
        return lm.hparams.layer if layer is None else int(layer)

    def run_replay(
        self,
        cfg: Any,
        cancel: threading.Event,
        on_event: Callable[[Any], None],
        resume: str | None = None,
    ) -> None:
        """Run ``evals.replay.replay`` on the loaded model, then put its weights back.

        The replay edits the model in place from its base weights; afterwards
        the edited layer is restored, so the session goes on as before.
        """
        from evals.replay import replay

        with self._lock:
            lm, ed = self.require()
            if self.store is None:
                raise NoModelError("no database is open: a replay needs one to record its edits")
            if ed.applied:
                raise ReplayNeedsBaseError(
                    f"the model has {len(ed.applied)} applied edit(s) and a replay starts from "
                    "the base weights: revert them first (History → Revert all)"
                )
            layer = self.replay_layer(cfg, resume)
            module = ed.module(ed.check_layer(layer))
            weight = module.weight
            assert isinstance(weight, torch.Tensor)
            saved = weight.detach().to("cpu", copy=True)
            fp = ed.fingerprint([layer])
            try:
                events = replay(
                    lm, self.store, cfg if resume is None else None, cancel=cancel, resume=resume
                )
                for ev in events:
                    on_event(ev)
            finally:
                self.version += 1
                with torch.no_grad():
                    weight.copy_(saved.to(weight.device))
                if ed.fingerprint([layer]) != fp:  # pragma: no cover - defensive
                    log.error("the weights of layer %d differ after the replay's restore", layer)

    def replay_runs(self) -> list[Any]:
        if self.store is None:
            return []
        model = self.lm.name if self.lm is not None else None
        return self.store.list_runs(model=model, kind="replay")

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


def finite(x: float | None) -> bool:
    return x is not None and math.isfinite(x)
