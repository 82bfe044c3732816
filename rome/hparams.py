"""Edit hyperparameters and the presets that ship with the package."""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any, Literal

from .errors import BadRequestError, UnknownPresetError

KeyAveraging = Literal["uniform", "grouped"]
VStop = Literal["loss", "most_probable"]
V_STOPS = ("loss", "most_probable")
MODES = ("original", "rrome", "prompt")
SUBJECT_INDEX = ("joined", "separate")
FAMILY_METHODS = ("rome", "memit", "emmet", "alphaedit")


@dataclass(frozen=True)
class EditHparams:
    """Everything that decides an edit besides the request. One JSON preset each."""

    name: str
    model: str
    layers_module: str
    mlp_out_module: str
    final_norm_module: str
    layer: int
    v_num_grad_steps: int = 20
    v_lr: float = 0.5
    v_loss_layer: int | None = None  # recorded for reference; the loss is on the final logits
    v_weight_decay: float = 0.5
    clamp_norm_factor: float = 4.0
    kl_factor: float = 0.0625
    v_early_stop_loss: float = 0.05
    # None (fp32, the reference), "bf16", or "auto": bf16 where the hardware has bf16
    # matrix units (CUDA with bf16, CPUs with avx512_bf16 / amx_bf16), else fp32
    v_autocast: str | None = None
    # Stopping rule of the v* loop: "loss" (the reference: total loss < v_early_stop_loss)
    # or "most_probable" (ENCORE's MPES: stop once every target token is the argmax at
    # its position in every templated prompt; the loss rule still applies).
    v_stop: VStop = "loss"
    # Norm-anchor scaling (NAS): rescale each solved v* to a reference norm measured on
    # the unedited model (see rome/anchor.py and presets/README.md).
    v_norm_anchor: bool = False
    v_norm_anchor_samples: int = 16
    fact_token: str = "subject_last"
    key_averaging: KeyAveraging = "uniform"
    context_template_length_params: list[list[int]] = field(
        default_factory=lambda: [[5, 10], [10, 10]]
    )
    context_templates: list[str] | None = None
    template_seed: int = 0
    covariance: Literal["corpus", "identity"] = "corpus"
    mom2_dataset: str = "wikipedia"
    mom2_n_samples: int = 100000
    mom2_max_len: int = 128
    mom2_dtype: str = "float32"
    mom2_ridge: float = 1e-6
    max_update_ratio: float = 10.0
    default_mode: str = "rrome"
    # --- the MEMIT / EMMET / AlphaEdit family (FAMILY.md); ROME reads none of these
    method: str = "rome"  # the method the preset is tuned for
    layers: list[int] | None = None  # the family's edited layers (ascending); None: [layer]
    mom2_update_weight: float = 15000.0  # MEMIT's λ, EMMET's w
    emmet_lambda: float = 0.1  # EMMET's μ (added to D only when n > 1)
    update_norm_lambda: float = 0.0  # ν·I added to λC₀ (EMMET's; ENCORE's norm constraint)
    nullspace_threshold: float = 0.02  # AlphaEdit: keep singular values of C₀ below this
    alphaedit_l2: float = 10.0  # AlphaEdit's L2
    memit_accumulate: bool = False  # MEMIT_seq: add the accumulated K Kᵀ of applied edits
    subject_index: str = "joined"  # "joined" (AlphaEdit, EMMET) or "separate" (kmeng01/memit)
    family_template_words: list[str] = field(
        default_factory=lambda: ["The", "Therefore", "Because", "I", "You"]
    )
    family_template_length: int = 10  # tokens per prefix, start word included
    family_template_top_k: int = 5
    family_context_templates: list[str] | None = None  # explicit: "{}" + the prefixed ones
    aliases: list[str] = field(default_factory=list)
    extends: str | None = None  # a variant: the preset whose fields it starts from
    notes: str = ""

    def replace(self, **changes: Any) -> EditHparams:
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def weight_module(self, layer: int | None = None) -> str:
        return self.mlp_out_module.format(self.layer if layer is None else layer)

    def validate(self) -> EditHparams:
        if self.key_averaging not in ("uniform", "grouped"):
            raise BadRequestError(
                f"key_averaging must be 'uniform' or 'grouped', not {self.key_averaging!r}"
            )
        if self.covariance not in ("corpus", "identity"):
            raise BadRequestError(
                f"covariance must be 'corpus' or 'identity', not {self.covariance!r}"
            )
        if self.v_stop not in V_STOPS:
            raise BadRequestError(
                f"v_stop must be one of {', '.join(V_STOPS)}, not {self.v_stop!r}"
            )
        if self.v_autocast not in (None, "bf16", "auto"):
            raise BadRequestError(
                f"v_autocast must be null, 'bf16' or 'auto', not {self.v_autocast!r}"
            )
        if self.v_norm_anchor_samples < 1:
            raise BadRequestError("v_norm_anchor_samples must be at least 1")
        if self.default_mode not in MODES:
            raise BadRequestError(f"default_mode must be one of {MODES}")
        self._validate_family()
        if "{}" not in self.mlp_out_module:
            raise BadRequestError("mlp_out_module must contain '{}' for the layer index")
        return self

    def _validate_family(self) -> None:
        if self.method not in FAMILY_METHODS:
            raise BadRequestError(
                f"method must be one of {', '.join(FAMILY_METHODS)}, not {self.method!r}"
            )
        if self.layers is not None:
            if not self.layers or list(self.layers) != sorted(set(self.layers)):
                raise BadRequestError(
                    f"layers must be a non-empty ascending list without repeats, not {self.layers}"
                )
            if min(self.layers) < 0:
                raise BadRequestError(f"layers must be non-negative, not {self.layers}")
        if self.subject_index not in SUBJECT_INDEX:
            raise BadRequestError(
                f"subject_index must be one of {', '.join(SUBJECT_INDEX)}, "
                f"not {self.subject_index!r}"
            )
        for name in ("mom2_update_weight", "nullspace_threshold"):
            if not getattr(self, name) > 0:
                raise BadRequestError(f"{name} must be positive, not {getattr(self, name)}")
        for name in ("emmet_lambda", "update_norm_lambda", "alphaedit_l2"):
            if getattr(self, name) < 0:
                raise BadRequestError(f"{name} must be >= 0, not {getattr(self, name)}")
        if not self.family_template_words:
            raise BadRequestError("family_template_words must name at least one start word")
        if self.family_template_length < 1 or self.family_template_top_k < 1:
            raise BadRequestError("family_template_length and family_template_top_k must be >= 1")

    def edited_layers(self) -> list[int]:
        """The family's edited layers: ``layers``, else the single ROME ``layer``."""
        return list(self.layers) if self.layers is not None else [self.layer]

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> EditHparams:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise BadRequestError(f"unknown preset fields: {', '.join(unknown)}")
        try:
            return cls(**data).validate()
        except TypeError as exc:
            raise BadRequestError(f"incomplete preset: {exc}") from None


