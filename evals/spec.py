"""What a run was started with, typed: the preset and the replay settings.

A run stores them as one JSON object, ``{"hparams": {...}, "replay": {...}}``
(the ``runs.hparams`` column); :class:`RunSpec` is the one place that writes
and reads it, so the replay, the save command and the CLI and app never pick
the JSON apart themselves.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, fields
from typing import Any

from rome.hparams import EditHparams

from .glue import TASKS


@dataclass
class ReplayConfig:
    dataset: str = "sample"
    n_edits: int = 100
    order_seed: int | None = None  # None: file order; else random.Random(seed).shuffle's
    mode: str = "rrome"  # ROME's key mode (read by the rome method only)
    method: str = "rome"  # the editing method (rome.methods): rome, memit, emmet, alphaedit
    batch_size: int = 1  # requests per step (1 for rome; the published family protocol: 100)
    method_options: dict[str, Any] = field(default_factory=dict)  # the method's own settings
    retention_size: int = 100  # the first M edits re-scored at every checkpoint (0: off)
    glue_every: int = 10
    glue_tasks: tuple[str, ...] = TASKS
    glue_limit: int | None = 50
    glue_dir: str | None = None
    glue_scoring: str = "logprob"
    glue_calibration: str = "none"  # or "contextual" (Zhao et al. 2021)
    guard: bool = False
    layer: int | None = None
    flag_norm_factor: float = 4.0  # flag when ‖ΔW‖ > factor × the running median
    flag_min_history: int = 3
    flag_entropy_ratio: float = 0.6  # flag when fluency < ratio × the start's
    flag_ppl_ratio: float = 1.5  # flag when perplexity > ratio × the start's
    fluency_tokens: int = 40
    perplexity: bool = True  # the held-out perplexity probe at every checkpoint
    pre_metrics: bool = True  # score each record just before its edit too
    generation_metrics: bool = False  # GE per edit (costs a generation per edit)
    rescore: bool = True
    # what the run was started on, checked when it resumes (set by replay())
    dataset_fingerprint: str | None = None
    glue_fingerprint: str | None = None
    covariance_fingerprint: str | None = None  # compared on resume: a warning if it differs
    # a method state to start from (AlphaEdit's package format), and its SHA-256 (set)
    initial_state: str | None = None
    initial_state_sha256: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ReplayConfig:
        known = {f.name for f in fields(cls)}
        cfg = {k: v for k, v in data.items() if k in known}
        if "glue_tasks" in cfg:
            cfg["glue_tasks"] = tuple(cfg["glue_tasks"])
        return cls(**cfg)


@dataclass
class RunSpec:
    """A run's stored specification: ``hparams`` (the preset, as a dict) and ``replay``.

    Writers: :meth:`new` (a run's first), :meth:`with_replay` and :meth:`with_hparams`
    (a stored run's, one part changed), then :meth:`to_dict` for the store. Readers: the
    properties below; nothing else picks the stored JSON apart.
    """

    raw: dict[str, Any]

    @classmethod
    def of(cls, run: Any) -> RunSpec:
        """From a stored run, its ``hparams`` column (a dict or JSON text), or None."""
        data = run if isinstance(run, (dict, str)) or run is None else run.hparams
        if isinstance(data, str):
            data = json.loads(data) if data.strip() else {}
        return cls(dict(data) if isinstance(data, dict) else {})

    @classmethod
    def new(cls, hparams: EditHparams, replay: ReplayConfig | None = None) -> RunSpec:
        raw: dict[str, Any] = {"hparams": hparams.to_dict()}
        if replay is not None:
            raw["replay"] = replay.to_dict()
        return cls(raw)

    def to_dict(self) -> dict[str, Any]:
        """What the store keeps (the ``runs.hparams`` column)."""
        return dict(self.raw)

    def with_replay(self, replay: ReplayConfig) -> RunSpec:
        """This spec with ``replay`` as its replay settings (the preset kept)."""
        return RunSpec({**self.raw, "replay": replay.to_dict()})

    def with_hparams(self, hparams: EditHparams) -> RunSpec:
        """This spec with ``hparams`` as its preset (the replay settings kept)."""
        return RunSpec({**self.raw, "hparams": hparams.to_dict()})

    @property
    def stored_replay(self) -> dict[str, Any]:
        """The replay settings exactly as stored: only the keys the run was started with
        (a run stored before a setting existed lacks it; :attr:`replay` fills in the
        default), ``{}`` for a run without any (an app session)."""
        cfg = self.raw.get("replay")
        return dict(cfg) if isinstance(cfg, dict) else {}

    @property
    def replay(self) -> ReplayConfig | None:
        cfg = self.stored_replay
        return ReplayConfig.from_dict(cfg) if cfg else None

    @property
    def hparams(self) -> dict[str, Any]:
        hp = self.raw.get("hparams")
        return hp if isinstance(hp, dict) else {}

    def edit_hparams(self, fallback: EditHparams) -> EditHparams:
        """The preset the run edits with (a resume edits exactly as before).

        A run stored before prefix reuse (or length buckets) existed resumes without it:
        its v* steps stay the computation its edits were made with, bit for bit (both
        agree to float error, not to the bit).
        """
        if not self.hparams:
            return fallback
        stored = dict(self.hparams)
        stored.setdefault("v_prefix_reuse", False)
        stored.setdefault("v_length_buckets", False)
        return EditHparams.from_dict(stored)

    def layer(self) -> int | None:
        """The ROME layer the run edits: the replay's ``layer``, else its preset's."""
        cfg = self.stored_replay
        if cfg.get("layer") is not None:
            return int(cfg["layer"])
        hp = self.hparams
        return int(hp["layer"]) if hp.get("layer") is not None else None

    @property
    def method(self) -> str:
        """The run's editing method (a run stored before methods existed: ROME's)."""
        return str(self.stored_replay.get("method") or "rome")

    def edited_layers(self) -> list[Any]:
        """The layers the preset edits: its ``layers`` range, else its one ``layer``
        (``["-"]`` when neither is stored)."""
        hp = self.hparams
        return list(hp.get("layers") or [hp.get("layer", "-")])

    @property
    def preset_name(self) -> str | None:
        name = self.hparams.get("name")
        return None if name is None else str(name)
