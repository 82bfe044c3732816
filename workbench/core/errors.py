"""The one table from error type to exit code, title, one-line message and hint.

Both faces read it: ``workbench.cli`` turns :attr:`ErrorInfo.exit_code` into
the process's exit status and prints :attr:`ErrorInfo.message`; the app shows
the title, message and hint as a notification, or as a dialog when
:attr:`ErrorInfo.dialog` is set. An exception that matches no row is
unexpected (a bug): :func:`describe` says so (``expected=False``), the CLI lets
it raise with its traceback, the app shows it in a dialog.

Exit codes: 0 ok, 1 runtime failure (weights unavailable, unsafe update, store,
memory, system), 2 bad input (request, model name, layer, run id or an ambiguous
prefix of one, a resume onto another model or changed data, data file, a
database path with no database, an output file that cannot be written there).
"""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from evals.errors import DataUnavailableError, EvalDataError
from evals.replay import ReplayError
from rome import errors as rerr
from workbench.store import errors as serr
from workbench.store.merge import MergeInputError

log = logging.getLogger(__name__)

Severity = Literal["error", "warning"]

EXIT_OK = 0
EXIT_FAILURE = 1
EXIT_BAD_INPUT = 2


class OutputPathError(Exception):
    """A file the user asked for (``-o``, ``--json-out``, a new ``--db``) that cannot be
    written there: a folder, a file where a folder should be, no permission, an
    unsupported format."""


class WriteError(OSError):
    """A file could not be written (a full disk, a read-only file system), said in one
    line; whatever was half-written has been removed."""


_SAFETENSORS_OS = re.compile(r'message: "([^"]+)"')


def write_error(exc: BaseException, path: Path | str) -> WriteError | None:
    """``exc`` as a :class:`WriteError` about ``path`` when it is a failed write: an
    ``OSError``, or safetensors' error (its Rust message wraps the system's).
    ``None`` for anything else."""
    from safetensors import SafetensorError

    if isinstance(exc, WriteError):
        return exc
    if isinstance(exc, OSError):
        why = exc.strerror or str(exc)
    elif isinstance(exc, SafetensorError):
        found = _SAFETENSORS_OS.search(str(exc))
        why = found[1] if found else str(exc).splitlines()[0]
    else:
        return None
    return WriteError(f"cannot write {path}: {why}")


def where_problem(path: Path) -> str | None:
    """Why nothing can be created at ``path`` (``None``: it can): a file in the way
    of its folder, or no permission to write in the nearest folder that exists.
    Missing folders on the way are fine (the writer makes them); ``path`` itself is
    not looked at."""
    above = path.expanduser().absolute().parent
    while not above.exists() and above != above.parent:
        above = above.parent
    if not above.is_dir():
        return f"{above} is a file, not a folder"
    if not os.access(above, os.W_OK | os.X_OK):
        return f"no permission to write in {above}"
    return None


@dataclass(frozen=True)
class ErrorKind:
    """One row of the table: which exceptions, and what to tell the user about them."""

    types: tuple[type[BaseException], ...]
    exit_code: int
    title: str  # "" for none: the title is then "<doing> failed"
    hint: str
    severity: Severity = "error"
    dialog: bool = False
    matches: Callable[[BaseException], bool] | None = None  # a further test on the instance


@dataclass(frozen=True)
class ErrorInfo:
    """What to tell the user about one exception."""

    title: str
    message: str  # one line, no traceback
    hint: str
    exit_code: int
    severity: Severity = "error"
    dialog: bool = False
    expected: bool = True  # False: matched no row of the table (a bug)

    @property
    def text(self) -> str:
        """Message and hint on two lines (the hint left out when empty)."""
        return f"{self.message}\n{self.hint}" if self.hint else self.message


def is_out_of_memory(exc: BaseException) -> bool:
    """CPU or GPU out-of-memory, whichever way torch or Python reports it."""
    if isinstance(exc, MemoryError):
        return True
    import torch

    oom = getattr(torch, "OutOfMemoryError", None) or torch.cuda.OutOfMemoryError
    if isinstance(exc, oom):
        return True
    text = str(exc).lower()
    return isinstance(exc, RuntimeError) and (
        "out of memory" in text or "can't allocate memory" in text
    )


_OOM_HINT = (
    "Load the model with dtype bfloat16 or float16, choose a smaller model, "
    "lower the replay's GLUE limit, or close other programs using the memory."
)

