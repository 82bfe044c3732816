"""v*: the value the edited layer should output for the subject.

A vector ``δ`` is added to the edited module's output at the subject's last
token of every prompt and optimised with Adam so the model predicts
``target_new``. The layers below the edit do not depend on ``δ``: their
output is computed once per edit, and each step runs only the blocks from
the edited layer up, then the LM head only at the positions the loss reads.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn
from transformers import PreTrainedTokenizerBase

from . import nethook
from .batching import pad_id_of, pad_right, target_ids
from .devices import model_device, module_device
from .hparams import EditHparams
from .progress import StepProgress
from .request import EditRequest
from .tokens import encode_with_subject
from .update import weight_out_in

KL_PROMPT = "{} is a"


def _cpu_has_bf16() -> bool:
    """Whether this CPU has bf16 matrix instructions (Linux: read from /proc/cpuinfo)."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def resolve_autocast(setting: str | None, device: torch.device) -> str | None:
    """The autocast a v* loop runs with: ``"auto"`` becomes ``"bf16"`` only where bf16
    is fast (without bf16 units a CPU emulates it, several times slower than fp32)."""
    if setting != "auto":
        return setting
    if device.type == "cuda":
        return "bf16" if torch.cuda.is_bf16_supported() else None
    if device.type == "cpu":
        return "bf16" if _cpu_has_bf16() else None
    return None


def work_dtype(model: nn.Module) -> torch.dtype:
    """The dtype δ and the loss are kept in: float32, or float64 for a float64 model
    (so an equality test in float64 is not limited by a float32 loss)."""
    head = model.get_output_embeddings()  # type: ignore[operator]
    w = getattr(head, "weight", None)
    return (
        torch.float64 if isinstance(w, torch.Tensor) and w.dtype == torch.float64 else torch.float32
    )


@dataclass
class VStar:
    v_star: torch.Tensor
    v_init: torch.Tensor
    delta: torch.Tensor
    trace: list[dict[str, float]]
    steps: int
    #: per template row, from the first step (δ = 0, the unedited model): the hooked
    #: module's input at the subject (ROME's keys) and the target's summed log-probability
    keys: torch.Tensor | None = None
    row_logprob: torch.Tensor | None = None


@dataclass
class _Batch:
    ids: torch.Tensor
    mask: torch.Tensor
    lookup_rows: torch.Tensor
    lookup_cols: torch.Tensor
    loss_rows: torch.Tensor
    loss_cols: torch.Tensor
    loss_labels: torch.Tensor
    n_rewrite: int
    target_len: int


def _build_batch(
    tok: PreTrainedTokenizerBase, req: EditRequest, templates: Sequence[str], device: torch.device
) -> _Batch:
    tgt = target_ids(tok, req.target_new)
    seqs, lookups = [], []
    loss_rows, loss_cols, labels = [], [], []
    for i, t in enumerate(templates):
        enc = encode_with_subject(tok, t.format(req.prompt), req.subject)
        seqs.append(enc.ids + tgt[:-1])
        lookups.append(enc.subject_last)
        for j, tid in enumerate(tgt):
            loss_rows.append(i)
            loss_cols.append(len(enc.ids) - 1 + j)
            labels.append(tid)
    kl = encode_with_subject(tok, KL_PROMPT, req.subject)
    seqs.append(kl.ids)
    lookups.append(kl.subject_last)
    ids, mask = pad_right(seqs, pad_id_of(tok), device)

    def as_long(x: list[int]) -> torch.Tensor:
        return torch.tensor(x, dtype=torch.long, device=device)

    return _Batch(
        ids=ids,
        mask=mask,
        lookup_rows=torch.arange(len(seqs), device=device),
        lookup_cols=as_long(lookups),
        loss_rows=as_long(loss_rows),
        loss_cols=as_long(loss_cols),
        loss_labels=as_long(labels),
        n_rewrite=len(templates),
        target_len=len(tgt),
    )


@contextlib.contextmanager
def frozen(model: nn.Module) -> Iterator[None]:
    """Parameters do not require grad inside; their previous flags come back after."""
    flags = [(p, p.requires_grad) for p in model.parameters()]
    for p, _ in flags:
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p, flag in flags:
            p.requires_grad_(flag)


