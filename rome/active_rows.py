"""The batch of a target-vector optimisation's requests still running (rome/optimise.py).

Its rows run in groups of one suffix length (:class:`Group`, one
:class:`~rome.upper.UpperRun` each); :meth:`Active.logits` adds each row's request's ``δ``
at its subject (through the forward hook :class:`AddDelta`, or onto block ``layer``'s
output where that block ran once) and returns the logits at every loss entry;
:func:`request_losses` turns them into each request's loss terms.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F

from . import nethook
from .hparams import EditHparams
from .upper import UpperRun


class AddDelta:
    """Forward hook state: ``δ`` of each row's request added at its subject token.

    Handles a module returning a tensor (an MLP projection; a decoder block
    under transformers 5) or a tuple whose first item is the hidden states.
    With ``capture`` set, the output at those positions before ``δ`` is kept
    (``v_init`` is read there on the first step).
    """

    def __init__(self) -> None:
        self.rows = torch.zeros(0, dtype=torch.long)
        self.cols = torch.zeros(0, dtype=torch.long)
        self.deltas: torch.Tensor | None = None  # (rows, d): each row's request's δ
        self.capture = False
        self.captured: torch.Tensor | None = None
        self.captured_in: torch.Tensor | None = None

    def __call__(self, _mod: nn.Module, args: tuple[Any, ...], out: Any) -> Any:
        if self.deltas is None:
            return None
        h = out[0] if isinstance(out, tuple) else out
        if self.capture:
            self.captured = h[self.rows, self.cols].detach().clone()
            if args:
                self.captured_in = args[0][self.rows, self.cols].detach().clone()
        h = h.clone()
        h[self.rows, self.cols] = h[self.rows, self.cols] + self.deltas.to(h.dtype)
        return (h, *out[1:]) if isinstance(out, tuple) else h


@contextlib.contextmanager
def hooked(model: nn.Module, name: str, state: AddDelta) -> Iterator[None]:
    handle = nethook.get_module(model, name).register_forward_hook(state)
    try:
        yield
    finally:
        handle.remove()


@dataclass
class Group:
    """Active rows of one suffix length, run as one unpadded batch (one :class:`UpperRun`)."""

    run: UpperRun
    members: torch.Tensor  # local (active-set) index of each of its rows
    cols: torch.Tensor  # each row's subject column in its suffix (δ is added there)
    loss_rows: torch.Tensor  # in-group row / suffix column of each of its loss entries
    loss_cols: torch.Tensor


@dataclass
class Active:
    """The rows and loss entries of the requests still running, as device tensors.

    Loss entries are ordered: every rewrite entry, then one per KL row; ``order``
    puts the groups' logits back in that order.
    """

    requests: list[int]
    rows: list[int]
    groups: list[Group]
    order: torch.Tensor
    row_req: torch.Tensor  # local request index of each rewrite row
    delta_req: torch.Tensor  # local request index of every active row
    loss_row: torch.Tensor  # local rewrite-row index of each loss entry
    loss_req: torch.Tensor
    loss_first: torch.Tensor  # whether each loss entry is in its request's first row
    labels: torch.Tensor
    row_tlen: torch.Tensor  # target length of each rewrite row
    n_rewrite: torch.Tensor  # per local request
    n_loss: int

    def logits(
        self, state: AddDelta, deltas: torch.Tensor, capture: bool
    ) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor] | None]:
        """Logits at every loss entry with ``deltas`` (per local request) added; and, with
        ``capture``, the hooked module's output and input at every active row's subject
        before δ (in active-row order)."""
        row_deltas = deltas[self.delta_req]
        outs, caught, caught_in = [], [], []
        for g in self.groups:
            rows = torch.arange(g.members.numel(), device=g.cols.device)
            if g.run.skipped:  # block ``layer`` ran once: δ goes onto its output
                add = (rows, g.cols, row_deltas[g.members])
                outs.append(g.run.logits_at(g.loss_rows, g.loss_cols, add))
                if capture:
                    assert g.run.module_out is not None and g.run.module_in is not None
                    caught.append(g.run.module_out[rows, g.cols])
                    caught_in.append(g.run.module_in[rows, g.cols])
                continue
            state.rows, state.cols, state.deltas = rows, g.cols, row_deltas[g.members]
            state.capture = capture
            outs.append(g.run.logits_at(g.loss_rows, g.loss_cols))
            if capture:
                assert state.captured is not None and state.captured_in is not None
                caught.append(state.captured)
                caught_in.append(state.captured_in)
        state.deltas, state.capture, state.captured, state.captured_in = None, False, None, None
        logits = torch.cat(outs)[self.order] if len(outs) > 1 else outs[0]
        if not capture:
            return logits, None
        back = torch.argsort(torch.cat([g.members for g in self.groups]))
        return logits, (torch.cat(caught)[back], torch.cat(caught_in)[back])


def request_losses(
    act: Active, logits: torch.Tensor, kl_init: torch.Tensor, hp: EditHparams
) -> tuple[torch.Tensor, ...]:
    """Per request (local order): nll, kl, p_target, argmax_all, as ``compute_v_star`` has
    them; and per rewrite row (active order), the target's summed log-probability."""
    n_req, n_loss = len(act.requests), act.n_loss
    dev = logits.device
    logp = logits[:n_loss].log_softmax(-1)
    tok_lp = logp[torch.arange(n_loss, device=dev), act.labels]
    per_row = torch.zeros(act.row_tlen.numel(), device=dev, dtype=logits.dtype)
    per_row = per_row.index_add(0, act.loss_row, tok_lp)
    nll_each = -per_row / act.row_tlen
    zeros = torch.zeros(n_req, device=dev, dtype=logits.dtype)
    nll = zeros.index_add(0, act.row_req, nll_each) / act.n_rewrite
    p_target = zeros.index_add(0, act.row_req, torch.exp(-nll_each.detach())) / act.n_rewrite
    kl_logp = logits[n_loss:].log_softmax(-1)
    kl = hp.kl_factor * F.kl_div(kl_init, kl_logp, log_target=True, reduction="none").sum(-1)
    wrong = (logits[:n_loss].detach().argmax(-1) != act.labels).to(logits.dtype)
    argmax_all = zeros.index_add(0, act.loss_req, wrong) == 0
    return nll, kl, p_target, argmax_all, per_row
