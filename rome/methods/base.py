"""The seam every editing method goes through; a method declares itself here.

A method is one object (registered in :mod:`rome.methods.registry`) that says:

- its **settings**: a frozen dataclass whose fields carry their help, range and
  the old flat preset field they were once stored under (:func:`setting`);
  :func:`options_of` reads them as data (:class:`Option`), from which the CLI's
  ``--opt KEY=VALUE``, the app's settings and the run spec derive;
- its **capabilities** (:class:`Capabilities`): key modes, batched or not,
  whether it reads C₀, which context templates it uses;
- its **state**: what it carries between steps (AlphaEdit's Σ K Kᵀ), folded
  by :meth:`Method.fold` from each applied :class:`Update` (the step's stored
  keys), so a resume rebuilds it by folding the stored steps again and the
  Editor's undo / revert put back the state a step found.

A method computes on a small :class:`~rome.context.EditContext` (model,
tokenizer, preset, caches, its carried state), never on the Editor: an
:class:`Update` per step, the per-layer factors ``U`` (k × in) and ``V``
(out × k) of ``ΔW = V U`` in the (out, in) layout, one record per request.
Computing never changes the model; :meth:`rome.Editor.apply_step` does, and
undoes it bit for bit.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

import torch

from ..errors import BadRequestError
from ..request import EditRequest

if TYPE_CHECKING:
    from ..context import EditContext
    from ..hparams import EditHparams
    from ..progress import Progress


@dataclass
class LayerUpdate:
    """``ΔW = V @ U`` for one weight, in its (out, in) layout."""

    layer: int
    weight_name: str
    U: torch.Tensor  # (k, in)
    V: torch.Tensor  # (out, k)
    # keys the method's state is rebuilt from on resume (AlphaEdit: K on the edited
    # model, (in, n)); None for a method that carries no state
    keys: torch.Tensor | None = field(default=None, repr=False)

    @property
    def rank(self) -> int:
        return int(self.U.shape[0])

    @property
    def norm(self) -> float:
        """‖V U‖_F without forming the product: √Σ (VᵀV ∘ UUᵀ)."""
        v = self.V.double()
        u = self.U.double()
        return float(((v.T @ v) * (u @ u.T)).sum().clamp_min(0).sqrt())

    def delta(self) -> torch.Tensor:
        """ΔW (out, in), float32: for rank one an outer product (bit-identical to ROME's)."""
        if self.rank == 1:
            return torch.outer(self.V[:, 0], self.U[0])
        return self.V.float() @ self.U.float()

    def is_finite(self) -> bool:
        return bool(torch.isfinite(self.U).all() and torch.isfinite(self.V).all())


@dataclass
class Update:
    """What a method computed for one step (one request or one batch)."""

    method: str
    layers: list[LayerUpdate]  # ascending layer order, applied in that order
    records: list[dict[str, Any]]  # one per request, JSON-ready
    options: dict[str, Any] = field(default_factory=dict)  # the method's settings, stored
    results: list[Any] = field(default_factory=list, repr=False)  # rich per-request objects
    unsafe_reason: str | None = None
    mode: str = ""  # the key mode of a method that has them (ROME's), else ""

    @property
    def norm(self) -> float:
        """√Σ ‖ΔW_l‖²_F over the edited layers."""
        return float(sum(lu.norm**2 for lu in self.layers) ** 0.5)

    def layer_norms(self) -> dict[int, float]:
        return {lu.layer: lu.norm for lu in self.layers}


# ---------------------------------------------------------------- declared settings


@dataclass(frozen=True)
class Option:
    """One setting of a method, as data: what a CLI flag, an app field or a check needs."""

    name: str
    type: type
    default: Any
    help: str
    low: float | None = None  # lowest value (numbers)
    inclusive: bool = True  # whether ``low`` itself is allowed
    choices: tuple[Any, ...] | None = None
    legacy: str | None = None  # the flat preset field it was stored under before
    high: float | None = None  # highest value, allowed (numbers)

    def problem(self, value: Any) -> str | None:
        """Why ``value`` is refused, or None."""
        if self.choices is not None:
            ok = value in self.choices
            shown = ", ".join(map(str, self.choices))
            return None if ok else f"must be one of {shown}, not {value!r}"
        if self.type is bool:
            return None if isinstance(value, bool) else f"must be true or false, not {value!r}"
        if self.type is str:
            return None if isinstance(value, str) else f"must be text, not {value!r}"
        whole = self.type is int
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            return f"must be {'a whole number' if whole else 'a number'}, not {value!r}"
        if whole and not float(value).is_integer():
            return f"must be a whole number, not {value!r}"
        if not math.isfinite(value):
            return f"must be finite, not {value!r}"
        low_bad = self.low is not None and (
            value < self.low or (value == self.low and not self.inclusive)
        )
        if low_bad or (self.high is not None and value > self.high):
            return f"must be in {self.range_text()}, not {value!r}"
        return None

    def range_text(self) -> str:
        left = "[" if self.inclusive else "("
        low = "-inf" if self.low is None else f"{self.low:g}"
        high = "inf" if self.high is None else f"{self.high:g}"
        return f"{left}{low}, {high}]"

    def check(self, value: Any, method: str) -> Any:
        """``value`` as this option's type; one BadRequestError naming it if refused."""
        why = self.problem(value)
        if why is not None:
            raise BadRequestError(f"{method}: setting {self.name} {why}")
        return self.type(value) if self.type in (int, float) else value

    def parse(self, text: str, method: str) -> Any:
        """The value of a ``KEY=VALUE`` text (a CLI's ``--opt``), checked."""
        value: Any = text
        if self.type is bool:
            low = text.strip().lower()
            if low in ("true", "1", "yes", "false", "0", "no"):
                value = low in ("true", "1", "yes")
        elif self.type in (int, float):
            try:
                value = float(text) if self.type is float else int(text)
            except ValueError:
                pass  # refused by check, naming the setting
        return self.check(value, method)


def setting(
    default: Any,
    help: str,
    *,
    low: float | None = None,
    inclusive: bool = True,
    choices: tuple[Any, ...] | None = None,
    legacy: str | None = None,
    high: float | None = None,
) -> Any:
    """A settings-dataclass field with what :class:`Option` reads (help, range, old name)."""
    meta = {"help": help, "low": low, "inclusive": inclusive, "choices": choices, "high": high}
    return field(default=default, metadata={**meta, "legacy": legacy})


_TYPES = {"bool": bool, "int": int, "float": float, "str": str}


def options_of(settings_type: type) -> list[Option]:
    """The options a settings dataclass declares, in field order."""
    out = []
    for f in dataclasses.fields(settings_type):
        kind = f.type if isinstance(f.type, type) else _TYPES.get(str(f.type), str)
        out.append(
            Option(
                name=f.name,
                type=kind,
                default=f.default,
                help=f.metadata.get("help", ""),
                low=f.metadata.get("low"),
                inclusive=f.metadata.get("inclusive", True),
                choices=f.metadata.get("choices"),
                legacy=f.metadata.get("legacy"),
                high=f.metadata.get("high"),
            )
        )
    return out


@dataclass(frozen=True)
class NoSettings:
    """The settings of a method that has none."""


@dataclass(frozen=True)
class Capabilities:
    """What a method can do, for the CLI, the app and a replay to ask instead of its name."""

    batched: bool  # one update for many requests; False: one request per step
    key_modes: tuple[str, ...] = ()  # ROME's key modes; () for a method without any
    needs_c0: bool = True  # reads the layer's second moment (statistics)
    templates: str = "family"  # the context templates it reads: "rome", "family" or "none"


# ---------------------------------------------------------------- the protocol


@runtime_checkable
class Method(Protocol):
    """An editing method: the registry in :mod:`rome.methods` holds one per name."""

    name: str
    summary: str  # one line for a method list
    capabilities: Capabilities

    @property
    def Settings(self) -> type:  # noqa: N802  (a class: the method's settings dataclass)
        """A frozen dataclass of :func:`setting` fields."""
        ...

    def settings(self, hp: EditHparams, overrides: Mapping[str, Any] | None = None) -> Any:
        """This method's settings: defaults < the preset's < ``overrides``, each checked."""
        ...

    def layers(self, ctx: EditContext, settings: Any = None) -> list[int]:
        """The layers this method edits (with ``settings``, else the preset's)."""
        ...

    def compute(
        self,
        ctx: EditContext,
        requests: Sequence[EditRequest],
        settings: Any,
        progress: Progress | None = None,
    ) -> Update:
        """The update for ``requests`` on the model as it is now; the model is unchanged after."""
        ...

    def fold(self, state: Any, update: Update) -> Any:
        """The carried state after ``update`` is applied (a new object; ``state`` untouched).

        Reads only what the store keeps of a step (its layers, their keys), so a
        resume rebuilds the state by folding the stored steps again.
        """
        ...

    def stores_keys(self, settings: Any) -> bool:
        """Whether each step keeps its keys (``LayerUpdate.keys``) to rebuild the state."""
        ...

    def cannot_edit(self, ctx: EditContext, settings: Any) -> str | None:
        """Why this method cannot edit the context's model with ``settings`` (None: it can)."""
        ...


class MethodBase:
    """Defaults for a :class:`Method`: settings from the dataclass, no carried state."""

    name: str = ""
    summary: str = ""
    capabilities: Capabilities = Capabilities(batched=True)
    Settings: type = NoSettings

    def options(self) -> list[Option]:
        return options_of(self.Settings)

    def settings(self, hp: EditHparams, overrides: Mapping[str, Any] | None = None) -> Any:
        return resolve_settings(self.name, self.Settings, hp, overrides)

    def layers(self, ctx: EditContext, settings: Any = None) -> list[int]:
        return [ctx.check_layer(x) for x in ctx.hp.edited_layers()]

    def fold(self, state: Any, update: Update) -> Any:
        return state

    def stores_keys(self, settings: Any) -> bool:
        return False

    def cannot_edit(self, ctx: EditContext, settings: Any) -> str | None:
        return None


def resolve_settings(
    method: str, settings_type: type, hp: EditHparams, overrides: Mapping[str, Any] | None
) -> Any:
    """``settings_type`` with the preset's values for ``method`` (its ``method_settings``
    entry, else a ``shared_settings`` value its setting names, else a preset field it
    names) and then ``overrides``, every value checked."""
    options = {o.name: o for o in options_of(settings_type)}
    own = dict(hp.method_settings.get(method, {}))
    legacy = hp.shared_settings
    values: dict[str, Any] = {}
    for o in options.values():
        if o.name in own:
            values[o.name] = own.pop(o.name)
        elif o.legacy is not None and o.legacy in legacy:
            values[o.name] = legacy[o.legacy]
        elif o.legacy is not None and hasattr(hp, o.legacy):  # a preset field it reads
            values[o.name] = getattr(hp, o.legacy)
    _unknown(method, own, options)
    _unknown(method, overrides or {}, options)
    values.update(overrides or {})
    checked = {k: options[k].check(v, method) for k, v in values.items()}
    return settings_type(**checked)


def _unknown(method: str, values: Mapping[str, Any], options: Mapping[str, Option]) -> None:
    unknown = sorted(set(values) - set(options))
    if unknown:
        raise BadRequestError(
            f"{method}: unknown setting(s) {', '.join(unknown)}; it has "
            f"{', '.join(options) or 'none'}"
        )


def check_overrides(method: Method, values: Mapping[str, Any]) -> dict[str, Any]:
    """``values`` as ``method``'s settings (each name declared, each value checked); a
    text value (a form's, a CLI's) is parsed as its option's type."""
    options = {o.name: o for o in options_of(method.Settings)}
    _unknown(method.name, values, options)
    out = {}
    for key, value in values.items():
        o = options[key]
        out[key] = (
            o.parse(value, method.name)
            if isinstance(value, str) and o.type is not str
            else o.check(value, method.name)
        )
    return out


def parse_pairs(method: Method, pairs: Sequence[str]) -> dict[str, Any]:
    """``KEY=VALUE`` texts (a CLI's repeated ``--opt``) as ``method``'s settings."""
    values: dict[str, str] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key.strip():
            raise BadRequestError(f"--opt takes KEY=VALUE, not {pair!r}")
        values[key.strip()] = value.strip()
    return check_overrides(method, values)


def settings_dict(settings: Any) -> dict[str, Any]:
    """A settings dataclass as a JSON-ready dict (what a step stores in its options)."""
    if dataclasses.is_dataclass(settings) and not isinstance(settings, type):
        return dataclasses.asdict(settings)
    return {}
