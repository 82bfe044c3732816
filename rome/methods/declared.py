"""Settings a method declares for itself: name, type, default, range, help.

A method that declares settings reads them from its entry of the preset's
``method_settings`` (``{"rect": {"keep_percent": 40}}``), overridden by the
step's options of the same names; a value of the wrong type or out of range is
one :class:`~rome.errors.BadRequestError` naming the method and the setting, at
preset load (``check_settings``) and again at compute.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from ..errors import BadRequestError

__all__ = ["BadRequestError", "Setting", "check", "read"]


@dataclass(frozen=True)
class Setting:
    """One declared setting. ``kind``: "float", "int", "bool" or "choice" (of ``choices``)."""

    name: str
    kind: str
    default: Any
    help: str
    low: float | None = None
    high: float | None = None
    low_open: bool = False  # the lowest value itself is refused
    choices: tuple[str, ...] = ()

    def problem(self, value: Any) -> str | None:
        """Why ``value`` is refused, or None."""
        if self.kind == "bool":
            return None if isinstance(value, bool) else f"must be true or false, not {value!r}"
        if self.kind == "choice":
            ok = value in self.choices
            return None if ok else f"must be one of {', '.join(self.choices)}, not {value!r}"
        whole = self.kind == "int"
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            return f"must be {'a whole number' if whole else 'a number'}, not {value!r}"
        if whole and not isinstance(value, int):
            return f"must be a whole number, not {value!r}"
        if not math.isfinite(value):
            return f"must be finite, not {value!r}"
        low_bad = self.low is not None and (
            value < self.low or (self.low_open and value == self.low)
        )
        if low_bad or (self.high is not None and value > self.high):
            return f"must be in {self.range_text()}, not {value!r}"
        return None

    def range_text(self) -> str:
        left = "(" if self.low_open else "["
        low = "-inf" if self.low is None else f"{self.low:g}"
        high = "inf" if self.high is None else f"{self.high:g}"
        return f"{left}{low}, {high}]"


def check(method: str, declared: Sequence[Setting], values: Mapping[str, Any]) -> dict[str, Any]:
    """``values`` over the defaults, every one checked; one error for the first refused."""
    by_name = {s.name: s for s in declared}
    unknown = sorted(set(values) - set(by_name))
    if unknown:
        raise BadRequestError(
            f"{method}: unknown setting(s) {', '.join(unknown)}; it has "
            f"{', '.join(by_name) or 'none'}"
        )
    out = {s.name: s.default for s in declared}
    for name, value in values.items():
        why = by_name[name].problem(value)
        if why is not None:
            raise BadRequestError(f"{method}: setting {name} {why}")
        out[name] = float(value) if by_name[name].kind == "float" else value
    return out


def read(
    method: str, declared: Sequence[Setting], preset: Mapping[str, Any], options: Mapping[str, Any]
) -> dict[str, Any]:
    """The step's settings: the preset's entry for ``method``, then the options that
    name a declared setting."""
    names = {s.name for s in declared}
    given = dict(preset.get(method, {}))
    given.update({k: v for k, v in options.items() if k in names})
    return check(method, declared, given)
