"""Named errors of the evaluation package."""

from __future__ import annotations


class EvalDataError(ValueError):
    """A data file that cannot be read (not JSON, unknown format, unknown task...)."""


class DataUnavailableError(RuntimeError):
    """A data set that cannot be fetched (offline, hub down...)."""
