"""Edit hyperparameters and the presets that ship with the package."""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any, Literal

from .errors import BadRequestError, UnknownPresetError, UnsupportedArchitectureError
from .hparam_checks import check_module_templates, check_types, json_kind

KeyAveraging = Literal["uniform", "grouped"]
VStop = Literal["loss", "most_probable"]
V_STOPS = ("loss", "most_probable")
MODES = ("original", "rrome", "prompt")
#: where a key is read: the subject's last token (the only position implemented)
FACT_TOKENS = ("subject_last",)
SUBJECT_INDEX = ("joined", "separate")
#: flat fields of older presets and stored runs, now each method's own settings: kept
#: in ``shared_settings``, read by every method whose setting names them as its ``legacy``
LEGACY_METHOD_FIELDS = (
    "mom2_update_weight",
    "emmet_lambda",
    "update_norm_lambda",
    "nullspace_threshold",
    "alphaedit_l2",
    "memit_accumulate",
    # UltraEdit's settings were flat fields for a few commits (runs made then store them)
    "ultraedit_lr",
    "ultraedit_modules",
    "ultraedit_normaliser",
)


#: checks a preset's ``method`` and ``method_settings`` against the registered methods;
#: installed by :mod:`rome.methods.registry` (this module does not import the methods:
#: they import it)
_settings_check: Callable[[EditHparams], None] | None = None


def use_settings_check(check: Callable[[EditHparams], None]) -> None:
    global _settings_check
    _settings_check = check


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
    # Exact speed-up of the v* loop: the positions before each prompt's subject token do not
    # depend on δ, so the blocks above the edit run them once per edit (rome/upper.py)
    v_prefix_reuse: bool = True
    # Exact: the rows of one v* / z optimisation run in groups of one suffix length each,
    # so no row is padded to another's length (rome/optimise.py)
    v_length_buckets: bool = True
    # The most requests one target-vector optimisation takes at once (a batch of more is
    # optimised in chunks of this many; each request's trajectory is its own either way).
    # Memory grows with it: on SmolLM2 each request adds ~0.1 GB of activations.
    v_max_requests: int = 16
    v_norm_anchor_samples: int = 20  # the first N calibration requests of rome/anchor.py
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
    # --- the locate-then-edit family's shared machinery (FAMILY.md); ROME reads none of these
    method: str = "rome"  # the method the preset is tuned for (a registered name)
    layers: list[int] | None = None  # the family's edited layers (ascending); None: [layer]
    # each method's own settings, by method name (rome.methods: its Settings dataclass)
    method_settings: dict[str, dict[str, Any]] = field(default_factory=dict)
    # settings shared by the methods that name them (a family preset's λ for MEMIT, EMMET,
    # RECT...): the flat fields of presets and runs from before methods declared theirs
    shared_settings: dict[str, Any] = field(default_factory=dict)
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
        """A copy with ``changes``; an old flat method field (``mom2_update_weight``...)
        goes into ``shared_settings``, as it does when a preset is read."""
        flat = {k: changes.pop(k) for k in LEGACY_METHOD_FIELDS if k in changes}
        if flat:
            base = changes.get("shared_settings", self.shared_settings)
            changes["shared_settings"] = {**base, **flat}
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def weight_module(self, layer: int | None = None) -> str:
        return self.mlp_out_module.format(self.layer if layer is None else layer)

    def validate(self) -> EditHparams:
        """``self`` if every field has its type and a usable value; else one
        :class:`BadRequestError` naming the field (a preset file is user input)."""
        check_types(self)
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
        if self.fact_token not in FACT_TOKENS:
            raise BadRequestError(
                f"fact_token must be {' or '.join(map(repr, FACT_TOKENS))} (the only key "
                f"position implemented), not {self.fact_token!r}"
            )
        if self.default_mode not in MODES:
            raise BadRequestError(f"default_mode must be one of {MODES}")
        check_module_templates(self)
        self._validate_family()
        return self

    def _validate_family(self) -> None:
        if not isinstance(self.method, str) or not self.method.strip():
            raise BadRequestError(f"method must name an editing method, not {self.method!r}")
        settings = self.method_settings
        if not isinstance(settings, dict) or not all(
            isinstance(k, str) and isinstance(v, dict) for k, v in settings.items()
        ):
            raise BadRequestError(
                'preset field method_settings must be an object of objects, e.g. {"rect": '
                '{"keep_percent": 40}}'
            )
        if not isinstance(self.shared_settings, dict):
            raise BadRequestError("preset field shared_settings must be an object")
        if _settings_check is not None:
            _settings_check(self)
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
        if not self.family_template_words:
            raise BadRequestError("family_template_words must name at least one start word")
        if self.family_template_length < 1 or self.family_template_top_k < 1:
            raise BadRequestError("family_template_length and family_template_top_k must be >= 1")

    def edited_layers(self) -> list[int]:
        """The family's edited layers: ``layers``, else the single ROME ``layer``."""
        return list(self.layers) if self.layers is not None else [self.layer]

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> EditHparams:
        if not isinstance(data, dict):
            raise BadRequestError(f"a preset is a JSON object of fields, not {json_kind(data)}")
        data = _lift_legacy(data)
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise BadRequestError(f"unknown preset fields: {', '.join(unknown)}")
        try:
            return cls(**data).validate()
        except TypeError as exc:
            raise BadRequestError(f"incomplete preset: {exc}") from None