class UpperStack:
    """Runs the blocks from layer ``l`` up, the final norm, and the head at chosen positions.

    The inputs of block ``l`` (hidden states and whatever else the model
    passes its blocks: masks, rotary embeddings) are captured once by a
    stopping pre-hook, so nothing here depends on one architecture's calling
    convention.
    """

    def __init__(
        self, model: nn.Module, hp: EditHparams, layer: int, ids: torch.Tensor, mask: torch.Tensor
    ):
        self.model = model
        blocks = nethook.get_module(model, hp.layers_module)
        self.blocks = list(blocks)[layer:]  # type: ignore[call-overload]
        self.norm = nethook.get_module(model, hp.final_norm_module)
        self.head = model.get_output_embeddings()  # type: ignore[operator]
        with nethook.capture_block_inputs(model, f"{hp.layers_module}.{layer}") as rec:
            with nethook.stop_after(), torch.no_grad():
                model(input_ids=ids, attention_mask=mask, use_cache=False)
        args, kwargs = rec["args"], dict(rec["kwargs"])
        if args:
            self.hidden, self.args = args[0].detach(), args[1:]
        else:
            self.hidden, self.args = kwargs.pop("hidden_states").detach(), ()
        self.kwargs = kwargs

    def logits_at(self, rows: torch.Tensor, cols: torch.Tensor) -> torch.Tensor:
        h = self.hidden
        for block in self.blocks:
            out = block(h, *self.args, **self.kwargs)
            h = out[0] if isinstance(out, tuple) else out
        return self.head(self.norm(h[rows.to(h.device), cols.to(h.device)]))


def compute_v_star(
    model: nn.Module,
    tok: PreTrainedTokenizerBase,
    hp: EditHparams,
    req: EditRequest,
    templates: Sequence[str],
    layer: int,
    on_step: StepProgress | None = None,
    fast: bool = True,
) -> VStar:
    """Optimise ``δ`` as ROME's ``compute_v`` does (same loss, clamp and stopping rule).

    ``fast=False`` runs the whole model at every step, takes logits at every
    position and leaves the parameters requiring grad, as the published code
    does (kept for the benchmark and the equivalence test).
    """
    module = hp.weight_module(layer)
    device = module_device(model, module)  # the edited layer's device under a device map
    b = _build_batch(tok, req, templates, device)
    ids, mask = b.ids.to(model_device(model)), b.mask.to(model_device(model))
    work = work_dtype(model)
    d_out = _out_features(nethook.get_module(model, module))
    delta = torch.zeros(d_out, device=device, dtype=work, requires_grad=True)
    opt = torch.optim.Adam([delta], lr=hp.v_lr)
    edit = nethook.OutputEdit(b.lookup_rows, b.lookup_cols, delta)
    # the loss entries, then the KL row's subject
    rows = torch.cat([b.loss_rows, torch.tensor([b.n_rewrite], device=device)])
    cols = torch.cat([b.loss_cols, b.lookup_cols[b.n_rewrite :]])
    bf16 = resolve_autocast(hp.v_autocast, device) == "bf16"
    autocast = torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=bf16)
    objective = _Objective(hp, b, work, device)
    steps: list[torch.Tensor] = []  # per step on the device, read once at the end
    freeze = frozen(model) if fast else contextlib.nullcontext()
    with freeze, nethook.add_to_output(model, module, edit):
        upper = UpperStack(model, hp, layer, ids, mask) if fast else None
        for step in range(hp.v_num_grad_steps):
            opt.zero_grad()
            with autocast:
                logits = _step_logits(model, upper, ids, mask, rows, cols, work, device)
            if objective.v_init is None:
                assert edit.first_output is not None
                objective.v_init = edit.first_output.to(work)
            loss, stop, figures = objective(logits, delta)
            steps.append(figures)
            if on_step is not None:
                on_step(step + 1, hp.v_num_grad_steps)
            # The one host sync per step (bool(stop)): the stopping rule needs it.
            if step == hp.v_num_grad_steps - 1 or bool(stop):
                break
            loss.backward()
            opt.step()
            clamp_to_ball_(delta, hp.clamp_norm_factor * objective.v_init.norm())
    trace = trace_rows(steps)
    v_init = objective.v_init
    assert v_init is not None
    d = delta.detach()
    return VStar(v_star=v_init + d, v_init=v_init, delta=d, trace=trace, steps=len(trace))


