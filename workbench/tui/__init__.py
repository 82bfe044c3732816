"""The Textual workbench: load a model, edit, compare key modes, inspect, undo, replay.

``run_app()`` is the entry point the CLI calls; :class:`WorkbenchApp` is the app.
Everything that touches the model runs in thread workers (see ``jobs.py``) and
reports back through the messages of ``messages.py``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .app import WorkbenchApp

__all__ = ["WorkbenchApp", "run_app"]


def __getattr__(name: str) -> Any:  # import textual only when the app is wanted
    if name in __all__:
        from . import app

        return getattr(app, name)
    raise AttributeError(name)
