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
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from transformers import PreTrainedTokenizerBase

from . import fastlinear, nethook
from .active_rows import Active, AddDelta, Group, hooked, request_losses
from .batching import pad_id_of
from .devices import module_device
from .hparams import EditHparams
from .progress import StepProgress
from .request import EditRequest
from .tokens import encode_with_subject
from .update import weight_out_in
from .upper import KL_PROMPT, Encoder, Rows, UpperRun, build_rows, compute_prefix
from .vstar import VStar, clamp_to_ball_, frozen, resolve_autocast, trace_rows, work_dtype

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
) -> Active:
    """The batch of the requests in ``requests``, in groups of one suffix length each
    (``hp.v_length_buckets``; else one group padded to its longest suffix). With
    ``share_kl``, a KL row that :func:`kl_sources` finds in a rewriting row is not run."""
    keep = set(requests)
    shared = kl_sources(rows, cuts) if share_kl else {}
    every = [i for i in range(len(rows.seqs)) if rows.request[i] in keep]
    act_rows = [i for i in every if i not in shared]
    local_req = {r: j for j, r in enumerate(requests)}
    work = work_dtype(model)
    rewrite = [i for i in act_rows if not rows.is_kl[i]]
    rw_local = {r: j for j, r in enumerate(rewrite)}
    local = {r: j for j, r in enumerate(act_rows)}
    entries = [e for e in rows.loss if e[0] in local]
    kl_rows = [i for i in every if rows.is_kl[i]]
    # every loss entry: (row, column in its suffix); a shared KL row's is its source's
    where = [(e[0], e[1] - cuts[e[0]]) for e in entries]
    where += [(shared.get(i, i), rows.subject[i] - cuts[i]) for i in kl_rows]
    run = (model, hp, layer, rows, cuts, prefix, pad, skip_module)
    groups, order = _groups(run, act_rows, where, device)

    def t(x: list[int]) -> torch.Tensor:
        return _long(x, device)

    return Active(
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


def _groups(
    run: tuple[Any, ...], act_rows: list[int], where: list[tuple[int, int]], device: torch.device
) -> tuple[list[Group], list[int]]:
    """The groups of :func:`_length_groups`, each with its loss entries (``where``: each
    entry's row and suffix column), and the entries' indices in the groups' order.
    ``run``: what :class:`~rome.upper.UpperRun` takes besides a group's members."""
    model, hp, layer, rows, cuts, prefix, pad, skip_module = run
    local = {r: j for j, r in enumerate(act_rows)}
    groups, order = [], []
    for members in _length_groups(rows, act_rows, cuts, hp.v_length_buckets):
        in_group = {r: j for j, r in enumerate(members)}
        mine = [k for k, (r, _) in enumerate(where) if r in in_group]
        order += mine
        groups.append(
            Group(
                run=UpperRun(model, hp, layer, rows, members, cuts, prefix, pad, skip_module),
                members=_long([local[i] for i in members], device),
                cols=_long([rows.subject[i] - cuts[i] for i in members], device),
                loss_rows=_long([in_group[where[k][0]] for k in mine], device),
                loss_cols=_long([where[k][1] for k in mine], device),
            )
        )
    return groups, order


def _long(x: list[int], device: torch.device) -> torch.Tensor:
    return torch.tensor(x, dtype=torch.long, device=device)


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
    """
    name = hook_module_name or hp.weight_module(layer)
    residual = (hp.weight_module(layer), f"{hp.layers_module}.{layer}")
    skip = name if skip_edited_block and name in residual else None
    reuse = hp.v_prefix_reuse if prefix_reuse is None else prefix_reuse
    rows = build_rows(tok, requests, templates_per_request, kl_prompt, encode, target_tokens)
    if not isinstance(clamp_reference, str) and len(clamp_reference) != rows.n_requests:
        raise ValueError("clamp_reference: one norm per request")
    cuts = list(rows.subject) if reuse else [0] * len(rows.seqs)
    run = _Optimisation(model, hp, layer, rows, name, cuts, pad_id_of(tok), clamp_reference)
    run.skip, run.share_kl, run.on_step, run.stop_rule = skip, share_kl, on_step, stop_rule
    with frozen(model), contextlib.ExitStack() as stack:
        stack.enter_context(_packed_upper(model, hp, layer, rows, cuts, packed and not run.bf16))
        prefix = compute_prefix(model, rows, cuts, run.pad)
        stack.enter_context(hooked(model, name, run.state))
        for step in range(hp.v_num_grad_steps):
            if not run.step(step, prefix):
                break
    return run.results()


class _Optimisation:
    """The state of one :func:`optimise_targets`: each request's ``δ`` and Adam, the
    requests still running, what the first step reads (v_init, the reference norms, the
    KL rows' log-probabilities, the keys) and each request's trace."""

    #: set by :func:`optimise_targets`: its arguments of the same names (``skip``: the
    #: hooked module when block ``layer`` runs once)
    skip: str | None = None
    share_kl: bool = True
    on_step: StepProgress | None = None
    stop_rule: StopRule | None = None

    def __init__(
        self,
        model: nn.Module,
        hp: EditHparams,
        layer: int,
        rows: Rows,
        name: str,
        cuts: list[int],
        pad: int,
        clamp_reference: ClampReference,
    ) -> None:
        self.model, self.hp, self.layer, self.rows = model, hp, layer, rows
        self.cuts, self.pad, self.clamp_reference = cuts, pad, clamp_reference
        n = rows.n_requests
        self.device = device = module_device(model, name)
        self.work = work = work_dtype(model)
        width = _output_width(model, name)
        self.deltas = [
            torch.zeros(width, device=device, dtype=work, requires_grad=True) for _ in range(n)
        ]
        self.opts = [torch.optim.Adam([d], lr=hp.v_lr) for d in self.deltas]
        self.bf16 = resolve_autocast(hp.v_autocast, device) == "bf16"
        self.autocast = torch.autocast(
            device_type=device.type, dtype=torch.bfloat16, enabled=self.bf16
        )
        self.state = AddDelta()
        self.trace: list[list[torch.Tensor]] = [[] for _ in range(n)]
        self.active = list(range(n))
        self.act: Active | None = None
        self.kl_init: torch.Tensor | None = None
        self.v_init: torch.Tensor | None = None
        self.ref: torch.Tensor | None = None
        # (keys, per-row log-prob) of step 0
        self.first: tuple[torch.Tensor, torch.Tensor] | None = None
        self.keys = torch.zeros(0)

    def step(self, step: int, prefix: Any) -> bool:
        """One forward and, unless the loop ends here, one backward and Adam step over the
        requests still running; False when the loop ends."""
        hp, active = self.hp, self.active
        if self.act is None or self.act.requests != active:
            self.act = _activate(
                self.model, hp, self.layer, self.rows, active, self.cuts, prefix, self.pad,
                self.device, self.skip, self.share_kl,
            )  # fmt: skip
        act = self.act
        sel = torch.tensor(active, device=self.device)
        logits = self._forward(act)
        assert self.kl_init is not None and self.ref is not None
        nll, kl, p_target, argmax_all, per_row = request_losses(
            act, logits, self.kl_init.index_select(0, sel), hp
        )
        if self.first is None:
            self.first = (self.keys, per_row.detach())
        d_norm = torch.stack([self.deltas[r].norm() for r in active])
        wd = hp.v_weight_decay * (d_norm / self.ref.index_select(0, sel) ** 2)
        loss = nll + kl + wd
        with torch.no_grad():
            row = [loss, nll, kl, wd, p_target, argmax_all.to(self.work)]
            table = torch.stack(row, dim=1).detach()
            for j, r in enumerate(active):
                self.trace[r].append(table[j])
        if self.on_step is not None:
            self.on_step(step + 1, hp.v_num_grad_steps)
        if step == hp.v_num_grad_steps - 1:
            return False
        go = self._going(act, loss, argmax_all, logits, p_target)
        if not go:
            return False
        loss[go].sum().backward()
        self._adam_and_clamp(go)
        self.active = [active[j] for j in go]
        return True

    def _forward(self, act: Active) -> torch.Tensor:
        """The logits of every loss entry with the active ``δ`` added; on the first step
        also what it reads of the unedited model (:meth:`_read_first`)."""
        for r in self.active:
            self.opts[r].zero_grad()
        stacked = torch.stack([self.deltas[r] for r in self.active])
        with self.autocast:
            logits, caught = act.logits(self.state, stacked, capture=self.v_init is None)
            logits = logits.to(self.device, self.work)
        if self.v_init is None:
            assert caught is not None
            self._read_first(act, caught, logits)
        return logits

    def _read_first(
        self, act: Active, caught: tuple[torch.Tensor, torch.Tensor], logits: torch.Tensor
    ) -> None:
        """v_init, the keys, the reference norms and the KL rows' log-probabilities, from
        the first step (δ = 0)."""
        rows, n = self.rows, self.rows.n_requests
        v_init = caught[0][[act.rows.index(rows.first_row[r]) for r in range(n)]]
        rewrite = [j for j, i in enumerate(act.rows) if not rows.is_kl[i]]
        self.keys = caught[1][rewrite]
        self.v_init = v_init = v_init.to(self.device, self.work)
        if isinstance(self.clamp_reference, str):
            self.ref = v_init.norm(dim=-1)
        else:
            ref = list(self.clamp_reference)
            self.ref = torch.tensor(ref, device=self.device, dtype=self.work)
        self.kl_init = logits[act.n_loss :].log_softmax(-1).detach().clone()

    def _going(
        self,
        act: Active,
        loss: torch.Tensor,
        argmax_all: torch.Tensor,
        logits: torch.Tensor,
        p_target: torch.Tensor,
    ) -> list[int]:
        """The local indices of the requests that do not stop at this step."""
        # The one host sync per step: the stopping rule needs it.
        stop = loss.detach() < self.hp.v_early_stop_loss
        if self.hp.v_stop == "most_probable":
            stop = stop | argmax_all
        if self.stop_rule is not None:
            stop = stop | _rule_stops(self.stop_rule, act, self.active, logits, p_target)
        return [j for j, s in enumerate(stop.tolist()) if not s]

    def _adam_and_clamp(self, go: list[int]) -> None:
        """Adam's step for each request in ``go``, then its ``δ`` back into the ball of
        radius clamp_norm_factor·reference."""
        assert self.ref is not None
        with torch.no_grad():
            for j in go:
                r = self.active[j]
                self.opts[r].step()
                clamp_to_ball_(self.deltas[r], self.hp.clamp_norm_factor * self.ref[r])

    def results(self) -> list[VStar]:
        """Each request's :class:`VStar` (keys and row log-probabilities: ``None`` under
        bf16 autocast)."""
        assert self.v_init is not None and self.first is not None
        out, at = [], 0
        for r in range(self.rows.n_requests):
            d = self.deltas[r].detach()
            tr = trace_rows(self.trace[r])
            k = slice(at, at + self.rows.n_rewrite[r])
            at += self.rows.n_rewrite[r]
            out.append(
                VStar(
                    v_star=self.v_init[r] + d,
                    v_init=self.v_init[r],
                    delta=d,
                    trace=tr,
                    steps=len(tr),
                    keys=None if self.bf16 else self.first[0][k],
                    row_logprob=None if self.bf16 else self.first[1][k],
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
    rule: StopRule, act: Active, active: list[int], logits: torch.Tensor, p_target: torch.Tensor
) -> torch.Tensor:
    """``rule`` on this step's facts, as a bool per active request (on the loss's device)."""
    right = (logits[: act.n_loss].detach().argmax(-1) == act.labels) & ~act.loss_first
    counts = torch.zeros(len(active), device=logits.device, dtype=torch.long)
    counts = counts.index_add(0, act.loss_req, right.long())
    facts = StepFacts(list(active), counts.tolist(), p_target.detach().tolist())
    return torch.tensor(rule(facts), device=logits.device, dtype=torch.bool)
