"""AlphaEdit's carried state in the published package's format, read and written.

jianghoucheng/AlphaEdit ``alphaedit/editor.py`` (``AlphaEditor.save_state`` /
``_load_state``) saves with ``torch.save`` a dict ``{"layers": [l, ...],
"projection": (L, d, d), "key_covariance": (L, d, d)}``: per edited layer, in the
order of ``layers``, the null-space projector P and the accumulated Σ K Kᵀ of the
applied edits (float32). Here :func:`state_of` makes one from an editor (its P per
layer and its carried Σ K Kᵀ, zero where it carries none), :func:`use_state` puts
one into an editor (after checking the layers and every shape), and
:func:`read_state` / :func:`write_state` are the file. A replay started from a file
records its SHA-256 and checks it again on resume.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ..errors import BadRequestError
from ..update import weight_out_in
from .alphaedit import AlphaEdit

KEYS = ("layers", "projection", "key_covariance")


@dataclass
class AlphaEditState:
    layers: list[int]
    projection: torch.Tensor  # (L, d, d) float32
    key_covariance: torch.Tensor  # (L, d, d) float32

    def to_dict(self) -> dict[str, object]:
        return {
            "layers": list(self.layers),
            "projection": self.projection.float().cpu().contiguous(),
            "key_covariance": self.key_covariance.float().cpu().contiguous(),
        }


def file_sha256(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def read_state(path: str | Path) -> AlphaEditState:
    """The state in ``path``; a :class:`BadRequestError` (one line) for anything else."""
    p = Path(path)
    if not p.is_file():
        raise BadRequestError(f"no AlphaEdit state file at {p}")
    try:
        data = torch.load(p, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001  (pickle, zip and torch errors alike)
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise BadRequestError(f"{p} is not a saved AlphaEdit state: {first}") from None
    if not isinstance(data, dict) or set(data) != set(KEYS):
        found = sorted(data) if isinstance(data, dict) else type(data).__name__
        raise BadRequestError(f"{p} is not an AlphaEdit state: it holds {found}, not {list(KEYS)}")
    layers, proj, cov = data["layers"], data["projection"], data["key_covariance"]
    if not isinstance(layers, (list, tuple)) or not all(isinstance(x, int) for x in layers):
        raise BadRequestError(f"{p}: 'layers' is not a list of layer numbers")
    for name, t in (("projection", proj), ("key_covariance", cov)):
        if not isinstance(t, torch.Tensor) or t.dim() != 3 or t.shape[1] != t.shape[2]:
            shape = tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__
            raise BadRequestError(f"{p}: {name!r} is {shape}, not (layers, d, d)")
        if t.shape[0] != len(layers):
            raise BadRequestError(
                f"{p}: {name!r} holds {t.shape[0]} layers, 'layers' {len(layers)}"
            )
    if proj.shape != cov.shape:
        raise BadRequestError(f"{p}: projection {tuple(proj.shape)} and key_covariance differ")
    return AlphaEditState(list(layers), proj.float(), cov.float())


def write_state(path: str | Path, state: AlphaEditState) -> Path:
    """Write ``state`` as the package's ``save_state`` does (atomically)."""
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    tmp = p.with_name(p.name + ".part")
    torch.save(state.to_dict(), tmp)
    tmp.replace(p)
    return p


def _method() -> AlphaEdit:
    return AlphaEdit()


def state_of(editor: Any) -> AlphaEditState:
    """(``editor``: a :class:`rome.Editor`, typed loosely: this package never imports it.)
    The editor's AlphaEdit state: P of each edited layer, its carried Σ K Kᵀ."""
    method = _method()
    ctx = editor.context(method)
    layers = method.layers(ctx)
    threshold = method.settings(editor.hp).nullspace_threshold
    carried = editor.method_state.get(method.name) or {}
    projs, covs = [], []
    for layer in layers:
        p, _ = method.projector(ctx, layer, threshold)
        projs.append(p.float().cpu())
        c = carried.get(layer)
        covs.append(torch.zeros_like(projs[-1]) if c is None else c.float().cpu())
    return AlphaEditState(layers, torch.stack(projs), torch.stack(covs))


def use_state(editor: Any, state: AlphaEditState) -> None:
    """Start the editor's AlphaEdit from ``state`` (its P and Σ K Kᵀ per layer).

    Refused (nothing changed) when its layers are not the ones the editor's AlphaEdit
    edits, in that order, or a layer's width is not the edited weight's input width.
    """
    method = _method()
    ctx = editor.context(method)
    layers = method.layers(ctx)
    if list(state.layers) != list(layers):
        raise BadRequestError(
            f"the AlphaEdit state is for layers {state.layers}, this run edits {layers}"
        )
    for layer in layers:
        width = int(weight_out_in(editor.module(layer)).shape[1])
        if state.projection.shape[1] != width:
            raise BadRequestError(
                f"the AlphaEdit state's layer {layer} is {state.projection.shape[1]} wide, "
                f"the model's edited weight there reads {width} inputs"
            )
    threshold = method.settings(editor.hp).nullspace_threshold
    carried: dict[int, torch.Tensor] = {}
    for i, layer in enumerate(layers):
        p = state.projection[i].float()
        kept = round(float(torch.trace(p)))
        # the projector AlphaEdit.projector reads (cached per editor): the state's own
        value = (p, kept)
        got = ctx.caches.cached(method.projector_key(layer, threshold), lambda v=value: v)
        if got is not value:
            raise BadRequestError("an AlphaEdit state is read into a fresh editor only")
        cov = state.key_covariance[i].float()
        if bool(cov.any()):
            carried[layer] = cov
    if carried:
        editor.start_state(method.name, carried)


def start_from(editor: Any, method: str, path: str, sha256: str | None = None) -> str:
    """Read ``path`` into the editor for a run of ``method``; its SHA-256 (a resume gives
    the one the run recorded: a file changed since is refused)."""
    if method != _method().name:
        raise BadRequestError(
            f"an initial state is AlphaEdit's (its package's save_state); not for {method}"
        )
    if sha256 is not None:
        if not Path(path).is_file():
            raise BadRequestError(f"the run started from the AlphaEdit state {path}: it is gone")
        if file_sha256(path) != sha256:
            raise BadRequestError(f"the AlphaEdit state {path} changed since the run started")
    state = read_state(path)
    use_state(editor, state)
    return sha256 or file_sha256(path)
