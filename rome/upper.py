"""The rows a target-vector optimisation runs, and the blocks it re-runs at each step.

Every request contributes one row per context template (template ∘ prompt,
then the target minus its last token) and one KL row (``"{} is a"``). A row
is cut at ``cut``: positions before it do not depend on ``δ`` (``δ`` is added
at the subject's last token and the model is causal), so with prefix reuse
the cut is the subject's last token, the keys and values of every block at
positions before it are computed once per optimisation (a DynamicCache), and
each step runs the blocks from the edited layer up over the positions from
the cut on only. Without prefix reuse the cut is 0 (the whole sequence, as
:class:`rome.vstar.UpperStack` runs it).

Positions: a row's token at cut + j has position id cut + j (learned GPT-2
positions and rotary ones alike). The cache is left-aligned and right-padded
(a row's prefix fills its first ``cut`` slots, the rest are masked), and the
2-D attention mask covers cache slots then suffix tokens, so the model's
own causal-mask builder (query offset = cache length) gives each suffix token
exactly its row's prefix and the suffix tokens up to itself.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from transformers import DynamicCache, PreTrainedTokenizerBase

from . import nethook
from .batching import pad_right, target_ids
from .devices import model_device
from .hparams import EditHparams
from .request import EditRequest
from .tokens import Encoded, encode_with_subject

KL_PROMPT = "{} is a"


@dataclass
class Rows:
    """Every row of every request, on the host (indices into these lists are row ids)."""

    seqs: list[list[int]] = field(default_factory=list)
    subject: list[int] = field(default_factory=list)  # the subject's last token, per row
    request: list[int] = field(default_factory=list)  # the request a row belongs to
    is_kl: list[bool] = field(default_factory=list)
    # loss entries: (row, column in the whole sequence, label)
    loss: list[tuple[int, int, int]] = field(default_factory=list)
    n_rewrite: list[int] = field(default_factory=list)  # per request
    target_len: list[int] = field(default_factory=list)  # per request
    first_row: list[int] = field(default_factory=list)  # per request: the "{}" row (v_init)

    @property
    def n_requests(self) -> int:
        return len(self.n_rewrite)


Encoder = Callable[[PreTrainedTokenizerBase, str, str], Encoded]


def build_rows(
    tok: PreTrainedTokenizerBase,
    requests: Sequence[EditRequest],
    templates_per_request: Sequence[Sequence[str]],
    kl_prompt: str = KL_PROMPT,
    encode: Encoder = encode_with_subject,
    target_tokens: Sequence[Sequence[int]] | None = None,
) -> Rows:
    """The rows of ``requests``; request ``r`` is filled into ``templates_per_request[r]``.

    ``encode`` tokenises a filled template and finds the subject's last token
    (default: the joined-string rule); ``target_tokens`` overrides each request's
    target ids (default: ``target_new`` with a leading space).
    """
    if len(requests) != len(templates_per_request):
        raise ValueError("one templates list per request")
    if target_tokens is not None and len(target_tokens) != len(requests):
        raise ValueError("one target token list per request")
    rows = Rows()
    for r, (req, templates) in enumerate(zip(requests, templates_per_request, strict=True)):
        tgt = list(target_tokens[r]) if target_tokens else target_ids(tok, req.target_new)
        rows.first_row.append(len(rows.seqs))
        for t in templates:
            enc = encode(tok, t.format(req.prompt), req.subject)
            row = len(rows.seqs)
            rows.seqs.append(enc.ids + tgt[:-1])
            rows.subject.append(enc.subject_last)
            rows.request.append(r)
            rows.is_kl.append(False)
            rows.loss += [(row, len(enc.ids) - 1 + j, tid) for j, tid in enumerate(tgt)]
        kl = encode(tok, kl_prompt, req.subject)
        rows.seqs.append(kl.ids)
        rows.subject.append(kl.subject_last)
        rows.request.append(r)
        rows.is_kl.append(True)
        rows.n_rewrite.append(len(templates))
        rows.target_len.append(len(tgt))
    return rows


def _cache_kwarg(trunk: nn.Module) -> str:
    """``cache`` (transformers ≥ 5.2x) or ``past_key_values`` (earlier)."""
    params = inspect.signature(trunk.forward).parameters
    return "cache" if "cache" in params else "past_key_values"


@dataclass
class Prefix:
    """Keys and values of every block at every row's positions before its cut."""

    keys: list[torch.Tensor]  # per layer (rows, heads, width, head_dim), masked slots zeroed
    values: list[torch.Tensor]
    mask: torch.Tensor  # (rows, width) long


