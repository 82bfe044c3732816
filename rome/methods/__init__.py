"""The editing methods, by name: each implements :class:`~rome.methods.base.Method`.

The registry (:mod:`rome.methods.registry`) lists them explicitly.
"""

from __future__ import annotations

from .base import Capabilities, LayerUpdate, Method, MethodBase, Option, Update, options_of, setting
from .registry import METHODS, get_method, method_names, register, unregister
from .rome import update_of

__all__ = [
    "METHODS",
    "Capabilities",
    "LayerUpdate",
    "Method",
    "MethodBase",
    "Option",
    "Update",
    "get_method",
    "method_names",
    "options_of",
    "register",
    "setting",
    "unregister",
    "update_of",
]
