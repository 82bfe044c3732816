"""The ``rome-workbench`` command line (typer): a thin face over ``workbench.core``.

Each command parses its options, calls core, and renders the result with rich:
``common`` (the app, the error handler, options), ``model`` (info, stats,
edit; ``editing`` holds edit's phases), ``replay``, ``runs`` (runs, history,
export, plot, save), ``compare`` (compare, merge).
Exit codes come from one table (``workbench.core.errors``): 0 ok, 1 runtime
error (weights unavailable, unsafe update, store failure, memory, system),
2 usage or bad input (bad request, unknown preset / model / run, layer out of
range, bad replay settings, bad data file). Results go to stdout; messages
to stderr.
"""

from __future__ import annotations  # noqa: I001  (compare after the others)

from . import model, replay, report, runs, state  # noqa: F401  (registers the commands, in order)
from . import compare  # noqa: F401  (compare and merge, after them)
from .common import app, handled


def main() -> None:
    """The ``rome-workbench`` entry point."""
    app()


__all__ = ["app", "handled", "main"]
