"""The registry of editing methods, by name: one explicit list, nothing registers on import.

A new method is one file in this package and one line in :data:`BUILTIN`; a
test or a plug-in adds its own with :func:`register` (and takes it out again
with :func:`unregister`).
"""

from __future__ import annotations

from ..errors import BadRequestError
from ..hparams import EditHparams, use_settings_check
from .alphaedit import AlphaEdit
from .base import Method, check_overrides, options_of
from .emmet import Emmet
from .encore import Encore
from .memit import Memit
from .memit_seq import MemitSeq
from .nas import MemitNas, Nas
from .prune import Prune
from .rect import Rect
from .rome import Rome
from .ultraedit import UltraEdit

#: the methods that ship, in the order lists show them
BUILTIN: tuple[Method, ...] = (
    Rome(),
    Memit(),
    Emmet(),
    AlphaEdit(),
    MemitSeq(),
    Rect(),
    UltraEdit(),
    Encore(),
    Nas(),
    MemitNas(),
    Prune(),
)

METHODS: dict[str, Method] = {m.name: m for m in BUILTIN}


def register(method: Method) -> Method:
    """Add a method to the registry (a test's toy method, a plug-in)."""
    if not isinstance(method, Method):
        raise TypeError(f"{method!r} does not implement rome.methods.Method")
    METHODS[method.name] = method
    return method


def unregister(name: str) -> None:
    """Take a method added with :func:`register` out again."""
    METHODS.pop(name, None)


def get_method(name: str) -> Method:
    try:
        return METHODS[name]
    except KeyError:
        raise BadRequestError(
            f"unknown method {name!r}: use one of {', '.join(sorted(METHODS))}"
        ) from None


def method_names() -> list[str]:
    """The registered methods' names, in registry order (the built-in ones first)."""
    return list(METHODS)


def check_preset(hp: EditHparams) -> None:
    """A preset's ``method`` is registered and each entry of its ``method_settings`` (the
    old flat fields in ``shared_settings`` too) is accepted by the method it names."""
    if hp.method not in METHODS:
        raise BadRequestError(
            f"method must be one of {', '.join(sorted(METHODS))}, not {hp.method!r}"
        )
    for name, values in hp.method_settings.items():
        method = METHODS.get(name)
        if method is None:
            raise BadRequestError(
                f"preset field method_settings names {name!r}, which is not a method "
                f"(methods: {', '.join(sorted(METHODS))})"
            )
        check_overrides(method, values)  # each name and value; then the whole, cross-checked
        method.settings(hp)
    flat = hp.shared_settings
    for method in METHODS.values():
        for o in options_of(method.Settings):
            if o.legacy is not None and o.legacy in flat:
                why = o.problem(flat[o.legacy])
                if why is not None:
                    raise BadRequestError(f"preset field {o.legacy} {why}")


use_settings_check(check_preset)
