"""Rebuilding a run's edited model from the store, and saving it as a Hugging Face folder.

The rebuild is the replay's resume path: load the base model, check its
fingerprint against the run's, add each applied edit's stored factors in
order, then check the rebuilt weights against the fingerprints the edits
recorded. :func:`save_run` then writes ``save_pretrained``'s folder
(safetensors, config, tokenizer) with a ``README.md`` model card that lists
the edits.
"""

from __future__ import annotations

import logging
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from evals.spec import RunSpec
from rome import BadRequestError, Editor, LoadedModel, RomeError, load_model
from rome.methods import LayerUpdate, Update
from rome.progress import Progress
from workbench.store import Edit, Run, Store

from .errors import write_error

log = logging.getLogger(__name__)


class RebuildError(RomeError):
    """The stored edits cannot be put back onto this base model (fingerprint mismatch)."""


@dataclass
class Rebuilt:
    """A base model with a run's applied edits added back, checked."""

    lm: LoadedModel
    editor: Editor
    run: Run
    edits: list[Edit] = field(default_factory=list)


def stored_layer(run: Run) -> int | None:
    """The layer the run's base fingerprint was taken of, as the run stored it."""
    return RunSpec.of(run).layer()


def base_layer(run: Run, lm: LoadedModel) -> int:
    """:func:`stored_layer`, else the preset's layer of ``lm``."""
    layer = stored_layer(run)
    return lm.hparams.layer if layer is None else layer


def _check_final(editor: Editor, edits: list[Edit]) -> None:
    """Each edited layer's weights against the last applied edit on it that stored a fingerprint."""
    last: dict[int, Edit] = {}
    for e in edits:
        if e.fingerprint is not None:
            last[e.layer] = e
    for layer, e in sorted(last.items()):
        if editor.fingerprint([layer]) != e.fingerprint:
            raise RebuildError(
                f"the rebuilt weights of layer {layer} do not match the fingerprint stored "
                f"with edit {e.seq} of run {e.run_id}; the run cannot be rebuilt exactly"
            )


def _base_matches(run: Run, edits: list[Edit], loaded: str) -> bool:
    """Whether the loaded weights are the run's base.

    Session runs written before the base was fingerprinted at load time stored
    the fingerprint after their first edit: accepted when it is exactly that
    edit's (the final check then vouches for the rebuilt weights).
    """
    if run.base_fingerprint is None or run.base_fingerprint == loaded:
        return True
    first = next((e for e in edits if e.fingerprint is not None), None)
    return run.kind == "session" and first is not None and run.base_fingerprint == first.fingerprint


def rebuild(
    store: Store, run_id: str, lm: LoadedModel, progress: Progress | None = None
) -> Rebuilt:
    """Add run ``run_id``'s applied edits (in seq order) to ``lm``, which must hold
    the base weights; fingerprints checked before and after. Changes ``lm``."""
    run = store.get_run(run_id)
    editor = Editor(lm.model, lm.tokenizer, lm.hparams, keep_undo=False)
    layer = editor.check_layer(base_layer(run, lm))
    edits = store.edits(run.id, applied_only=True)
    steps = list(store.iter_steps(run.id))
    # the layers the first step wrote (a ROME step's: its one layer, the run's)
    first_layers = [x.layer for x in steps[0].layers] if steps else [layer]
    if not _base_matches(run, edits, editor.fingerprint(first_layers)):
        raise RebuildError(
            f"the loaded {lm.name} is not the base model run {run.id} started from "
            "(its weights differ: another dtype, another checkpoint?)"
        )
    for i, step in enumerate(steps):
        if progress:
            progress("applying edits", i, len(steps))
        layers = [LayerUpdate(x.layer, x.weight_name, x.U, x.V, x.keys) for x in step.layers]
        editor.apply_step(Update(step.method, layers, []), force=True)
    if any(len(s.edits) > 1 or len(s.layers) > 1 for s in steps):  # the step's fingerprint
        last = steps[-1]
        if editor.fingerprint([x.layer for x in last.layers]) != last.edits[-1].fingerprint:
            raise RebuildError(
                f"the rebuilt weights do not match the fingerprint stored with step "
                f"{last.step} of run {run.id}; the run cannot be rebuilt exactly"
            )
    else:
        _check_final(editor, edits)
    return Rebuilt(lm, editor, run, edits)


