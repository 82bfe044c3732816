"""Locate-then-edit model editing (ROME and r-ROME; MEMIT, EMMET and AlphaEdit in
``rome.methods``): the engine (no UI code here)."""

from .editor import AppliedEdit, Editor
from .errors import (
    BadRequestError,
    LayerOutOfRangeError,
    NothingToUndoError,
    RomeError,
    SubjectNotFoundError,
    UnknownPresetError,
    UnsafeUpdateError,
    UnsupportedArchitectureError,
    WeightsUnavailableError,
)
from .hparams import MODES, EditHparams, list_presets, load_preset
from .models import LoadedModel, load_model
from .request import EditRequest
from .result import EditResult

__all__ = [
    "MODES",
    "AppliedEdit",
    "BadRequestError",
    "EditHparams",
    "EditRequest",
    "EditResult",
    "Editor",
    "LayerOutOfRangeError",
    "LoadedModel",
    "NothingToUndoError",
    "RomeError",
    "SubjectNotFoundError",
    "UnknownPresetError",
    "UnsafeUpdateError",
    "UnsupportedArchitectureError",
    "WeightsUnavailableError",
    "list_presets",
    "load_model",
    "load_preset",
]
