"""The registry of editing methods, by name (each implements :class:`~rome.methods.base.Method`)."""

from __future__ import annotations

from ..errors import BadRequestError
from .base import Method
from .rome import Rome

METHODS: dict[str, Method] = {"rome": Rome()}


def register(method: Method) -> Method:
    """Add a method to the registry (the family modules call this on import)."""
    METHODS[method.name] = method
    return method


def get_method(name: str) -> Method:
    try:
        return METHODS[name]
    except KeyError:
        raise BadRequestError(
            f"unknown method {name!r}: use one of {', '.join(sorted(METHODS))}"
        ) from None
