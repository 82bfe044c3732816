"""The progress callbacks the engine, the evals and the workbench take.

A long job reports through ``Progress(phase, done, total)``; a loop inside one
phase (covariance texts, calibration edits, v* steps) through
``StepProgress(done, total)``, which its caller wraps with the phase's name.
"""

from __future__ import annotations

from collections.abc import Callable

Progress = Callable[[str, int, int], None]  # (phase, done, total)
StepProgress = Callable[[int, int], None]  # (done, total) within one phase
