"""The registry of editing methods, by name: one explicit list, nothing registers on import.

A new method is one file in this package and one line in :data:`BUILTIN`; a
test or a plug-in adds its own with :func:`register` (and takes it out again
with :func:`unregister`).
"""

from __future__ import annotations

from ..errors import BadRequestError
from .alphaedit import AlphaEdit
from .base import Method
from .emmet import Emmet
from .memit import Memit
from .rome import Rome

#: the methods that ship, in the order lists show them
BUILTIN: tuple[Method, ...] = (Rome(), Memit(), Emmet(), AlphaEdit())

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