def _cell(text: Any) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def model_card(rebuilt: Rebuilt) -> str:
    """A README.md for the saved folder: the base model and each edit, in order."""
    run, lm = rebuilt.run, rebuilt.lm
    methods = sorted({e.method_name for e in rebuilt.edits}) or ["no method"]
    lines = [
        "---",
        "tags:",
        "- rome",
        "- model-editing",
        "---",
        "",
        f"# {lm.name}, edited (rome-workbench run {run.id})",
        "",
        f"Base model: `{lm.name}` (loaded from `{lm.source}`). "
        f"This folder holds it with the {len(rebuilt.edits)} applied edit(s) by "
        f"{', '.join(methods)} of rome-workbench {run.kind} run `{run.id}`, added in this "
        "order:",
        "",
        "| # | method | prompt | subject | new target | true target | mode | layer | ‖ΔW‖ |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for e in rebuilt.edits:
        r = e.request
        norm = "-" if e.update_norm is None else f"{e.update_norm:.4g}"
        cells = [e.seq, e.method_name, r.get("prompt"), r.get("subject"), r.get("target_new")]
        cells += [r.get("target_true") or "-", e.mode or "-", e.layer, norm]
        lines.append("| " + " | ".join(_cell(c) for c in cells) + " |")
    lines += [
        "",
        f"Edited weight(s): {', '.join(sorted({e.weight_name for e in rebuilt.edits})) or '-'}. "
        "The weights were rebuilt from the base model and the stored factors, and checked "
        "against the fingerprints recorded with the edits.",
        "",
    ]
    return "\n".join(lines)


def check_output_folder(out_dir: str | Path, overwrite: bool = False) -> None:
    """Refuse a file, a non-empty folder unless ``overwrite``, or a place where no
    folder can be made (a file in the way, no permission); nothing is touched."""
    from .errors import OutputPathError, where_problem

    out_dir = Path(out_dir).expanduser().absolute()
    if out_dir.exists() and not out_dir.is_dir():
        raise BadRequestError(f"{out_dir} is a file, not a folder; give a folder to save into")
    if out_dir.is_dir() and any(out_dir.iterdir()) and not overwrite:
        raise BadRequestError(
            f"{out_dir} is not empty; choose a new folder (or overwrite it on purpose)"
        )
    problem = where_problem(out_dir) if not out_dir.is_dir() else None
    if problem is None and out_dir.is_dir() and not os.access(out_dir, os.W_OK | os.X_OK):
        problem = f"no permission to write in {out_dir}"
    if problem is not None:
        raise OutputPathError(f"cannot save into {out_dir}: {problem}")


def file_mode() -> int:
    """The mode a new file gets from the process's umask (``0o644`` under ``022``)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return 0o666 & ~mask


def write_folder(rebuilt: Rebuilt, out_dir: str | Path, *, overwrite: bool = False) -> Path:
    """``save_pretrained`` (safetensors) of the rebuilt model and tokenizer, plus the card.

    Written into a hidden folder first (beside ``out_dir``, or inside it when it
    is a folder already, such as ``.``), whose files then replace ``out_dir``'s.
    A write that fails (a full disk) removes what it wrote and raises one
    :class:`~workbench.core.errors.WriteError` line.
    """
    out = Path(out_dir).expanduser().absolute()
    check_output_folder(out, overwrite)
    inside = out.is_dir()
    tmp = out / ".rome-workbench-partial" if inside else out.with_name(f".{out.name}.partial")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        try:
            rebuilt.lm.model.save_pretrained(tmp, safe_serialization=True)  # type: ignore[operator]
            rebuilt.lm.tokenizer.save_pretrained(tmp)
            (tmp / "README.md").write_text(model_card(rebuilt), encoding="utf-8")
        except Exception as exc:
            failed = write_error(exc, out)
            if failed is None:
                raise
            raise failed from None
        mode = file_mode()
        for f in tmp.rglob("*"):
            if f.is_file():
                f.chmod(mode)
        if inside:
            for old in out.iterdir():  # only with overwrite: the folder was empty else
                if old == tmp:
                    continue
                if old.is_dir() and not old.is_symlink():
                    shutil.rmtree(old)
                else:
                    old.unlink()
            for new in tmp.iterdir():
                new.rename(out / new.name)
            tmp.rmdir()
        else:
            tmp.rename(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    log.info("saved run %s's model to %s", rebuilt.run.id, out)
    return Path(out_dir).expanduser()


def save_run(
    store: Store,
    run_id: str,
    out_dir: str | Path,
    *,
    device: str = "auto",
    dtype: str | None = None,
    overwrite: bool = False,
    progress: Progress | None = None,
    lm: LoadedModel | None = None,
) -> Path:
    """Load the run's base model (or use ``lm``, which must hold the base weights),
    rebuild its edits, and write the folder; returns its path."""
    run = store.get_run(run_id)
    check_output_folder(out_dir, overwrite)  # refuse before a long load
    if lm is None:
        lm = load_model(run.model, device=device, dtype=dtype, layer=stored_layer(run))
    rebuilt = rebuild(store, run.id, lm, progress)
    return write_folder(rebuilt, out_dir, overwrite=overwrite)
