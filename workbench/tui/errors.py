"""The one place that turns an exception into something a user can act on.

``describe_error`` never returns a traceback: a title, what happened (one
line) and what to do. The app shows it as a notification, or as a dialog
for errors that need attention (out of memory, unexpected failures).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

from rome import errors as rerr

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ErrorInfo:
    title: str
    message: str
    hint: str
    severity: str = "error"  # "error" | "warning"
    dialog: bool = False

    @property
    def text(self) -> str:
        return f"{self.message}\n{self.hint}" if self.hint else self.message


def _is_oom(exc: BaseException) -> bool:
    if isinstance(exc, MemoryError):
        return True
    try:
        import torch

        oom = getattr(torch, "OutOfMemoryError", None) or torch.cuda.OutOfMemoryError
        if isinstance(exc, oom):
            return True
    except Exception:  # pragma: no cover - torch always importable here
        pass
    text = str(exc).lower()
    return isinstance(exc, RuntimeError) and (
        "out of memory" in text or "can't allocate memory" in text
    )


def describe_error(exc: BaseException, doing: str = "") -> ErrorInfo:
    """A user-facing description of ``exc`` raised while ``doing`` something."""
    what = f"{doing} failed" if doing else "Failed"
    msg = str(exc).strip() or type(exc).__name__
    if _is_oom(exc):
        return ErrorInfo(
            f"{what}: out of memory",
            msg.splitlines()[0][:300],
            "Load the model with dtype bfloat16 or float16, choose a smaller model, "
            "lower the replay's GLUE limit, or close other programs using the memory.",
            dialog=True,
        )
    if isinstance(exc, rerr.SubjectNotFoundError):
        return ErrorInfo(
            what,
            msg,
            "The subject must appear in the prompt exactly as typed (case and spaces).",
        )
    if isinstance(exc, rerr.BadRequestError):
        return ErrorInfo(what, msg, "Correct the field in the Edit tab and try again.")
    if isinstance(exc, rerr.LayerOutOfRangeError):
        return ErrorInfo(what, msg, "Pick a layer in range; the Model tab shows the layer count.")
    if isinstance(exc, rerr.UnsafeUpdateError):
        return ErrorInfo(
            f"{what}: update refused",
            msg,
            "Try the rrome or prompt key mode, or another layer; the weights are unchanged.",
            severity="warning",
        )
    if isinstance(exc, rerr.NothingToUndoError):
        return ErrorInfo("Nothing to undo", msg, "", severity="warning")
    if isinstance(exc, rerr.UnknownPresetError):
        return ErrorInfo(
            f"{what}: unknown model",
            msg,
            "Pick a preset from the suggestions, a local folder with config.json, "
            "or a hub id (needs the network).",
        )
    if isinstance(exc, rerr.WeightsUnavailableError):
        return ErrorInfo(
            f"{what}: weights unavailable",
            msg,
            "Offline? Download the model where there is a network and give its folder, "
            "or use the embedded smollm2-135m.",
            dialog=True,
        )
    if isinstance(exc, rerr.UnsupportedArchitectureError):
        return ErrorInfo(
            f"{what}: unsupported architecture",
            msg,
            "Write a preset JSON with the module names (see rome/presets) and load it.",
            dialog=True,
        )
    if isinstance(exc, rerr.RomeError):
        return ErrorInfo(what, msg, "")
    try:
        from workbench.store import RunLockedError, StoreError
    except Exception:  # pragma: no cover
        StoreError = RunLockedError = ()  # type: ignore[assignment,misc]
    if isinstance(exc, RunLockedError):
        return ErrorInfo(f"{what}: run in use", msg, "", severity="warning")
    if isinstance(exc, StoreError):
        return ErrorInfo(
            f"{what}: database problem",
            msg,
            "Edits still work on the model; only saving them to the history is affected.",
            dialog=True,
        )
    try:
        from evals.errors import DataUnavailableError, EvalDataError
    except Exception:  # pragma: no cover
        DataUnavailableError = EvalDataError = ()  # type: ignore[assignment,misc]
    if isinstance(exc, EvalDataError):
        return ErrorInfo(
            f"{what}: data problem",
            msg,
            "Check the CounterFact file (ROME or MEND format) or use the bundled sample.",
        )
    if isinstance(exc, DataUnavailableError):
        return ErrorInfo(
            f"{what}: data unavailable",
            msg,
            "Offline? Use the bundled sample or a local file.",
        )
    if isinstance(exc, FileNotFoundError):
        return ErrorInfo(f"{what}: file not found", msg, "Check the path.")
    if isinstance(exc, PermissionError):
        return ErrorInfo(f"{what}: permission denied", msg, "Check the file's permissions.")
    if isinstance(exc, OSError):
        return ErrorInfo(f"{what}: system error", msg, "Check disk space and paths.")
    return ErrorInfo(
        f"{what}: unexpected error",
        f"{type(exc).__name__}: {msg.splitlines()[0][:300] if msg else ''}",
        "This is a bug in the workbench. The details are in the log file; the app keeps working.",
        dialog=True,
    )
