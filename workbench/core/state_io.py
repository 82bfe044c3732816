"""A run's carried method state as a file in the published package's format.

``export_state``: an AlphaEdit run's state (per edited layer its null-space projector
P and the Σ K Kᵀ of its applied steps, from the keys stored with them, after the
state the run started from, if any) written as jianghoucheng/AlphaEdit's
``AlphaEditor.save_state`` writes it; a replay reads one back with
``--initial-state`` (:func:`rome.methods.alphaedit_state.start_from`).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from evals.spec import RunSpec
from rome import BadRequestError, Editor, load_model
from rome.methods import LayerUpdate, Update, get_method
from rome.methods.alphaedit import AlphaEdit
from rome.methods.alphaedit_state import start_from, state_of, write_state
from workbench.store import Store


@dataclass(frozen=True)
class ExportedState:
    path: Path
    run_id: str
    layers: list[int]
    steps: int


def run_method(store: Store, run_id: str) -> str:
    """The method a stored run edits with (its replay config's, else its steps')."""
    run = store.get_run(run_id)
    cfg = RunSpec.of(run).replay
    if cfg is not None:
        return cfg.method
    steps = list(store.iter_steps(run.id))
    return steps[-1].method if steps else "rome"


def export_state(
    store: Store, run_id: str, path: Path, device: str = "auto", dtype: str | None = None
) -> ExportedState:
    """Write run ``run_id``'s AlphaEdit state to ``path`` (refused for another method)."""
    run = store.get_run(run_id)
    method = run_method(store, run.id)
    if method != AlphaEdit.name:  # the state file is AlphaEdit's package's format
        raise BadRequestError(
            f"run {run.id} edits with {method}: only an alphaedit run carries a state in "
            "AlphaEdit's package format"
        )
    spec = RunSpec.of(run)
    lm = load_model(run.model, device=device, dtype=dtype)
    hp = spec.edit_hparams(lm.hparams)
    ed = Editor(lm.model, lm.tokenizer, hp, keep_undo=False)
    cfg = spec.replay
    if cfg is not None and cfg.initial_state:
        start_from(ed, method, cfg.initial_state, cfg.initial_state_sha256 or "")
    alpha = get_method(method)
    n = 0
    carried = ed.method_state.get(method)
    for step in store.iter_steps(run.id):  # the keys stored with each step, in order
        layers = [LayerUpdate(x.layer, x.weight_name, x.U, x.V, x.keys) for x in step.layers]
        carried = alpha.fold(carried, Update(step.method, layers, []))
        n += 1
    if carried is not None:
        ed.start_state(method, carried)  # the state alone: no weight is written
    state = state_of(ed)
    write_state(path, state)
    return ExportedState(Path(path), run.id, state.layers, n)
