"""What the session hands the panes: computed and applied edits, model facts, history rows."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from rome import EditResult
from rome.editor import AppliedEdit, Editor
from rome.methods import Update

from .forms import EditForm, has_key_modes
from .generation import GenerationPair
from .verdict import Probe, Verdict


class ProbedOutcome:
    """What every computed edit shares (ROME's and the batch methods'): the form's probes
    before and after, and the verdict, as the store keeps them besides the method's record."""

    form: EditForm
    before: list[Probe]
    after: list[Probe] | None
    verdict: Verdict

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
class EditOutcome(ProbedOutcome):
    """A computed (not yet applied) edit with its probes before and after."""

    form: EditForm
    result: EditResult
    before: list[Probe]
    after: list[Probe] | None
    verdict: Verdict
    seconds: float = 0.0
    version: int = 0  # Session.version when computed: the weights it was computed on
    # the engine's update (Editor.edit), applied as it is: computed once, written once
    update: Update | None = field(default=None, repr=False)

    @property
    def mode(self) -> str:
        return self.result.mode


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
    method: str = "rome"

    @property
    def how(self) -> str:
        """The method, with ROME's key mode: ``rome/rrome``, ``memit``."""
        return (
            f"{self.method}/{self.mode}"
            if has_key_modes(self.method) and self.mode
            else self.method
        )

    @property
    def key(self) -> str:
        return f"{self.run_id}:{self.seq}"

    @property
    def state(self) -> str:
        if self.refused:
            return "refused"
        return "applied" if self.applied else "undone"


@dataclass
class AppliedStep:
    """What :meth:`Session.apply_step` did: the edit's number, its undo entry, the carrier's
    method state before it (what an undo goes back to), generations, where it is stored."""

    number: int  # this session's edit number (1-based)
    entry: AppliedEdit
    state: dict[str, Any]
    generations: list[GenerationPair]
    fingerprint: str
    run_id: str | None
    seq: int | None
    store_error: str | None = None


def carried_state(editor: Editor) -> dict[str, Any]:
    """A copy of ``editor.method_state`` to put back later (its tensors are replaced, never
    changed in place: a shallow copy per method)."""
    return {k: dict(v) if isinstance(v, dict) else v for k, v in editor.method_state.items()}
