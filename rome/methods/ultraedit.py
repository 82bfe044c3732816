"""UltraEdit (Gu et al. 2025; XiaojieGu/UltraEdit ``editor/ultraedit.py``, ``nets.py``).

Not locate-then-edit: no covariance, no target vector. One forward and backward
pass of the bare prompts with their targets (inputs ``prompt + target[:-1]``,
the cross-entropy averaged over every target token of the step) gives, per
edited module, the keys K (n × in: its inputs at the positions that predict a
target token) and the value gradients G (n × out: the loss's gradient at its
outputs there). A running mean and standard deviation per module shape (the
"lifelong normaliser", this method's carried state) is first updated with
[K G] of every module, then normalises them: ĥ, ĝ. With V = −lr·‖ĥ_i‖²·ĝ_i
(row-wise) the update in the published (in, out) layout is the ridge solve
Δ = (KᵀK + I)⁻¹ KᵀV, i.e. ΔW = Vᵀ (KKᵀ + I)⁻¹ K in (out, in): rank ≤ n, stored
as U = (KKᵀ + I)⁻¹ K (solved in float64, n × n) and V = Vᵀ.

Modules are named relative to a block (``mlp.gate_proj``; ``mlp_out`` is the
preset's edited weight). Modules of one layer must read the same input (gate
and up projections): they share K and U and are stored as one
:class:`LayerUpdate` whose ``weight_name`` joins them with ``+`` (V stacked by
rows). Each stored layer keeps in ``keys`` the normaliser of its shape after the
step, so a resume or an undo puts the state back exactly.

The published update of the running variance adds ``m · x.var(0)`` (unbiased)
where Chan's parallel rule adds the batch's sum of squared deviations: its
statistics are those of the concatenation plus Σ s²_b, and a batch of one row
(one single-token edit) makes them NaN. ``normaliser: exact`` (the default)
uses Chan's rule; ``published`` reproduces the published one (for parity).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ..batching import pad_id_of, pad_right, prompt_ids, target_ids
from ..context import EditContext
from ..errors import BadRequestError, RomeError, UnsupportedArchitectureError
from ..nethook import get_module
from ..progress import Progress
from ..request import EditRequest
from ..scoring import probe_requests
from ..update import add_delta, restore, weight_out_in
from .base import Capabilities, LayerUpdate, MethodBase, Update, setting, settings_dict

MODULES = {  # relative to a block; "mlp_out" is the preset's edited weight
    "gate_up": ["mlp.gate_proj", "mlp.up_proj"],
    "gate": ["mlp.gate_proj"],
    "up": ["mlp.up_proj"],
    "mlp_out": ["mlp_out"],
}


@dataclass(frozen=True)
class UltraEditSettings:
    lr: float = setting(
        1e-6,
        "the step size (published: 1e-6, 7B models)",
        low=0.0,
        inclusive=False,
        legacy="ultraedit_lr",
    )
    modules: str = setting(
        "gate_up",
        "edited modules per layer (mlp_out: the preset's edited weight)",
        choices=tuple(MODULES),
    )
    normaliser: str = setting(
        "exact",
        "the running variance: Chan's rule, or the published m·var(0)",
        choices=("exact", "published"),
        legacy="ultraedit_normaliser",
    )


Shape = tuple[int, int]  # (in, out), the published get_shape of a Linear


@dataclass(frozen=True)
class Normaliser:
    """The published ``RunningMeanStd``: n, mean, var (a sum of squares), std (float32)."""

    n: float
    mean: torch.Tensor
    var: torch.Tensor
    std: torch.Tensor

    @staticmethod
    def empty(size: int) -> Normaliser:
        z = torch.zeros(size, dtype=torch.float32)
        return Normaliser(0.0, z, z.clone(), z.clone())

    def updated(self, x: torch.Tensor, rule: str = "exact") -> Normaliser:
        """The normaliser after the rows of ``x`` (float32 arithmetic, as published)."""
        x = x.float()
        m = x.shape[0]
        n = self.n + m
        mean0 = self.mean.to(x.device)
        delta = x.mean(0) - mean0
        mean = mean0 + m * delta / n
        if rule == "published":
            # m · the unbiased variance; one row has none (NaN, as published, unwarned)
            spread = m * x.var(0) if m > 1 else torch.full_like(mean, float("nan"))
        else:
            spread = ((x - x.mean(0)) ** 2).sum(0)
        var = self.var.to(x.device) + spread + self.n * m * delta.pow(2) / n
        std = (var / (n - 1 + torch.finfo(x.dtype).eps)).sqrt()
        return Normaliser(float(n), mean, var, std)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        dev = x.device
        return (x - self.mean.to(dev)) / (self.std.to(dev) + torch.finfo(x.dtype).eps)

    def pack(self) -> torch.Tensor:
        """(4, size): mean, var, std and n (repeated), for ``LayerUpdate.keys``."""
        n = torch.full_like(self.mean, self.n)
        return torch.stack([self.mean, self.var, self.std, n]).float().cpu()

    @staticmethod
    def unpack(t: torch.Tensor) -> Normaliser:
        t = t.float()
        return Normaliser(float(t[3, 0]), t[0].clone(), t[1].clone(), t[2].clone())


def ridge_factors(keys: torch.Tensor, values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(U, V) with ``V @ U = ((KᵀK + I)⁻¹ Kᵀ Vals)ᵀ``, via (KKᵀ + I)⁻¹ K (float64, n × n)."""
    k = keys.double()
    eye = torch.eye(k.shape[0], dtype=k.dtype, device=k.device)
    u = torch.linalg.solve(k @ k.T + eye, k)
    return u.float(), values.T.float().contiguous()


