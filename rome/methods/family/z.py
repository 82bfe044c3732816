"""z: the output of block ℓₘ (the last edited layer) the subject should produce.

:func:`optimise_zs` is what the methods run: every request of a batch in one
optimisation, with prefix reuse (:func:`rome.optimise.optimise_targets`, δ on
the block's output). :func:`compute_zs` is the reference it must equal, one
request at a time with the whole model run at every step, read step for step
against the published ``compute_z`` (and used when the loss layer is not the
last, which the batched optimiser does not model). For each request:
6 rewriting prompts (template ∘ prompt, then the target's tokens but its last)
and the KL prompt ``"{} is a"``, right-padded; δ (float32, zeros) is added to
the **block's output** (the residual stream) at the subject's last token of
all 7 rows. Loss: the target's mean per-token NLL from final-norm(h of the loss
layer) · LM head, averaged over the 6 rows; ``kl_factor`` · KL(current ‖
initial) at the KL row; ``v_weight_decay`` · ‖δ‖ / ‖target_init‖². The loss is
checked against ``v_early_stop_loss`` before the backward pass (so ``steps``
forwards make at most ``steps − 1`` Adam updates); with ``v_stop =
"most_probable"`` (ENCORE's MPES) the loop also stops once every target token is
the argmax in every rewriting prompt. After each step δ is projected onto the
ball of radius ``clamp_norm_factor`` · ‖target_init‖. z = target_init + δ.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from transformers import PreTrainedTokenizerBase

from ... import nethook
from ...batching import pad_id_of, pad_right, target_ids
from ...devices import module_device
from ...hparams import EditHparams
from ...optimise import StepFacts, ZStop, optimise_targets
from ...request import EditRequest
from ...tokens import Encoded
from ...vstar import KL_PROMPT, frozen
from .reprs import locate

#: how z is optimised: all requests together with prefix reuse, or the reference loop
Z_LOOPS = ("batched", "reference")


@dataclass
class ZResult:
    """One z per request (rows), with what the optimisation did."""

    z: torch.Tensor  # (n, d) float32
    target_init: torch.Tensor  # (n, d) float32
    steps: list[int]  # forwards per request
    traces: list[list[dict[str, float]]] = field(default_factory=list)


def _hidden_width(model: nn.Module) -> int:
    head = model.get_output_embeddings()  # type: ignore[operator]
    return int(head.weight.shape[1])


def compute_zs(
    model: nn.Module,
    tok: PreTrainedTokenizerBase,
    requests: Sequence[EditRequest],
    templates: Sequence[str],
    layer: int,
    block_name: str,
    hp: EditHparams,
    on_request: Callable[[int, int], None] | None = None,
    stop: ZStop | None = None,
) -> ZResult:
    """z for each request at block ``layer`` (module ``block_name``), model unchanged.

    ``hp`` gives the loss and stopping settings (``v_*``, ``kl_factor``,
    ``clamp_norm_factor``, ``v_loss_layer``, ``final_norm_module``,
    ``layers_module``, ``subject_index``).
    """
    zs, inits, steps, traces = [], [], [], []
    for j, req in enumerate(requests):
        rule = stop() if stop is not None else None
        z, init, trace = compute_z(model, tok, req, templates, layer, block_name, hp, rule)
        zs.append(z)
        inits.append(init)
        steps.append(len(trace))
        traces.append(trace)
        if on_request is not None:
            on_request(j + 1, len(requests))
    return ZResult(torch.stack(zs), torch.stack(inits), steps, traces)


def optimise_zs(
    model: nn.Module,
    tok: PreTrainedTokenizerBase,
    requests: Sequence[EditRequest],
    templates: Sequence[str],
    layer: int,
    block_name: str,
    hp: EditHparams,
    on_step: Callable[[int, int], None] | None = None,
    loop: str = "batched",
    stop: ZStop | None = None,
) -> tuple[ZResult, str]:
    """z for each request, and the loop that computed it (``loop`` unless the loss
    layer is below the last block, where only the reference applies).

    The batched loop equals :func:`compute_zs` to float error (tests/test_family.py):
    the same rows (``locate``'s subject index, the target's ids), the same loss,
    clamp on ‖target_init‖ of the bare row, and stopping rule, per request. At most
    ``hp.v_max_requests`` requests are optimised together (memory).
    """
    if loop not in Z_LOOPS:
        raise ValueError(f"z loop must be one of {', '.join(Z_LOOPS)}, not {loop!r}")
    n_layers = len(nethook.get_module(model, hp.layers_module))  # type: ignore[arg-type]
    if loop == "reference" or _loss_layer(model, hp, layer) != n_layers - 1:
        zr = compute_zs(model, tok, requests, templates, layer, block_name, hp, stop=stop)
        return zr, "reference"

    def encode(t: PreTrainedTokenizerBase, template: str, subject: str) -> Encoded:
        loc = locate(t, template, subject, hp.subject_index)
        return Encoded(ids=loc.ids, subject_last=loc.index, text=template.replace("{}", subject))

    out = []
    step = max(1, hp.v_max_requests)
    for start in range(0, len(requests), step):  # chunks bound the activations' memory
        chunk = requests[start : start + step]
        out += optimise_targets(
            model,
            tok,
            hp,
            chunk,
            [list(templates)] * len(chunk),
            layer,
            hook_module_name=block_name,
            clamp_reference="init",
            on_step=on_step,
            encode=encode,
            stop_rule=stop() if stop is not None else None,
        )
    z = ZResult(
        torch.stack([v.v_star.float() for v in out]),
        torch.stack([v.v_init.float() for v in out]),
        [v.steps for v in out],
        [v.trace for v in out],
    )
    return z, "batched"


#: the preset fields z does not read (the rest, new ones included, go into :func:`z_key`)
NOT_IN_Z = frozenset(
    {
        "name", "notes", "aliases", "extends", "method", "layer", "layers", "method_settings",
        "shared_settings", "covariance", "mom2_dataset", "mom2_n_samples", "mom2_max_len",
        "mom2_dtype", "mom2_ridge", "max_update_ratio", "default_mode", "key_averaging",
        "fact_token", "context_template_length_params", "context_templates", "template_seed",
        "family_template_words", "family_template_length", "family_template_top_k",
        "family_context_templates", "v_norm_anchor", "v_norm_anchor_samples",
    }
)  # fmt: skip


def z_key(
    requests: Sequence[EditRequest],
    templates: Sequence[str],
    block_name: str,
    hp: EditHparams,
    loop: str,
) -> str:
    """What :func:`optimise_zs` computes from besides the weights: the requests in order,
    the templates, the block, the loop and every preset field but :data:`NOT_IN_Z`."""
    fields = {k: v for k, v in hp.to_dict().items() if k not in NOT_IN_Z}
    what = [[r.to_dict() for r in requests], list(templates), block_name, loop, fields]
    return json.dumps(what, sort_keys=True, default=repr)


def _loss_layer(model: nn.Module, hp: EditHparams, layer: int) -> int:
    n_layers = len(nethook.get_module(model, hp.layers_module))  # type: ignore[arg-type]
    loss_layer = n_layers - 1 if hp.v_loss_layer is None else min(hp.v_loss_layer, n_layers - 1)
    return max(loss_layer, layer)


def compute_z(
    model: nn.Module,
    tok: PreTrainedTokenizerBase,
    req: EditRequest,
    templates: Sequence[str],
    layer: int,
    block_name: str,
    hp: EditHparams,
    rule: Callable[[StepFacts], list[bool]] | None = None,
) -> tuple[torch.Tensor, torch.Tensor, list[dict[str, float]]]:
    """(z, target_init, per-step trace) for one request. See the module docstring.

    Long on purpose: the reference optimiser, kept as one loop that reads step for
    step against the published ``compute_z``.
    """
    device = module_device(model, block_name)
    tgt = target_ids(tok, req.target_new)
    seqs, idxs, loss_rows, loss_cols, labels = [], [], [], [], []
    for i, t in enumerate(templates):
        loc = locate(tok, t.format(req.prompt), req.subject, hp.subject_index)
        seqs.append(loc.ids + tgt[:-1])
        idxs.append(loc.index)
        for j, tid in enumerate(tgt):
            loss_rows.append(i)
            loss_cols.append(len(loc.ids) - 1 + j)
            labels.append(tid)
    kl = locate(tok, KL_PROMPT, req.subject, hp.subject_index)
    seqs.append(kl.ids)
    idxs.append(kl.index)
    ids, mask = pad_right(seqs, pad_id_of(tok), next(model.parameters()).device)

    def long(x: list[int]) -> torch.Tensor:
        return torch.tensor(x, dtype=torch.long, device=device)

    rows, cols = long(list(range(len(seqs)))), long(idxs)
    l_rows, l_cols, l_labels = long(loss_rows), long(loss_cols), long(labels)
    n_rw, n_tgt = len(templates), len(tgt)
    loss_block = f"{hp.layers_module}.{_loss_layer(model, hp, layer)}"
    norm = nethook.get_module(model, hp.final_norm_module)
    head = model.get_output_embeddings()  # type: ignore[operator]
    trunk: Any = model.base_model

    delta = torch.zeros(_hidden_width(model), device=device, requires_grad=True)
    opt = torch.optim.Adam([delta], lr=hp.v_lr)
    state: dict[str, Any] = {"init": None}

    def add_delta(_mod: nn.Module, _args: Any, out: Any) -> Any:
        h = out[0] if isinstance(out, tuple) else out
        if state["init"] is None:  # the block output of the bare "{}" row, before δ
            state["init"] = h[0, idxs[0]].detach().float().clone()
        h = h.clone()
        h[rows, cols] = h[rows, cols] + delta.to(h.dtype)
        return (h, *out[1:]) if isinstance(out, tuple) else h

    trace: list[dict[str, float]] = []
    kl_init: torch.Tensor | None = None
    handle = nethook.get_module(model, block_name).register_forward_hook(add_delta)
    try:
        with frozen(model):
            for step in range(hp.v_num_grad_steps):
                opt.zero_grad()
                with nethook.capture(model, loss_block, detach=False) as rec:
                    last = trunk(input_ids=ids, attention_mask=mask, use_cache=False)
                assert rec.output is not None
                h_loss = rec.output[l_rows, l_cols]
                logp = head(norm(h_loss)).float().log_softmax(-1)
                tok_lp = logp[torch.arange(len(labels), device=device), l_labels]
                per_row = torch.zeros(n_rw, device=device).index_add(0, l_rows, tok_lp)
                nll_each = -per_row / n_tgt
                nll = nll_each.mean()
                h_kl = last.last_hidden_state[rows[n_rw:], cols[n_rw:]]
                kl_logp = head(h_kl).float().log_softmax(-1)
                if kl_init is None:
                    kl_init = kl_logp.detach().clone()
                kl_loss = hp.kl_factor * torch.nn.functional.kl_div(
                    kl_init, kl_logp, log_target=True, reduction="batchmean"
                )
                init = state["init"]
                wd = hp.v_weight_decay * (delta.norm() / init.norm() ** 2)
                loss = nll + kl_loss + wd
                lv = float(loss.detach())
                argmax_all = bool((logp.detach().argmax(-1) == l_labels).all())
                trace.append(
                    {
                        "step": float(step),
                        "loss": lv,
                        "nll": float(nll.detach()),
                        "kl": float(kl_loss.detach()),
                        "weight_decay": float(wd.detach()),
                        "p_target": float(torch.exp(-nll_each.detach()).mean()),
                        "argmax_all": float(argmax_all),
                    }
                )
                if lv < hp.v_early_stop_loss:
                    break
                if hp.v_stop == "most_probable" and argmax_all:
                    break
                if rule is not None:
                    right = (logp.detach().argmax(-1) == l_labels) & (l_rows != 0)
                    p_target = float(torch.exp(-nll_each.detach()).mean())
                    if rule(StepFacts([0], [int(right.sum())], [p_target]))[0]:
                        break
                if step == hp.v_num_grad_steps - 1:
                    break
                loss.backward()
                opt.step()
                with torch.no_grad():
                    max_norm = hp.clamp_norm_factor * init.norm()
                    if delta.norm() > max_norm:
                        delta.mul_(max_norm / delta.norm())
    finally:
        handle.remove()
    init = state["init"]
    return init + delta.detach(), init, trace
