"""Where the workbench keeps its caches (converted models, statistics, templates).

Files in the cache are written atomically (a temporary file in the same folder,
then a rename), so a reader in another process never sees half a file.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import platformdirs

from .errors import CacheDirError

CACHE_ENV = "ROME_WORKBENCH_CACHE"


def cache_root() -> Path:
    """The cache folder's path, without creating or checking it."""
    env = os.environ.get(CACHE_ENV)
    return Path(env) if env else Path(platformdirs.user_cache_dir("rome-workbench"))


def cache_dir() -> Path:
    """``$ROME_WORKBENCH_CACHE`` if set, else the platform's user cache directory.

    Created when missing. Raises :class:`CacheDirError` (one line) when the
    path is a file or the folder cannot be written.
    """
    path = cache_root()
    where = f"${CACHE_ENV}" if os.environ.get(CACHE_ENV) else "the cache directory"
    if path.exists() and not path.is_dir():
        raise CacheDirError(
            f"{where} {path} is a file, not a folder: point ${CACHE_ENV} at a folder"
        )
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise CacheDirError(
            f"cannot create {where} {path} ({exc.strerror or exc}): "
            f"point ${CACHE_ENV} at a writable folder"
        ) from None
    try:  # a real write: os.access says yes to root even on a read-only mount
        tempfile.TemporaryFile(dir=path).close()
    except OSError as exc:
        raise CacheDirError(
            f"{where} {path} is not writable ({exc.strerror or exc}): "
            f"point ${CACHE_ENV} at a writable folder"
        ) from None
    return path


def slug(name: str) -> str:
    """A filesystem-safe name for a model id or path."""
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in name).strip("_") or "model"


def temp_path_beside(path: Path) -> Path:
    """A fresh, unique temporary file next to ``path`` (same folder, so a rename is atomic)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    return Path(name)


def atomic_write_text(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` through a unique temporary file and a rename."""
    tmp = temp_path_beside(path)
    try:
        tmp.write_text(text)
        tmp.replace(path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
