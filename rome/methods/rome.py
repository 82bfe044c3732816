"""ROME as a registry method: one request, one layer, rank one; the key mode is its option."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from ..errors import BadRequestError
from ..request import EditRequest
from .base import LayerUpdate, Update

if TYPE_CHECKING:
    from ..editor import Editor


class Rome:
    """The reference ROME / r-ROME update (``options``: ``mode``, ``layer``, ``fast``,
    ``probe_after``, ``progress``)."""

    name = "rome"
    batched = False

    def layers(self, editor: Editor) -> list[int]:
        return [editor.hp.layer]

    def compute(
        self, editor: Editor, requests: Sequence[EditRequest], options: dict[str, Any]
    ) -> Update:
        if len(requests) != 1:
            raise BadRequestError(
                f"rome edits one request at a time, not {len(requests)}: "
                "use --batch-size 1 or a batched method (memit, emmet, alphaedit)"
            )
        mode = options.get("mode") or editor.hp.default_mode
        res = editor.compute(
            requests[0],
            mode=mode,
            layer=options.get("layer"),
            progress=options.get("progress"),
            fast=options.get("fast", True),
            probe_after=options.get("probe_after", True),
        )
        return update_of(res)

    def after_apply(self, editor: Editor, update: Update) -> None:
        return None


def update_of(res: Any) -> Update:
    """An :class:`Update` holding one ROME :class:`~rome.result.EditResult`."""
    lu = LayerUpdate(res.layer, res.weight_name, res.u[None, :], res.v[:, None])
    return Update(
        method="rome",
        layers=[lu],
        records=[res.to_dict(factors=False)],
        options={"mode": res.mode},
        results=[res],
        unsafe_reason=res.unsafe_reason,
    )
