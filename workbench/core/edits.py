"""One edit previewed without keeping it: compute it in one key mode or all, and
the model's text before and with each mode's update (undone afterwards).

What ``rome-workbench edit`` shows; the app's Edit tab goes through
:class:`workbench.core.session.Session`, which also keeps and records edits.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from rome import MODES, BadRequestError, Editor, EditRequest, EditResult, LoadedModel
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


def make_editor(lm: LoadedModel, templates: Sequence[str] | str | Path | None = None) -> Editor:
    """An editor on ``lm`` (templates: a list, or a JSON file of them), its layer checked."""
    if isinstance(templates, (str, Path)):
        from rome.templates import load_templates_file

        templates = load_templates_file(Path(templates))
    ed = Editor(lm.model, lm.tokenizer, lm.hparams, templates=templates)
    ed.check_layer(lm.hparams.layer)
    return ed


def generations_with(
    lm: LoadedModel, editor: Editor, results: dict[str, EditResult], text: str, tokens: int
) -> tuple[str, dict[str, str]]:
    """Greedy continuation of ``text`` now, and with each result applied (then undone)."""
    before = greedy(lm.model, lm.tokenizer, [text], tokens)[0]
    after: dict[str, str] = {}
    for mode, res in results.items():
        if res.unsafe_reason:
            after[mode] = f"(not applied: {res.unsafe_reason})"
            continue
        editor.apply(res)
        try:
            after[mode] = greedy(lm.model, lm.tokenizer, [text], tokens)[0]
        finally:
            editor.undo()
    return before, after


def preview_edit(
    lm: LoadedModel,
    editor: Editor,
    req: EditRequest,
    modes: Sequence[str],
    tokens: int,
    progress: Progress | None = None,
) -> Preview:
    """Compute ``req`` in ``modes`` (one v* shared) and the text before and after each.

    ``req`` is checked once: by the caller at its boundary (the CLI validates it
    before loading the model), else by the editor; a validated request is not
    checked again."""
    results = editor.compare(req, progress=progress, modes=list(modes))
    before, after = generations_with(lm, editor, results, req.text, tokens)
    return Preview(req, results, before, after)