@torch.no_grad()
def compute_prefix(model: nn.Module, rows: Rows, cuts: Sequence[int], pad: int) -> Prefix | None:
    """One forward of the trunk over every row's prefix (``None`` when all are empty)."""
    if max(cuts) == 0:
        return None
    trunk = model.base_model
    assert isinstance(trunk, nn.Module)
    dev = model_device(model)
    pre = [s[:c] for s, c in zip(rows.seqs, cuts, strict=True)]
    ids, mask = pad_right([p if p else [pad] for p in pre], pad, dev)
    for i, p in enumerate(pre):
        if not p:
            mask[i] = 0  # an empty prefix: one masked pad slot
    pos = torch.arange(ids.shape[1], device=dev).expand_as(ids)
    cache = DynamicCache(config=model.config)  # type: ignore[arg-type]
    trunk(
        input_ids=ids,
        attention_mask=mask,
        position_ids=pos,
        use_cache=True,
        **{_cache_kwarg(trunk): cache},
    )
    keys, values = [], []
    layers: list[Any] = list(cache.layers)
    for layer in layers:
        keep = mask.to(layer.keys.device)[:, None, :, None].bool()
        # masked slots are never attended to; zeroing them keeps a NaN of a fully
        # masked pad row (an empty prefix) out of the products
        keys.append(torch.where(keep, layer.keys, 0.0))
        values.append(torch.where(keep, layer.values, 0.0))
    return Prefix(keys, values, mask)