def _preset_files() -> list[Any]:
    root = resources.files("rome") / "presets"
    return sorted((p for p in root.iterdir() if p.name.endswith(".json")), key=lambda p: p.name)


def _resolve_extends(data: dict[str, Any], raw: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """A variant preset's fields over those of the preset it ``extends``."""
    base_name = data.get("extends")
    if base_name is None:
        return data
    base = raw.get(base_name)
    if base is None or base_name == data.get("name"):
        raise UnknownPresetError(f"preset {data.get('name')!r} extends unknown {base_name!r}")
    merged = {k: v for k, v in _resolve_extends(base, raw).items() if k != "aliases"}
    merged.update(data)
    return merged


def _raw_presets() -> dict[str, dict[str, Any]]:
    raw = {}
    for p in _preset_files():
        data = json.loads(p.read_text())
        raw[data["name"]] = data
    return raw


def list_presets() -> dict[str, EditHparams]:
    """All shipped presets by name."""
    raw = _raw_presets()
    return {name: EditHparams.from_dict(_resolve_extends(d, raw)) for name, d in raw.items()}


def find_preset(name: str) -> EditHparams | None:
    """The shipped preset whose name, model id or alias is ``name``, if any.

    A model id or alias picks the base preset, never a variant (``extends``).
    """
    presets = list_presets()
    if name in presets:
        return presets[name]
    for hp in presets.values():
        if hp.extends is None and name in (hp.model, *hp.aliases):
            return hp
    return None


def load_preset(name_or_path: str | Path) -> EditHparams:
    """A shipped preset by name (``smollm2-135m``, ``gpt2-xl``...) or a JSON file path."""
    path = Path(name_or_path)
    if path.suffix == ".json" or path.is_file():
        if not path.is_file():
            raise UnknownPresetError(f"no preset file at {path}")
        try:
            data = json.loads(path.read_text())
            return EditHparams.from_dict(_resolve_extends(data, _raw_presets()))
        except json.JSONDecodeError as exc:
            raise BadRequestError(f"preset file {path} is not valid JSON: {exc}") from None
    hp = find_preset(str(name_or_path))
    if hp is None:
        names = ", ".join(sorted(list_presets()))
        raise UnknownPresetError(
            f"unknown preset {str(name_or_path)!r}; shipped presets: {names} "
            "(or pass a JSON file with --hparams)"
        )
    return hp
