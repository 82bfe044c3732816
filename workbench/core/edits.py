"""One edit previewed without keeping it: compute it in one key mode or all, and
the model's text before and with each mode's update (undone afterwards, or left for a
caller that drops the model).

What ``rome-workbench edit`` shows; the app's Edit tab goes through
:class:`workbench.core.session.Session`, which also keeps and records edits.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

from rome import MODES, BadRequestError, Editor, EditRequest, EditResult, LoadedModel
from rome.hparams import EditHparams
from rome.progress import Progress

from .generation import greedy

#: the ``--mode`` value that asks for every key mode
ALL_MODES = "all"


@dataclass
class Preview:
    """Each mode's result, and the greedy text before and with each update."""

    request: EditRequest
    results: dict[str, EditResult]
    before: str
    after: dict[str, str] = field(default_factory=dict)

    def records(self) -> list[dict]:
        """Each result's JSON record with its generations (factors included)."""
        return [
            {**r.to_dict(), "generation_before": self.before, "generation_after": self.after[m]}
            for m, r in self.results.items()
        ]


def modes_for(mode: str) -> list[str]:
    """The key modes a ``--mode`` value names (``all``: every one)."""
    if mode not in (*MODES, ALL_MODES):
        raise BadRequestError(f"unknown mode {mode!r}: {', '.join(MODES)}, {ALL_MODES}")
    return list(MODES) if mode == ALL_MODES else [mode]


def make_editor(
    lm: LoadedModel,
    templates: Sequence[str] | str | Path | None = None,
    hparams: EditHparams | None = None,
) -> Editor:
    """An editor on ``lm`` (templates: a list, or a JSON file of them; ``hparams``: other
    settings than the loaded preset's, a method's own), its layer checked."""
    if isinstance(templates, (str, Path)):
        from rome.templates import load_templates_file

        templates = load_templates_file(Path(templates))
    hp = lm.hparams if hparams is None else hparams
    ed = Editor(lm.model, lm.tokenizer, hp, templates=templates)
    ed.check_layer(hp.layer)
    return ed


def generations_with(
    lm: LoadedModel,
    editor: Editor,
    results: dict[str, EditResult],
    text: str,
    tokens: int,
    restore: bool = True,
) -> tuple[str, dict[str, str]]:
    """Greedy continuation of ``text`` now, and with each result applied; each result's
    after-edit probabilities are scored while it is applied (:meth:`Editor.score_applied`:
    what compute's trial measures, without one). Each update is undone after, but for
    the last one when not ``restore`` (a caller about to drop the model: one write
    less). An unsafe update is applied only for a moment, to score it, and never kept."""
    before = greedy(lm.model, lm.tokenizer, [text], tokens)[0]
    after: dict[str, str] = {}
    for i, (mode, res) in enumerate(results.items()):
        last = i == len(results) - 1
        finite = bool(torch.isfinite(res.u).all() and torch.isfinite(res.v).all())
        if finite:  # a non-finite update scores NaN, as compute's trial leaves it
            editor.apply(res, force=True)
            editor.score_applied(res)
        if res.unsafe_reason:
            after[mode] = f"(not applied: {res.unsafe_reason})"
        else:
            after[mode] = greedy(lm.model, lm.tokenizer, [text], tokens)[0]
        if finite and (restore or not last or res.unsafe_reason):
            editor.undo()
    return before, after


def preview_edit(
    lm: LoadedModel,
    editor: Editor,
    req: EditRequest,
    modes: Sequence[str],
    tokens: int,
    progress: Progress | None = None,
    restore: bool = True,
) -> Preview:
    """Compute ``req`` in ``modes`` (one v* shared) and the text before and after each.

    Each mode's update is written once to score it and generate with it (no trial in
    compute), and undone after, but for the last when not ``restore``.
    ``req`` is checked once: by the caller at its boundary (the CLI validates it
    before loading the model), else by the editor; a validated request is not
    checked again."""
    results = editor.compare(req, progress=progress, modes=list(modes), probe_after=False)
    before, after = generations_with(lm, editor, results, req.text, tokens, restore)
    return Preview(req, results, before, after)