class UltraEdit(MethodBase):
    """UltraEdit: ``lr``, ``modules``, ``normaliser``; carries a normaliser per shape."""

    name = "ultraedit"
    summary = "one gradient step, ridge-solved, lifelong-normalised"
    capabilities = Capabilities(batched=True, needs_c0=False, templates="none")
    Settings = UltraEditSettings

    def stores_keys(self, settings: Any) -> bool:
        return True  # each layer's normaliser after the step, in LayerUpdate.keys

    def cannot_edit(self, ctx: EditContext, settings: Any) -> str | None:
        """Why this method cannot edit the model with its settings (None: it can)."""
        try:
            for layer in self.layers(ctx, settings):
                self.module_names(ctx, layer, MODULES[settings.modules])
        except RomeError as exc:
            return str(exc)
        return None

    def module_names(self, editor: EditContext, layer: int, modules: list[str]) -> list[str]:
        """Full module names at ``layer``; refused when the architecture lacks one."""
        names = []
        for rel in modules:
            name = (
                editor.hp.weight_module(layer)
                if rel == "mlp_out"
                else f"{editor.hp.layers_module}.{layer}.{rel}"
            )
            try:
                module = get_module(editor.model, name)
            except LookupError:
                raise UnsupportedArchitectureError(
                    f"ultraedit cannot edit this model: it has no module {name!r} "
                    "(choose another ultraedit setting 'modules', e.g. mlp_out)"
                ) from None
            if not isinstance(getattr(module, "weight", None), torch.Tensor):
                raise UnsupportedArchitectureError(f"ultraedit: {name!r} has no weight matrix")
            names.append(name)
        return names

    def compute(
        self,
        editor: EditContext,
        requests: Sequence[EditRequest],
        settings: Any,
        progress: Progress | None = None,
    ) -> Update:
        """The update for ``requests`` on the model as it is now (model unchanged after)."""
        if not requests:
            raise BadRequestError("ultraedit needs at least one request")
        reqs = [r.validate() for r in requests]
        layers = self.layers(editor, settings)
        rel = MODULES[settings.modules]
        per_layer = {x: self.module_names(editor, x, rel) for x in layers}
        # the published order: each module template over the layers, in turn
        order = [per_layer[x][i] for i in range(len(rel)) for x in layers]
        keys, grads = trace(editor.model, editor.tok, reqs, order)
        state = current_state(editor)
        new_state = dict(state)
        for name in order:
            shape = shape_of(get_module(editor.model, name))
            norm = new_state.get(shape) or Normaliser.empty(shape[0] + shape[1])
            feats = torch.cat([keys[name], grads[name]], -1).float()
            new_state[shape] = norm.updated(feats, settings.normaliser)
        out: list[LayerUpdate] = []
        for layer in layers:
            out.append(
                self._layer(editor, layer, per_layer[layer], keys, grads, new_state, settings)
            )
        before = probe_requests(editor.model, editor.tok, reqs)
        after = self._probe_with(editor, out, reqs)
        records = [
            {
                "request": r.to_dict(),
                "n_rows": len(target_ids(editor.tok, r.target_new)),
                "p_new_before": before[j][0],
                "p_new_after": after[j][0],
                "p_true_before": before[j][1],
                "p_true_after": after[j][1],
            }
            for j, r in enumerate(reqs)
        ]
        opts = {
            "layers": layers,
            **settings_dict(settings),
            "n_requests": len(reqs),
            "n_rows": int(next(iter(keys.values())).shape[0]),
        }
        upd = Update(self.name, out, records, options=opts)
        upd.unsafe_reason = editor.unsafe_reason(upd)
        return upd

    def _layer(
        self,
        editor: EditContext,
        layer: int,
        names: list[str],
        keys: dict[str, torch.Tensor],
        grads: dict[str, torch.Tensor],
        state: dict[Shape, Normaliser],
        settings: Any,
    ) -> LayerUpdate:
        k = keys[names[0]].float()
        for name in names[1:]:
            if not torch.equal(keys[name], keys[names[0]]):
                raise BadRequestError(
                    f"ultraedit: {names[0]} and {name} read different inputs; the modules "
                    "edited at one layer must share theirs (gate_proj and up_proj)"
                )
        vals = []
        for name in names:
            shape = shape_of(get_module(editor.model, name))
            norm = state[shape]
            z = norm(torch.cat([k, grads[name].float()], -1))
            h_hat, g_hat = z.split([shape[0], shape[1]], -1)
            coeff = -settings.lr * (h_hat * h_hat).sum(-1, keepdim=True)
            vals.append(coeff * g_hat)
        u, v = ridge_factors(k, torch.cat(vals, -1))
        lu = LayerUpdate(layer, "+".join(names), u, v)
        lu.keys = state[shape_of(get_module(editor.model, names[0]))].pack()
        if len(names) > 1:  # the stored state is per layer: every module here must share it
            shapes = {shape_of(get_module(editor.model, n)) for n in names}
            if len(shapes) > 1:
                raise BadRequestError(f"ultraedit: modules {names} at one layer differ in shape")
        return lu

    def _probe_with(
        self, editor: EditContext, out: list[LayerUpdate], reqs: list[EditRequest]
    ) -> list[tuple[float, float | None]]:
        saved: list[tuple[nn.Module, torch.Tensor]] = []
        try:
            for lu in out:
                targets = editor.targets(lu)
                for _, module, r0, r1 in targets:
                    d = lu.delta() if len(targets) == 1 else lu.V[r0:r1] @ lu.U
                    saved.append((module, add_delta(module, d)))
            return probe_requests(editor.model, editor.tok, reqs)
        finally:
            for module, w in reversed(saved):
                restore(module, w)

    def fold(self, state: Any, update: Update) -> Any:
        """The normaliser of each edited shape becomes the one the step stored (the shape
        read from the factors: U is (k, in), the packed normaliser (4, in + out))."""
        out = dict(state or {})
        for lu in update.layers:
            if lu.keys is None:
                raise RomeError(
                    f"ultraedit: the step's layer {lu.layer} holds no normaliser; "
                    "its carried state cannot be rebuilt"
                )
            width = int(lu.U.shape[1])
            out[(width, int(lu.keys.shape[1]) - width)] = Normaliser.unpack(lu.keys)
        return out


