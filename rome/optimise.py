"""Target vectors (ROME's v*, the z of MEMIT / EMMET / AlphaEdit) for many requests at once.

A vector ``δ_r`` per request is added to the output of one module (ROME: the
MLP down-projection; the family: the whole decoder block) at the subject's
last token of each of its rows, and all requests are optimised together:
one forward and one backward per step over the rows of the requests still
running. Each request keeps exactly its own trajectory: its own Adam state
(one optimiser per request), loss normalisation (its target length and
template count), KL row, clamp and weight-decay reference norm, and stopping
rule. A request that stops leaves the batch; its ``δ`` is never touched
again. The loss of request ``r`` depends on ``δ_r`` only (rows do not
interact), so the summed loss's gradient for ``δ_r`` is that of its own loss.

With ``prefix_reuse`` the positions before each row's subject token are run
once per optimisation (see :mod:`rome.upper`); each step runs the blocks
from the edited layer up over the remaining positions only. Both levers are
exact: the result equals one request at a time over whole sequences to
float error (tests/test_vstar_fast.py).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F
from transformers import PreTrainedTokenizerBase

from . import fastlinear, nethook
from .batching import pad_id_of
from .devices import module_device
from .hparams import EditHparams
from .progress import StepProgress
from .request import EditRequest
from .tokens import encode_with_subject
from .update import weight_out_in
from .upper import KL_PROMPT, Encoder, Rows, UpperRun, build_rows, compute_prefix
from .vstar import VStar, frozen, resolve_autocast, trace_rows, work_dtype

ClampReference = str | Sequence[float]


@dataclass(frozen=True)
class StepFacts:
    """What an extra stopping rule sees of one step, per request still running."""

    requests: list[int]  # their indices in the optimisation
    # target tokens that are the argmax in each request's rewriting rows after its first
    # (the bare "{}" row), counted over all those rows
    correct_after_first: list[int]
    p_target: list[float]  # mean over its rewriting rows of exp(−mean token NLL)


#: a stopping rule beside the loss (a method's: ENCORE's most-probable counter): one
#: fresh rule per optimisation, called once per step before the backward pass, answering
#: per request whether it stops here
StopRule = Callable[[StepFacts], list[bool]]
ZStop = Callable[[], StopRule]


class _AddDelta:
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
def _hooked(model: nn.Module, name: str, state: _AddDelta) -> Iterator[None]:
    handle = nethook.get_module(model, name).register_forward_hook(state)
    try:
        yield
    finally:
        handle.remove()


def _output_width(model: nn.Module, name: str) -> int:
    """Width of the hooked module's output: a projection's out-features, else the hidden size."""
    module = nethook.get_module(model, name)
    if isinstance(getattr(module, "weight", None), torch.Tensor):
        return int(weight_out_in(module).shape[0])
    head = model.get_output_embeddings()  # type: ignore[operator]
    return int(head.weight.shape[1])


#: a group of rows joins the next longer one when that pads it by at most this many
#: tokens in all: one more pass through the upper blocks costs more than that on a CPU
#: (measured: a request's one KL row in a pass of its own made v* 0.82x as fast)
_MERGE_PAD_TOKENS = 32


@dataclass
class _Group:
    """Active rows of one suffix length, run as one unpadded batch (one :class:`UpperRun`)."""

    run: UpperRun
    members: torch.Tensor  # local (active-set) index of each of its rows
    cols: torch.Tensor  # each row's subject column in its suffix (δ is added there)
    loss_rows: torch.Tensor  # in-group row / suffix column of each of its loss entries
    loss_cols: torch.Tensor


@dataclass
class _Active:
    """The rows and loss entries of the requests still running, as device tensors.

    Loss entries are ordered: every rewrite entry, then one per KL row; ``order``
    puts the groups' logits back in that order.
    """

    requests: list[int]
    rows: list[int]
    groups: list[_Group]
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
        self, state: _AddDelta, deltas: torch.Tensor, capture: bool
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


def _length_groups(
    rows: Rows, act_rows: list[int], cuts: list[int], buckets: bool
) -> list[list[int]]:
    """The active rows in groups of one suffix length, longest first (one group without
    ``buckets``); a group joins the longer one before it when that pads it little."""
    by_length: dict[int, list[int]] = {}
    for i in act_rows:
        by_length.setdefault(len(rows.seqs[i]) - cuts[i] if buckets else 0, []).append(i)
    merged: list[tuple[int, list[int]]] = []  # (longest suffix, rows)
    for length in sorted(by_length, reverse=True):
        if merged and len(by_length[length]) * (merged[-1][0] - length) <= _MERGE_PAD_TOKENS:
            merged[-1][1].extend(by_length[length])
        else:
            merged.append((length, list(by_length[length])))
    return [members for _, members in merged]


def kl_sources(rows: Rows, cuts: list[int]) -> dict[int, int]:
    """KL rows whose logits a rewriting row of their request already has: ``{kl: row}``.

    The KL loss reads the logits at the subject's last token of the KL prompt
    (``"{} is a"``). A rewriting row with the same tokens up to and including that
    position, the subject's last token at the same index and the same cut (the bare
    ``"{}"`` row of a prompt that starts with the subject: ``"{} is located in"``)
    computes the same hidden states there at every step, ``δ`` included (the model is
    causal), so the KL row need not run: its logits are read from that row.
    """
    out: dict[int, int] = {}
    for i, kl in enumerate(rows.is_kl):
        if not kl:
            continue
        end = rows.subject[i] + 1
        for j in range(rows.first_row[rows.request[i]], i):
            if (
                rows.subject[j] == rows.subject[i]
                and cuts[j] == cuts[i]
                and rows.seqs[j][:end] == rows.seqs[i][:end]
            ):
                out[i] = j
                break
    return out


def _activate(
    model: nn.Module,
    hp: EditHparams,
    layer: int,
    rows: Rows,
    requests: list[int],
    cuts: list[int],
    prefix: Any,
    pad: int,
    device: torch.device,
    skip_module: str | None = None,
    share_kl: bool = True,
) -> _Active:
    """The batch of the requests in ``requests``, in groups of one suffix length each
    (``hp.v_length_buckets``; else one group padded to its longest suffix). With
    ``share_kl``, a KL row that :func:`kl_sources` finds in a rewriting row is not run."""
    keep = set(requests)
    shared = kl_sources(rows, cuts) if share_kl else {}
    every = [i for i in range(len(rows.seqs)) if rows.request[i] in keep]
    act_rows = [i for i in every if i not in shared]
    local = {r: j for j, r in enumerate(act_rows)}
    local_req = {r: j for j, r in enumerate(requests)}
    work = work_dtype(model)
    rewrite = [i for i in act_rows if not rows.is_kl[i]]
    rw_local = {r: j for j, r in enumerate(rewrite)}
    entries = [e for e in rows.loss if e[0] in local]
    kl_rows = [i for i in every if rows.is_kl[i]]
    # every loss entry: (row, column in its suffix); a shared KL row's is its source's
    where = [(e[0], e[1] - cuts[e[0]]) for e in entries]
    where += [(shared.get(i, i), rows.subject[i] - cuts[i]) for i in kl_rows]

    def t(x: list[int]) -> torch.Tensor:
        return torch.tensor(x, dtype=torch.long, device=device)

    groups, order = [], []
    for members in _length_groups(rows, act_rows, cuts, hp.v_length_buckets):
        in_group = {r: j for j, r in enumerate(members)}
        mine = [k for k, (r, _) in enumerate(where) if r in in_group]
        order += mine
        groups.append(
            _Group(
                run=UpperRun(model, hp, layer, rows, members, cuts, prefix, pad, skip_module),
                members=t([local[i] for i in members]),
                cols=t([rows.subject[i] - cuts[i] for i in members]),
                loss_rows=t([in_group[where[k][0]] for k in mine]),
                loss_cols=t([where[k][1] for k in mine]),
            )
        )
    return _Active(
        requests=requests,
        rows=act_rows,
        groups=groups,
        order=torch.argsort(t(order)),
        row_req=t([local_req[rows.request[i]] for i in rewrite]),
        delta_req=t([local_req[rows.request[i]] for i in act_rows]),
        loss_row=t([rw_local[e[0]] for e in entries]),
        loss_req=t([local_req[rows.request[e[0]]] for e in entries]),
        loss_first=t([int(rows.first_row[rows.request[e[0]]] == e[0]) for e in entries]).bool(),
        labels=t([e[2] for e in entries]),
        row_tlen=torch.tensor(
            [rows.target_len[rows.request[i]] for i in rewrite], device=device, dtype=work
        ),
        n_rewrite=torch.tensor([rows.n_rewrite[r] for r in requests], device=device, dtype=work),
        n_loss=len(entries),
    )


def _losses(
    act: _Active, logits: torch.Tensor, kl_init: torch.Tensor, hp: EditHparams
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


def optimise_targets(
    model: nn.Module,
    tok: PreTrainedTokenizerBase,
    hp: EditHparams,
    requests: Sequence[EditRequest],
    templates_per_request: Sequence[Sequence[str]],
    layer: int,
    hook_module_name: str | None = None,
    clamp_reference: ClampReference = "init",
    prefix_reuse: bool | None = None,
    on_step: StepProgress | None = None,
    kl_prompt: str = KL_PROMPT,
    encode: Encoder = encode_with_subject,
    target_tokens: Sequence[Sequence[int]] | None = None,
    stop_rule: StopRule | None = None,
    skip_edited_block: bool = True,
    packed: bool = True,
    share_kl: bool = True,
) -> list[VStar]:
    """Optimise one ``δ`` per request together; returns each request's :class:`VStar`.

    ``hook_module_name``: where ``δ`` is added (default ROME's
    ``hp.weight_module(layer)``; the family passes ``f"{hp.layers_module}.{layer}"``).
    ``clamp_reference``: ``"init"`` (each request's ‖v_init‖, the hooked module's
    output at the subject of its first row, which must be the bare ``"{}"``) or
    one norm per request; it sets both the clamp radius and the weight-decay
    normalisation. ``prefix_reuse`` defaults to ``hp.v_prefix_reuse``. ``encode`` and
    ``target_tokens``: the subject-index rule and explicit target ids (see
    :func:`rome.upper.build_rows`), for methods whose published code differs.
    ``stop_rule``: a method's extra stopping rule (:data:`StopRule`).
    ``skip_edited_block``: run block ``layer`` once and each step from ``layer + 1`` (see
    :meth:`rome.upper.UpperRun._run_edited_block_once`; float rounding only).
    ``packed``: the blocks above ``layer`` and the head on oneDNN's prepacked weights
    (:mod:`rome.fastlinear`; float rounding only). ``share_kl``: a KL row whose logits a
    rewriting row already computes is not run (:func:`kl_sources`; float rounding only).
    Each :class:`VStar` also carries, per template row, the hooked module's input at the
    subject (ROME's keys) and the target's log-probability, both from the first step
    (δ = 0: the unedited model; ``None`` under bf16 autocast, whose values they are not).
    (Over 60 lines: one loop whose steps must stay in the reference order.)
    """
    name = hook_module_name or hp.weight_module(layer)
    residual = (hp.weight_module(layer), f"{hp.layers_module}.{layer}")
    skip = name if skip_edited_block and name in residual else None
    reuse = hp.v_prefix_reuse if prefix_reuse is None else prefix_reuse
    rows = build_rows(tok, requests, templates_per_request, kl_prompt, encode, target_tokens)
    n = rows.n_requests
    if not isinstance(clamp_reference, str) and len(clamp_reference) != n:
        raise ValueError("clamp_reference: one norm per request")
    device = module_device(model, name)
    work = work_dtype(model)
    pad = pad_id_of(tok)
    cuts = list(rows.subject) if reuse else [0] * len(rows.seqs)
    deltas = [
        torch.zeros(_output_width(model, name), device=device, dtype=work, requires_grad=True)
        for _ in range(n)
    ]
    opts = [torch.optim.Adam([d], lr=hp.v_lr) for d in deltas]
    bf16 = resolve_autocast(hp.v_autocast, device) == "bf16"
    autocast = torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=bf16)
    state = _AddDelta()
    trace: list[list[torch.Tensor]] = [[] for _ in range(n)]
    active = list(range(n))
    act: _Active | None = None
    kl_init = v_init = ref = None
    first: tuple[torch.Tensor, torch.Tensor] | None = None  # (keys, per-row log-prob), step 0
    keys = torch.zeros(0)
    mpes = hp.v_stop == "most_probable"
    with frozen(model), contextlib.ExitStack() as stack:
        stack.enter_context(_packed_upper(model, hp, layer, rows, cuts, packed and not bf16))
        prefix = compute_prefix(model, rows, cuts, pad)
        stack.enter_context(_hooked(model, name, state))
        for step in range(hp.v_num_grad_steps):
            if act is None or act.requests != active:
                act = _activate(
                    model, hp, layer, rows, active, cuts, prefix, pad, device, skip, share_kl
                )
            sel = torch.tensor(active, device=device)
            for r in active:
                opts[r].zero_grad()
            stacked = torch.stack([deltas[r] for r in active])
            with autocast:
                logits, caught = act.logits(state, stacked, capture=v_init is None)
                logits = logits.to(device, work)
            if v_init is None:
                assert caught is not None
                v_init = caught[0][[act.rows.index(rows.first_row[r]) for r in range(n)]]
                rewrite = [j for j, i in enumerate(act.rows) if not rows.is_kl[i]]
                keys = caught[1][rewrite]
                v_init = v_init.to(device, work)
                if isinstance(clamp_reference, str):
                    ref = v_init.norm(dim=-1)
                else:
                    ref = torch.tensor(list(clamp_reference), device=device, dtype=work)
                kl_init = logits[act.n_loss :].log_softmax(-1).detach().clone()
            assert kl_init is not None and ref is not None
            nll, kl, p_target, argmax_all, per_row = _losses(
                act, logits, kl_init.index_select(0, sel), hp
            )
            if first is None:
                first = (keys, per_row.detach())
            d_norm = torch.stack([deltas[r].norm() for r in active])
            wd = hp.v_weight_decay * (d_norm / ref.index_select(0, sel) ** 2)
            loss = nll + kl + wd
            with torch.no_grad():
                table = torch.stack(
                    [loss, nll, kl, wd, p_target, argmax_all.to(work)], dim=1
                ).detach()
                for j, r in enumerate(active):
                    trace[r].append(table[j])
            if on_step is not None:
                on_step(step + 1, hp.v_num_grad_steps)
            if step == hp.v_num_grad_steps - 1:
                break
            # The one host sync per step: the stopping rule needs it.
            stop = loss.detach() < hp.v_early_stop_loss
            if mpes:
                stop = stop | argmax_all
            if stop_rule is not None:
                stop = stop | _rule_stops(stop_rule, act, active, logits, p_target)
            go = [j for j, s in enumerate(stop.tolist()) if not s]
            if not go:
                break
            loss[go].sum().backward()
            with torch.no_grad():
                for j in go:
                    r = active[j]
                    opts[r].step()
                    # the ball of radius clamp_norm_factor·reference; a factor of exactly 1
                    # leaves δ bit for bit as it was
                    max_norm = hp.clamp_norm_factor * ref[r]
                    dn = deltas[r].norm()
                    deltas[r].mul_(torch.where(dn > max_norm, max_norm / dn, torch.ones_like(dn)))
            active = [active[j] for j in go]
    assert v_init is not None and first is not None
    out, at = [], 0
    for r in range(n):
        d = deltas[r].detach()
        tr = trace_rows(trace[r])
        k = slice(at, at + rows.n_rewrite[r])
        at += rows.n_rewrite[r]
        out.append(
            VStar(
                v_star=v_init[r] + d,
                v_init=v_init[r],
                delta=d,
                trace=tr,
                steps=len(tr),
                keys=None if bf16 else first[0][k],
                row_logprob=None if bf16 else first[1][k],
            )
        )
    return out


def _packed_upper(
    model: nn.Module, hp: EditHparams, layer: int, rows: Rows, cuts: list[int], enabled: bool
) -> contextlib.ExitStack:
    """The blocks above ``layer`` and the head on packed weights (see :mod:`rome.fastlinear`),
    with a step's token count and loss-entry count as the packings' row hints."""
    blocks = list(nethook.get_module(model, hp.layers_module))  # type: ignore[call-overload]
    head = model.get_output_embeddings()  # type: ignore[operator]
    tokens = sum(len(s) - c for s, c in zip(rows.seqs, cuts, strict=True))
    stack = contextlib.ExitStack()
    stack.enter_context(fastlinear.packed_linears(blocks[layer + 1 :], tokens, enabled))
    if isinstance(head, nn.Module):
        entries = len(rows.loss) + sum(rows.is_kl)
        stack.enter_context(fastlinear.packed_linears([head], entries, enabled))
    return stack


def _rule_stops(
    rule: StopRule, act: _Active, active: list[int], logits: torch.Tensor, p_target: torch.Tensor
) -> torch.Tensor:
    """``rule`` on this step's facts, as a bool per active request (on the loss's device)."""
    right = (logits[: act.n_loss].detach().argmax(-1) == act.labels) & ~act.loss_first
    counts = torch.zeros(len(active), device=logits.device, dtype=torch.long)
    counts = counts.index_add(0, act.loss_req, right.long())
    facts = StepFacts(list(active), counts.tolist(), p_target.detach().tolist())
    return torch.tensor(rule(facts), device=logits.device, dtype=torch.bool)
