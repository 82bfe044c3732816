"""What the session hands the panes: computed and applied edits, model facts, history rows."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

from rome import EditResult
from rome.methods import Update

from .forms import EditForm, has_key_modes
from .generation import GenerationPair
from .verdict import Probe, Verdict


def result_of(update: Update) -> EditResult | None:
    """The rank-one record of a one-request step that keeps one (ROME's)."""
    res = update.results
    return res[0] if len(res) == 1 and isinstance(res[0], EditResult) else None


@dataclass
class EditOutcome:
    """A computed (not yet applied) step of any method on the form's request: the
    engine's update, the form's probes before and after, the verdict."""

    form: EditForm
    update: Update  # computed once, written once by the apply
    before: list[Probe]
    after: list[Probe] | None
    verdict: Verdict
    seconds: float = 0.0
    version: int = 0  # Session.version when computed: the weights it was computed on
    ratio: float = math.nan  # ‖ΔW‖ / ‖W‖ over the weights it writes
    preset: str = ""  # the preset it edited with (the method's shipped variant, or the model's)

    @property
    def result(self) -> EditResult | None:
        """The rank-one record of a method that keeps one (ROME's ``EditResult``)."""
        return result_of(self.update)

    @property
    def method(self) -> str:
        return self.update.method

    @property
    def mode(self) -> str:
        """What the status lines name the edit by: the key mode (ROME's) or the method."""
        return self.update.mode or self.update.method

    @property
    def norm(self) -> float:
        """‖ΔW‖: a rank-one record's own figure (ROME's float32 ‖u‖‖v‖), else the update's."""
        res = self.result
        return float(res.update_norm) if res is not None else self.update.norm

    @property
    def layer_norms(self) -> dict[int, float]:
        res = self.result
        return {res.layer: self.norm} if res is not None else self.update.layer_norms()

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
    """An applied step of any method: its session number, outcome, generations, where stored."""

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
