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


class InvalidDeviceError(BadRequestError):
    """An unknown device, dtype or device-map strategy, or a device that is not there."""


class DeviceMapError(BadRequestError):
    """A device map that cannot be used for editing (the edited layer offloaded...)."""


class CacheDirError(BadRequestError):
    """The cache directory is a file or cannot be written."""


class CorruptStatsError(RomeError):
    """A cached statistics file that cannot be read; the message says how to rebuild it."""


class BadStatsError(BadRequestError):
    """Statistics of the wrong shape, non-finite or not symmetric: refused before writing."""


class DistributedMismatchError(BadRequestError):
    """The ranks of a distributed run disagree on the model, layer or corpus."""
