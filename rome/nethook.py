"""Forward hooks, only as context managers that always remove themselves.

Three things the engine needs from a module:
- read its input or output (``capture``),
- stop the forward pass once it has run (``stop_after``), so passes that only
  need a layer's keys never run the layers above it,
- add a vector to its output at given token positions (``add_to_output``).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn


class StopForward(Exception):
    """Raised by a hook to end a forward pass early; caught by :func:`stop_after`."""


def get_module(model: nn.Module, name: str) -> nn.Module:
    try:
        return model.get_submodule(name)
    except AttributeError:
        raise LookupError(f"the model has no module named {name!r}") from None


@dataclass
class Captured:
    """What :func:`capture` recorded on the last call of the module."""

    input: torch.Tensor | None = None
    output: torch.Tensor | None = None
    calls: int = 0


@contextmanager
def capture(
    model: nn.Module, name: str, *, stop: bool = False, detach: bool = True
) -> Iterator[Captured]:
    """Record the first positional input and the output of module ``name``.

    With ``stop=True`` the forward pass ends right after that module (wrap the
    call in :func:`stop_after`).
    """
    module = get_module(model, name)
    rec = Captured()

    def hook(_mod: nn.Module, args: tuple[Any, ...], out: Any) -> None:
        x = args[0]
        y = out[0] if isinstance(out, tuple) else out
        rec.input = x.detach() if detach else x
        rec.output = y.detach() if detach else y
        rec.calls += 1
        if stop:
            raise StopForward

    handle = module.register_forward_hook(hook)
    try:
        yield rec
    finally:
        handle.remove()


@contextmanager
def stop_after() -> Iterator[None]:
    """Swallow the :class:`StopForward` a stopping hook raises."""
    try:
        yield
    except StopForward:
        pass


@contextmanager
def capture_block_inputs(model: nn.Module, name: str) -> Iterator[dict[str, Any]]:
    """Record the args and kwargs a block is called with, then stop the pass.

    The engine re-runs the blocks above the edit with these same kwargs
    (attention mask, rotary embeddings...), so it never depends on how a given
    architecture builds them.
    """
    module = get_module(model, name)
    rec: dict[str, Any] = {}

    def pre_hook(_mod: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        rec["args"] = args
        rec["kwargs"] = kwargs
        raise StopForward

    handle = module.register_forward_pre_hook(pre_hook, with_kwargs=True)
    try:
        yield rec
    finally:
        handle.remove()


@dataclass
class OutputEdit:
    """A vector added to a module's output at ``(row, position)`` pairs."""

    rows: torch.Tensor
    cols: torch.Tensor
    delta: torch.Tensor
    first_output: torch.Tensor | None = field(default=None)


@contextmanager
def add_to_output(model: nn.Module, name: str, edit: OutputEdit) -> Iterator[OutputEdit]:
    """Add ``edit.delta`` to module ``name``'s output at the given positions.

    The output before the first addition, at the first (row, col), is kept in
    ``edit.first_output`` (ROME's ``v_init``).
    """
    module = get_module(model, name)

    def hook(_mod: nn.Module, _args: tuple[Any, ...], out: torch.Tensor) -> torch.Tensor:
        if edit.first_output is None:
            edit.first_output = out[edit.rows[0], edit.cols[0]].detach().clone()
        out = out.clone()
        out[edit.rows, edit.cols] = out[edit.rows, edit.cols] + edit.delta.to(out.dtype)
        return out

    handle = module.register_forward_hook(hook)
    try:
        yield edit
    finally:
        handle.remove()


def count_hooks(model: nn.Module) -> int:
    """Hooks registered on any module of ``model`` (tests check it stays 0)."""
    total = 0
    for m in model.modules():
        for attr in (
            "_forward_hooks",
            "_forward_pre_hooks",
            "_backward_hooks",
            "_forward_hooks_with_kwargs",
        ):
            d = getattr(m, attr, None)
            if d:
                total += len(d)
    return total
