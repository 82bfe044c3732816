"""Where the workbench keeps its caches (converted models, statistics, templates)."""

from __future__ import annotations

import os
from pathlib import Path

import platformdirs

CACHE_ENV = "ROME_WORKBENCH_CACHE"


def cache_dir() -> Path:
    """``$ROME_WORKBENCH_CACHE`` if set, else the platform's user cache directory."""
    env = os.environ.get(CACHE_ENV)
    path = Path(env) if env else Path(platformdirs.user_cache_dir("rome-workbench"))
    path.mkdir(parents=True, exist_ok=True)
    return path


def slug(name: str) -> str:
    """A filesystem-safe name for a model id or path."""
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in name).strip("_") or "model"
