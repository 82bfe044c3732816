"""Shared machinery of the locate-then-edit family (MEMIT, EMMET, AlphaEdit): FAMILY.md."""

from .loop import FamilyMethod, LayerContext, Solved, moment, use_moment
from .reprs import Located, group_average, locate, reprs_at, subject_last_index
from .templates import family_templates, sample_family_templates, use_templates
from .z import Z_LOOPS, ZResult, compute_z, compute_zs, optimise_zs

__all__ = [
    "FamilyMethod",
    "LayerContext",
    "Located",
    "Solved",
    "ZResult",
    "compute_z",
    "compute_zs",
    "optimise_zs",
    "Z_LOOPS",
    "family_templates",
    "group_average",
    "locate",
    "moment",
    "reprs_at",
    "sample_family_templates",
    "subject_last_index",
    "use_moment",
    "use_templates",
]