def _lift_legacy(data: dict[str, Any]) -> dict[str, Any]:
    """``data`` with its old flat method fields moved into ``shared_settings``."""
    flat = {k: data[k] for k in LEGACY_METHOD_FIELDS if k in data}
    if not flat:
        return data
    out = {k: v for k, v in data.items() if k not in flat}
    out["shared_settings"] = {**flat, **(out.get("shared_settings") or {})}
    return out


def _preset_files() -> list[Any]:
    root = resources.files("rome") / "presets"
    return sorted((p for p in root.iterdir() if p.name.endswith(".json")), key=lambda p: p.name)


def _resolve_extends(data: dict[str, Any], raw: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """A variant preset's fields over those of the preset it ``extends``."""
    base_name = data.get("extends")
    if base_name is None:
        return data
    if not isinstance(base_name, str):
        raise BadRequestError(f"preset field extends must be a preset name, not {base_name!r}")
    base = raw.get(base_name)
    if base is None or base_name == data.get("name"):
        raise UnknownPresetError(f"preset {data.get('name')!r} extends unknown {base_name!r}")
    merged = {k: v for k, v in _lift_legacy(_resolve_extends(base, raw)).items() if k != "aliases"}
    own = _lift_legacy(data)
    settings = {k: dict(v) for k, v in (merged.get("method_settings") or {}).items()}
    for method, values in (own.get("method_settings") or {}).items():
        settings[method] = {**settings.get(method, {}), **values}
    shared = {**(merged.get("shared_settings") or {}), **(own.get("shared_settings") or {})}
    merged.update(own)
    if settings:
        merged["method_settings"] = settings
    if shared:
        merged["shared_settings"] = shared
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


def method_preset(hp: EditHparams, method: str) -> EditHparams:
    """The settings ``method`` edits with on ``hp``'s model.

    A preset made for ``method`` keeps ``hp``; otherwise the shipped variant
    ``<preset>-<method>`` (``smollm2-135m-memit``: its sweep-chosen layers and λ), or
    ``<a preset it extends, directly or not>-<method>``, when there is one for the same
    model (one whose ``method`` is ``method`` first), else
    ``hp`` itself (its single ``layer``).
    """
    if hp.method == method:
        return hp
    presets = list_presets()
    bases = [hp.name, hp.extends]  # and on up the chain of presets each extends
    while bases[-1] in presets and presets[bases[-1]].extends and len(bases) < 8:
        bases.append(presets[bases[-1]].extends)
    found = [
        v
        for base in bases
        if base and (v := presets.get(f"{base}-{method}")) is not None and v.model == hp.model
    ]
    # a name can match another method's variant (``smollm2-135m-memit`` + ``-nas`` is
    # memit-nas's preset): one made for ``method`` first, then the first by name
    return next((v for v in found if v.method == method), found[0] if found else hp)


def load_preset(name_or_path: str | Path) -> EditHparams:
    """A shipped preset by name (``smollm2-135m``, ``gpt2-xl``...) or a JSON file path."""
    path = Path(name_or_path)
    if path.suffix == ".json" or path.is_file():
        if not path.is_file():
            raise UnknownPresetError(f"no preset file at {path}")
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except UnicodeDecodeError:
            raise BadRequestError(
                f"preset file {path} is not a JSON text file (it is not UTF-8 text)"
            ) from None
        except OSError as exc:
            raise BadRequestError(
                f"cannot read preset file {path}: {exc.strerror or exc}"
            ) from None
        except json.JSONDecodeError as exc:
            raise BadRequestError(f"preset file {path} is not valid JSON: {exc}") from None
        if not isinstance(data, dict):
            raise BadRequestError(
                f"preset file {path} holds {json_kind(data)}, not a JSON object of fields"
            )
        try:
            return EditHparams.from_dict(_resolve_extends(data, _raw_presets()))
        except BadRequestError as exc:
            raise BadRequestError(f"preset file {path}: {exc}") from None
    hp = find_preset(str(name_or_path))
    if hp is None:
        names = ", ".join(sorted(list_presets()))
        raise UnknownPresetError(
            f"unknown preset {str(name_or_path)!r}; shipped presets: {names} "
            "(or pass a JSON file with --hparams)"
        )
    return hp


def for_model(name: str, preset: EditHparams) -> EditHparams:
    """A preset file applied to the model ``name``: ``name`` decides which weights load.

    The preset's own ``model`` is only its default: where ``name`` is neither the
    preset's name nor its model, the preset edits ``name`` (a shipped preset's
    model, or the hub id or folder itself), under that name.
    """
    if name in (preset.name, preset.model):
        return preset
    given = find_preset(name)
    return preset.replace(name=name, model=given.model if given is not None else name)


def check_modules(model: Any, hp: EditHparams, name: str) -> None:
    """The preset's module names exist in ``model``; else one
    :class:`UnsupportedArchitectureError` naming the first that does not."""
    for field_name, module in (
        ("layers_module", hp.layers_module),
        ("mlp_out_module", hp.weight_module(hp.layer)),
        ("final_norm_module", hp.final_norm_module),
    ):
        try:
            model.get_submodule(module)
        except AttributeError:
            raise UnsupportedArchitectureError(
                f"the preset's {field_name} {module!r} is not a module of {name!r} "
                f"({type(model).__name__}): the preset is for another architecture"
            ) from None
