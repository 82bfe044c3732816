"""Small compatibility helpers for the transformers KV-cache argument (renamed in 5.x)."""

from __future__ import annotations

import inspect
from typing import Any

from torch import nn

_CACHE_ARG: dict[type, str] = {}


def cache_kwargs(model: nn.Module, cache: Any) -> dict[str, Any]:
    """``{"cache": c}`` or ``{"past_key_values": c}``, whichever ``model`` takes."""
    name = _CACHE_ARG.get(type(model))
    if name is None:
        params = inspect.signature(model.forward).parameters
        name = _CACHE_ARG[type(model)] = "cache" if "cache" in params else "past_key_values"
    return {name: cache}


def output_cache(out: Any) -> Any:
    """The KV cache a forward returned (``cache`` in 5.x, ``past_key_values`` before)."""
    cache = getattr(out, "cache", None)
    return cache if cache is not None else getattr(out, "past_key_values", None)