#: Most specific first: the first row whose types (and ``matches``) fit wins.
ERROR_TABLE: tuple[ErrorKind, ...] = (
    ErrorKind(
        (MemoryError, RuntimeError), 1, "out of memory", _OOM_HINT, dialog=True,
        matches=is_out_of_memory,
    ),
    ErrorKind(
        (rerr.SubjectNotFoundError,), 2, "",
        "The subject must appear in the prompt exactly as typed (case and spaces).",
    ),
    ErrorKind(
        (rerr.InvalidDeviceError, rerr.DeviceMapError), 2, "device",
        "Use device auto, cpu or cuda[:N], dtype float32, bfloat16 or float16.",
    ),
    ErrorKind(
        (rerr.CacheDirError,), 2, "cache folder",
        "Point $ROME_WORKBENCH_CACHE at a folder you can write to.",
    ),
    ErrorKind(
        (rerr.CorruptStatsError,), 1, "statistics file",
        "Rebuild it with rome-workbench stats --force, or delete the file.",
    ),
    ErrorKind(
        (rerr.BadStatsError,), 2, "statistics refused",
        "Import the .npz written for this model and layer; the cached statistics are unchanged.",
    ),
    ErrorKind(
        (rerr.DistributedMismatchError,), 2, "ranks disagree",
        "Launch every rank with the same model, layer and corpus.",
    ),
    ErrorKind((rerr.BadRequestError,), 2, "", "Correct the field in the Edit tab and try again."),
    ErrorKind(
        (rerr.LayerOutOfRangeError,), 2, "",
        "Pick a layer in range; the Model tab shows the layer count.",
    ),
    ErrorKind(
        (rerr.UnsafeUpdateError,), 1, "update refused",
        "Try the rrome or prompt key mode, or another layer; the weights are unchanged.",
        severity="warning",
    ),
    ErrorKind((rerr.NothingToUndoError,), 1, "nothing to undo", "", severity="warning"),
    ErrorKind(
        (rerr.UnknownPresetError,), 2, "unknown model",
        "Pick a preset from the suggestions, a local folder with config.json, "
        "or a hub id (needs the network).",
    ),
    ErrorKind(
        (rerr.WeightsUnavailableError,), 1, "weights unavailable",
        "Offline? Download the model where there is a network and give its folder, "
        "or use the embedded smollm2-135m.",
        dialog=True,
    ),
    ErrorKind(
        (rerr.UnsupportedArchitectureError,), 2, "unsupported architecture",
        "Write a preset JSON with the module names (see rome/presets) and load it.",
        dialog=True,
    ),
    ErrorKind(
        (ReplayError,), 2, "replay refused",
        "Resume a run with the model and data it started with, or start a new run.",
    ),
    ErrorKind((rerr.RomeError,), 1, "", ""),
    ErrorKind(
        (serr.UnknownRunError, serr.AmbiguousRunError, serr.InvalidFieldError), 2, "",
        "List the runs (rome-workbench runs, or the Replay and History tabs) to see them.",
    ),
    ErrorKind(
        (serr.StoreNotFoundError,), 2, "no database",
        "Check the path; a replay (or an edit kept in the app) creates the database.",
    ),
    ErrorKind((serr.RunLockedError,), 1, "run in use", "", severity="warning"),
    ErrorKind(
        (MergeInputError,), 2, "merge refused",
        "Merge workbench databases only, each run's copies the same.",
    ),
    ErrorKind(
        (serr.StoreError,), 1, "database problem",
        "Edits still work on the model; only saving them to the history is affected.",
        dialog=True,
    ),
    ErrorKind(
        (OutputPathError,), 2, "cannot write the file",
        "Choose a file name in a folder you can write to.",
    ),
    ErrorKind(
        (WriteError,), 1, "cannot write the file",
        "Free some disk space or write somewhere else; nothing half-written was kept.",
    ),
    ErrorKind(
        (EvalDataError,), 2, "data problem",
        "Check the CounterFact file (ROME or MEND format) or use the bundled sample.",
    ),
    ErrorKind(
        (DataUnavailableError,), 2, "data unavailable",
        "Offline? Use the bundled sample or a local file.",
    ),
    ErrorKind((FileNotFoundError,), 1, "file not found", "Check the path."),
    ErrorKind((PermissionError,), 1, "permission denied", "Check the file's permissions."),
    ErrorKind((OSError,), 1, "system error", "Check disk space and paths."),
)  # fmt: skip

_UNEXPECTED_HINT = (
    "This is a bug in the workbench. The details are in the log file; the app keeps working."
)


def classify(exc: BaseException) -> ErrorKind | None:
    """The table's row for ``exc``, or ``None`` when it is unexpected."""
    for kind in ERROR_TABLE:
        if isinstance(exc, kind.types) and (kind.matches is None or kind.matches(exc)):
            return kind
    return None


def describe(exc: BaseException, doing: str = "") -> ErrorInfo:
    """What to tell the user about ``exc``, raised while ``doing`` something."""
    what = f"{doing} failed" if doing else "Failed"
    msg = str(exc).strip() or type(exc).__name__
    kind = classify(exc)
    if kind is None:
        first = msg.splitlines()[0][:300] if msg else ""
        return ErrorInfo(
            f"{what}: unexpected error",
            f"{type(exc).__name__}: {first}",
            _UNEXPECTED_HINT,
            EXIT_FAILURE,
            dialog=True,
            expected=False,
        )
    if kind.matches is is_out_of_memory:
        msg = msg.splitlines()[0][:300]
    title = f"{what}: {kind.title}" if kind.title else what
    if isinstance(exc, rerr.NothingToUndoError):
        title = "Nothing to undo"
    return ErrorInfo(title, msg, kind.hint, kind.exit_code, kind.severity, kind.dialog)


def exit_code(exc: BaseException) -> int:
    """The CLI's exit status for ``exc`` (1 for an unexpected one)."""
    kind = classify(exc)
    return kind.exit_code if kind is not None else EXIT_FAILURE
