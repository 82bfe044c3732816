"""Named errors of the engine. Each message says what went wrong and what to do."""

from __future__ import annotations


class RomeError(Exception):
    """Base class of every error the engine raises on purpose."""


class BadRequestError(RomeError, ValueError):
    """An edit request that cannot be run (bad template, empty target...)."""


class SubjectNotFoundError(BadRequestError):
    """The subject does not occur among the prompt's tokens."""


class UnknownPresetError(RomeError, KeyError):
    """No preset of that name, and no file at that path."""

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0]) if self.args else ""


class LayerOutOfRangeError(RomeError, ValueError):
    """The requested layer does not exist in the model."""


class UnsafeUpdateError(RomeError):
    """A non-finite or exploding update, refused before touching the weights."""


class WeightsUnavailableError(RomeError):
    """The model's weights cannot be found (offline, wrong path...)."""


class UnsupportedArchitectureError(RomeError):
    """No module-name templates known for this architecture."""


class NothingToUndoError(RomeError):
    """Undo was asked with no applied edit on the stack."""