class UpperRun:
    """Block ``layer``'s inputs for a set of rows from their cuts on; runs blocks ``layer..``.

    Built once per set of active rows (the set shrinks as requests stop): one
    forward of the blocks below ``layer`` over the suffixes, stopped at block
    ``layer`` by a pre-hook that keeps its arguments (masks, rotary embeddings,
    the cache), so nothing depends on one architecture's calling convention.
    """

    def __init__(
        self,
        model: nn.Module,
        hp: EditHparams,
        layer: int,
        rows: Rows,
        active_rows: Sequence[int],
        cuts: Sequence[int],
        prefix: Prefix | None,
        pad: int,
        skip_module: str | None = None,
    ):
        self.layer = layer
        blocks = list(nethook.get_module(model, hp.layers_module))  # type: ignore[call-overload]
        self.blocks = blocks[layer:]
        self.norm = nethook.get_module(model, hp.final_norm_module)
        self.head = model.get_output_embeddings()  # type: ignore[operator]
        trunk = model.base_model
        assert isinstance(trunk, nn.Module)
        dev = model_device(model)
        cut = [cuts[r] for r in active_rows]
        suffixes = [rows.seqs[r][c:] for r, c in zip(active_rows, cut, strict=True)]
        ids, mask = pad_right(suffixes, pad, dev)
        pos = torch.tensor(cut, device=dev)[:, None] + torch.arange(ids.shape[1], device=dev)
        kwargs: dict[str, Any] = {"input_ids": ids, "position_ids": pos}
        self.cache: DynamicCache | None = None
        self.saved: list[tuple[torch.Tensor, torch.Tensor]] = []
        if prefix is not None:
            sel = torch.tensor(list(active_rows), device=dev)
            width = max(1, *cut)  # these rows' longest prefix (the cache is left-aligned)
            data = [
                (
                    k.index_select(0, sel.to(k.device))[:, :, :width],
                    v.index_select(0, sel.to(v.device))[:, :, :width],
                )
                for k, v in zip(prefix.keys, prefix.values, strict=True)
            ]
            self.saved = data[layer:]
            self.cache = DynamicCache(ddp_cache_data=data, config=model.config)  # type: ignore[arg-type]
            self._layers: list[Any] = list(self.cache.layers)[layer:]
            mask = torch.cat([prefix.mask.index_select(0, sel)[:, :width], mask], dim=1)
            kwargs.update({_cache_kwarg(trunk): self.cache, "use_cache": True})
        else:
            kwargs["use_cache"] = False
        kwargs["attention_mask"] = mask
        with nethook.capture_block_inputs(model, f"{hp.layers_module}.{layer}") as rec:
            with nethook.stop_after(), torch.no_grad():
                trunk(**kwargs)
        args, kw = rec["args"], dict(rec["kwargs"])
        if args:
            self.hidden, self.args = args[0].detach(), args[1:]
        else:
            self.hidden, self.args = kw.pop("hidden_states").detach(), ()
        self.kwargs = kw
        #: with ``skip_module``: that module's input and output over every suffix position
        self.module_in: torch.Tensor | None = None
        self.module_out: torch.Tensor | None = None
        if skip_module is not None:
            self._run_edited_block_once(nethook.get_module(model, skip_module))

    @property
    def skipped(self) -> bool:
        """Whether block ``layer`` ran once here (``δ`` is then added to its output)."""
        return self.module_out is not None

    @torch.no_grad()
    def _run_edited_block_once(self, module: nn.Module) -> None:
        """Run block ``layer`` once: nothing in it depends on ``δ`` when ``δ`` is added to
        its output or to a module's output that the block adds to its residual stream
        (ROME's MLP output projection), so each step starts at block ``layer + 1`` from
        this output with ``δ`` added at the subject (one addition reassociated: float
        rounding only; bit for bit when ``δ`` is added to the block's own output)."""
        seen: dict[str, torch.Tensor] = {}

        def grab(_m: nn.Module, args: tuple[Any, ...], out: Any) -> None:
            seen["in"] = args[0] if args else torch.zeros(0)
            seen["out"] = out[0] if isinstance(out, tuple) else out

        handle = module.register_forward_hook(grab)
        try:
            out = self.blocks[0](self.hidden, *self.args, **self.kwargs)
        finally:
            handle.remove()
        self.hidden = (out[0] if isinstance(out, tuple) else out).detach()
        self.module_in, self.module_out = seen["in"].detach(), seen["out"].detach()
        self.blocks = self.blocks[1:]
        if self.cache is not None:  # block ``layer``'s cache entry is never read again
            self.saved, self._layers = self.saved[1:], self._layers[1:]

    def logits_at(
        self,
        rows: torch.Tensor,
        cols: torch.Tensor,
        add: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None,
    ) -> torch.Tensor:
        """Run blocks ``layer..`` over the suffixes; logits at ``(rows, cols)`` (local).

        ``add``: (rows, cols, deltas) added to block ``layer``'s output when it ran once
        (:attr:`skipped`); otherwise a hook adds ``δ`` inside the block."""
        if self.cache is not None:  # back to the prefix alone: each step appends its suffix
            for layer, (k, v) in zip(self._layers, self.saved, strict=True):
                layer.keys, layer.values = k, v
        h = self.hidden
        if add is not None and self.skipped:
            a_rows, a_cols, deltas = add
            h = h.clone()
            h[a_rows, a_cols] = h[a_rows, a_cols] + deltas.to(h.dtype)
        for block in self.blocks:
            out = block(h, *self.args, **self.kwargs)
            h = out[0] if isinstance(out, tuple) else out
        return self.head(self.norm(h[rows.to(h.device), cols.to(h.device)]))