def shape_of(module: nn.Module) -> Shape:
    rows, width = weight_out_in(module).shape
    return int(width), int(rows)


def current_state(editor: EditContext) -> dict[Shape, Normaliser]:
    return dict(editor.state or {})


def trace(
    model: nn.Module, tok: Any, reqs: list[EditRequest], names: list[str]
) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """Per module: its inputs and the loss's gradient at its outputs, at the positions
    that predict a target token (request by request, token by token), float32."""
    seqs, rows = [], []
    for i, r in enumerate(reqs):
        p, t = prompt_ids(tok, r.text), target_ids(tok, r.target_new)
        seqs.append(p + t[:-1])
        rows += [(i, len(p) - 1 + j, t[j]) for j in range(len(t))]
    dev = next(model.parameters()).device
    ids, mask = pad_right(seqs, pad_id_of(tok), dev)
    bi = torch.tensor([x[0] for x in rows], device=dev)
    pi = torch.tensor([x[1] for x in rows], device=dev)
    labels = torch.tensor([x[2] for x in rows], device=dev)
    ins: dict[str, torch.Tensor] = {}
    outs: dict[str, torch.Tensor] = {}

    def hook(name: str) -> Any:
        def f(_m: nn.Module, args: tuple[torch.Tensor, ...], output: torch.Tensor) -> None:
            ins[name] = args[0][bi, pi].detach().float()
            if not output.requires_grad:
                output.requires_grad_(True)
            outs[name] = output

        return f

    handles = [get_module(model, n).register_forward_hook(hook(n)) for n in names]
    try:
        with torch.enable_grad():
            logits = model(input_ids=ids, attention_mask=mask).logits
            loss = torch.nn.functional.cross_entropy(logits[bi, pi].float(), labels)
            order = [n for n in names if n in outs]
            grads = torch.autograd.grad(loss, [outs[n] for n in order], allow_unused=True)
    finally:
        for h in handles:
            h.remove()
    if len(order) != len(names) or any(g is None for g in grads):
        raise UnsupportedArchitectureError("ultraedit: an edited module is not on the loss's path")
    gmap = {n: g[bi, pi].detach().float() for n, g in zip(order, grads, strict=True)}
    return ins, gmap