def _step_logits(
    model: nn.Module,
    upper: UpperStack | None,
    ids: torch.Tensor,
    mask: torch.Tensor,
    rows: torch.Tensor,
    cols: torch.Tensor,
    work: torch.dtype,
    device: torch.device,
) -> torch.Tensor:
    """The logits at (``rows``, ``cols``) in ``work`` on ``device``: from the blocks above
    the edit (``upper``) or, without it, from the whole model at every position."""
    if upper is not None:
        return upper.logits_at(rows, cols).to(device, work)
    full = model(input_ids=ids, attention_mask=mask, use_cache=False).logits
    return full.to(work)[rows.to(full.device), cols.to(full.device)].to(device)


class _Objective:
    """ROME's ``compute_v`` loss of one step: the target's NLL (per prompt over its length,
    then the mean over the prompts), ``kl_factor`` × the KL row's divergence from its
    first-step distribution, and ``v_weight_decay`` × ‖δ‖ / ‖v_init‖²."""

    def __init__(self, hp: EditHparams, b: _Batch, work: torch.dtype, device: torch.device):
        self.hp, self.b, self.work, self.device = hp, b, work, device
        self.n_loss = b.loss_rows.numel()
        self.kl_init: torch.Tensor | None = None  # the KL row's log-probabilities at step 0
        self.v_init: torch.Tensor | None = None  # set by the caller on the first step

    def __call__(
        self, logits: torch.Tensor, delta: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The loss, whether the stopping rule stops here (a device bool) and the step's
        row of :data:`TRACE_KEYS`."""
        hp, b, n_loss, work, device = self.hp, self.b, self.n_loss, self.work, self.device
        assert self.v_init is not None
        logp = logits[:n_loss].log_softmax(-1)
        tok_lp = logp[torch.arange(n_loss, device=device), b.loss_labels]
        per_prompt = torch.zeros(b.n_rewrite, device=device, dtype=work)
        per_prompt = per_prompt.index_add(0, b.loss_rows, tok_lp)
        nll_each = -per_prompt / b.target_len
        nll = nll_each.mean()
        kl_logp = logits[n_loss:].log_softmax(-1)
        if self.kl_init is None:
            self.kl_init = kl_logp.detach().clone()
        kl = hp.kl_factor * torch.nn.functional.kl_div(
            self.kl_init, kl_logp, log_target=True, reduction="batchmean"
        )
        wd = hp.v_weight_decay * (delta.norm() / self.v_init.norm() ** 2)
        loss = nll + kl + wd
        argmax_all = (logits[:n_loss].detach().argmax(-1) == b.loss_labels).all()
        with torch.no_grad():
            p_target = torch.exp(-nll_each.detach()).mean()
            parts = [loss, nll, kl, wd]
            figures = torch.stack([x.detach() for x in parts] + [p_target, argmax_all.float()])
        stop = loss.detach() < hp.v_early_stop_loss
        if hp.v_stop == "most_probable":
            stop = stop | argmax_all
        return loss, stop, figures


def clamp_to_ball_(delta: torch.Tensor, max_norm: torch.Tensor) -> None:
    """Project ``delta`` in place onto the ball of radius ``max_norm``, with no host sync;
    a ``delta`` inside the ball is multiplied by exactly 1 (bit for bit as it was)."""
    with torch.no_grad():
        n = delta.norm()
        delta.mul_(torch.where(n > max_norm, max_norm / n, torch.ones_like(n)))


TRACE_KEYS = ("loss", "nll", "kl", "weight_decay", "p_target", "argmax_all")


def trace_rows(steps: list[torch.Tensor]) -> list[dict[str, float]]:
    """The per-step figures (rows of :data:`TRACE_KEYS`), copied to the host once."""
    if not steps:
        return []
    table = torch.stack(steps).double().cpu().tolist()
    return [
        {"step": float(i), **dict(zip(TRACE_KEYS, row, strict=True))} for i, row in enumerate(table)
    ]


def _out_features(module: nn.Module) -> int:
    """Width of the edited module's output (Linear or GPT-2's transposed Conv1D)."""
    return int(weight_out_in(module).shape[0])
