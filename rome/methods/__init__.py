"""The editing methods, by name: each implements :class:`~rome.methods.base.Method`.

Importing this package registers every method (the family modules register
themselves in :mod:`rome.methods.registry` on import).
"""

from __future__ import annotations

from . import (  # noqa: F401  (they register themselves)
    alphaedit,
    emmet,
    encore,
    memit,
    memit_seq,
    nas,
    prune,
    rect,
    ultraedit,
)
from .base import LayerUpdate, Method, Update
from .registry import METHODS, get_method, register
from .rome import update_of

__all__ = ["METHODS", "LayerUpdate", "Method", "Update", "get_method", "register", "update_of"]
