"""The editor each method computes on in a session: the session's own, or for a method
with a shipped ``<preset>-<method>`` variant (:func:`rome.hparams.method_preset`) a
:meth:`~rome.Editor.variant` of it: the same weights, applied steps and carried state
(one undo stack), caches of its own taken on the base weights, once."""

from __future__ import annotations

from collections.abc import Sequence

from rome import EditHparams, Editor
from rome.hparams import method_preset
from rome.methods import get_method
from rome.methods.family.templates import family_templates
from rome.progress import Progress


class MethodEditors:
    """The variants of one session editor, by method (dropped with the model)."""

    def __init__(self) -> None:
        self._for: Editor | None = None  # the session editor the variants belong to
        self._variants: dict[str, Editor] = {}

    def get(
        self, ed: Editor, hp: EditHparams, method: str, progress: Progress | None = None
    ) -> Editor:
        """The editor ``method`` computes on when the model's preset is ``hp``."""
        if self._for is not ed:  # a model was (re)loaded: nothing of ours is on it
            self._for, self._variants = ed, {}
        mhp = method_preset(hp, method)
        if mhp == ed.hp:  # its settings are the model's: the session's editor
            return ed
        med = self._variants.get(method)
        if med is None:
            med = ed.variant(mhp)
            uses = get_method(method).capabilities
            with ed.base_weights():  # the session's edits out of the way for a moment
                if uses.templates == "family":
                    family_templates(med)
                if uses.needs_c0:  # C₀ read once
                    for layer in mhp.edited_layers():
                        med.stats(layer, progress)
            self._variants[method] = med
        return med


def method_layers(hp: EditHparams, methods: Sequence[str]) -> dict[str, tuple[str, list[int]]]:
    """Each of ``methods``' preset and edited layers on a model whose preset is ``hp``."""
    out = {}
    for m in methods:
        mhp = method_preset(hp, m)
        out[m] = (mhp.name, mhp.edited_layers())
    return out
