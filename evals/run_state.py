"""The state of one replay while it runs: what its steps read and change.

:func:`evals.replay.replay` makes one; :func:`evals.steps.edit_step` edits with
its editor and method, appends to its norms and stores through its sink.
"""

from __future__ import annotations

from typing import Any

from rome import Editor, LoadedModel
from rome.methods import get_method

from .sink import ReplaySink
from .spec import ReplayConfig


def run_options(cfg: ReplayConfig) -> dict[str, Any]:
    """The settings a run gives its method: ``method_options``, and the run's key mode
    for a method that has key modes."""
    opts = dict(cfg.method_options)
    if get_method(cfg.method).capabilities.key_modes:
        opts.setdefault("mode", cfg.mode)
    return opts


def run_layers(ed: Editor, cfg: ReplayConfig) -> list[int]:
    """The layers a run edits: its method's, on the run's editor (the run's ``layer``)."""
    method = get_method(cfg.method)
    return method.layers(ed.context(method), method.settings(ed.hp, run_options(cfg)))


class RunState:
    """One replay's model, store, settings, editor and method, and what it has seen."""

    def __init__(
        self, lm: LoadedModel, store: ReplaySink, cfg: ReplayConfig, run_id: str, ed: Editor
    ):
        self.lm, self.store, self.cfg, self.run_id = lm, store, cfg, run_id
        self.editor = ed
        self.layer = ed.hp.layer
        self.method = get_method(cfg.method)
        self.options = run_options(cfg)  # the method's settings given with the run
        self.layers = run_layers(ed, cfg)
        self.norms: list[float] = []  # ‖ΔW‖ of every applied step, in order
        self.base_fluency: float | None = None
        self.base_ppl: float | None = None
        self.last_step_start: int | None = None  # the first seq of the last stored step
