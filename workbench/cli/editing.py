"""The phases of ``rome-workbench edit`` (the command itself is in ``model``): one ROME
edit in one key mode or all (:func:`edit_one`), or the methods side by side
(:func:`edit_methods`); checking the request, running it, printing its tables."""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

import typer
from rich.table import Table

from rome import errors as rome_errors

from .common import load, out, phase_progress, progress_bar, say

if TYPE_CHECKING:
    from rome import Editor, EditRequest, LoadedModel
    from workbench.core.edits import Preview
    from workbench.core.methods import MethodOutcome

#: ``--prompt``, ``--subject``, ``--target-new``, ``--target-true`` as given
Fields = tuple[str | None, str | None, str | None, str | None]

#: :func:`~workbench.cli.common.load`'s arguments: model, device, dtype, hparams, layer,
#: device_map
LoadArgs = tuple[str | None, str, str | None, Path | None, int | None, str | None]

#: where one request's fields are missing
NO_REQUEST = "give --prompt, --subject and --target-new (or --batch FILE)"


def edit_one(
    fields: Fields,
    mode: str,
    templates: Path | None,
    generate_tokens: int,
    load_args: LoadArgs,
    as_json: bool,
) -> None:
    """``edit`` of one request with ROME: its record per key mode and the text before and
    after. The process ends next: the last mode's update may stay on the model."""
    from rome import EditRequest
    from workbench.core.edits import make_editor, modes_for, preview_edit
    from workbench.core.limits import check_generate_tokens, check_request_length

    modes = modes_for(mode)
    check_generate_tokens(generate_tokens)
    prompt, subject, target_new, target_true = fields
    if prompt is None or subject is None or target_new is None:
        raise rome_errors.BadRequestError(NO_REQUEST)
    req = EditRequest(prompt, subject, target_new, target_true).validate()
    chosen = _templates_file(templates) if templates is not None else None
    lm = load(*load_args)
    check_request_length(lm.tokenizer, req)
    ed = make_editor(lm, chosen)
    with progress_bar() as bar:
        # the process ends next: the last mode's update may stay on the model
        pv = preview_edit(lm, ed, req, modes, generate_tokens, phase_progress(bar), restore=False)
    _show_preview(pv, req, as_json)
    refused = [f"{m}: {r.unsafe_reason}" for m, r in pv.results.items() if r.unsafe_reason]
    if refused:  # the records are shown above; the exit status says it was refused
        raise rome_errors.UnsafeUpdateError(
            f"update not applied ({'; '.join(refused)}); the weights are unchanged"
        )


def _templates_file(path: Path) -> list[str]:
    """The context templates of a ``--templates`` file; an empty list is refused."""
    from rome.templates import load_templates_file

    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        data = None  # load_templates_file says what is wrong
    if data == []:
        raise rome_errors.BadRequestError(
            f'{path} holds no context templates; give at least one ("{{}}" alone is '
            "the bare prompt), or leave --templates out to sample them"
        )
    return load_templates_file(path)


def _show_preview(pv: Preview, req: EditRequest, as_json: bool) -> None:
    """The record(s) as JSON, or the record table and the text before and after."""
    if as_json:
        payload = pv.records()
        out.print_json(json.dumps(payload if len(payload) > 1 else payload[0]))
        return
    out.print(_record_table(pv.results))
    out.print(f"[bold]before[/bold]  {req.text}[cyan]{pv.before}[/cyan]", highlight=False)
    for m, text in pv.after.items():
        out.print(f"[bold]{m:7s}[/bold] {req.text}[green]{text}[/green]", highlight=False)


#: the record table's rows: a record field and its format
RECORD_ROWS = (
    ("update_norm", "{:.3f}"),
    ("update_norm_ratio", "{:.3f}"),
    ("denominator", "{:.4g}"),
    ("cos_kstar_ks", "{:.3f}"),
    ("k_star_norm", "{:.2f}"),
    ("k_s_norm", "{:.2f}"),
    ("p_new_before", "{:.4f}"),
    ("p_new_after", "{:.4f}"),
    ("p_true_before", "{:.4f}"),
    ("p_true_after", "{:.4f}"),
    ("p_new_before_templated", "{:.4f}"),
    ("p_new_after_templated", "{:.4f}"),
)


def _record_table(results: dict[str, Any]) -> Table:
    t = Table(title="edit")
    t.add_column("field")
    for mode in results:
        t.add_column(mode, justify="right")
    dicts = {m: r.to_dict(factors=False) for m, r in results.items()}
    for key, fmt in RECORD_ROWS:
        cells = []
        for d in dicts.values():
            v = d[key]
            cells.append("-" if v is None else fmt.format(v))
        t.add_row(key, *cells)
    t.add_row("v* steps", *[str(len(d["v_star_trace"])) for d in dicts.values()])
    t.add_row("seconds", *[f"{sum(d['timings'].values()):.1f}" for d in dicts.values()])
    t.add_row("warning", *[d["unsafe_reason"] or "" for d in dicts.values()])
    return t


def refuse_unshown(ctx: typer.Context, method: str, generate_tokens: int) -> None:
    """``--templates`` and ``--generate-tokens N`` (N > 0) are the single ROME edit's,
    ``--mode`` a method's with key modes: refused in one line where the side-by-side
    table would ignore them."""
    given = [
        flag
        for name, flag in (("templates", "--templates"), ("generate_tokens", "--generate-tokens"))
        if getattr(ctx.get_parameter_source(name), "name", None) == "COMMANDLINE"
        and (name != "generate_tokens" or generate_tokens > 0)
    ]
    if given:
        raise rome_errors.BadRequestError(
            f"{' and '.join(given)} {'apply' if len(given) > 1 else 'applies'} to one ROME "
            f"edit; edit --method {method} (or --batch) shows the methods side by side "
            "without text or templates: leave them out"
        )
    from rome.methods import get_method
    from workbench.core.methods import ALL_METHODS

    given_mode = getattr(ctx.get_parameter_source("mode"), "name", None) == "COMMANDLINE"
    if given_mode and method != ALL_METHODS and not get_method(method).capabilities.key_modes:
        raise rome_errors.BadRequestError(
            f"--mode picks a key mode, and {method} has none (`methods` lists each "
            "method's): leave it out"
        )


def edit_methods(
    fields: Fields,
    batch: Path | None,
    method: str,
    mode: str,
    load_args: LoadArgs,
    as_json: bool,
    options: dict[str, Any],
) -> None:
    """``edit --method M`` / ``--batch FILE``: the methods side by side (nothing kept)."""
    from rome import MODES
    from workbench.core.methods import compare_methods, methods_for

    methods = methods_for(method)
    reqs = _requests(fields, batch)
    if mode not in (*MODES, "all"):
        raise rome_errors.BadRequestError(f"unknown mode {mode!r}: {', '.join(MODES)}")
    lm = load(*load_args)
    _check_lengths(lm, reqs, batch)
    ed, methods = _methods_editor(lm, method, methods)
    chosen = None if mode == "all" else mode  # the process ends next: the last update may stay
    outs = compare_methods(lm, ed, reqs, methods, chosen, options, restore=False)
    if as_json:
        out.print_json(json.dumps([o.to_dict() for o in outs]))
    else:
        _methods_table(lm.name, reqs, outs)
    refused = [
        f"{o.label or o.method}: {'; '.join(o.reasons).removeprefix('not applied: ')}"
        for o in outs
        if o.verdict == "REFUSED"
    ]
    if refused:  # the rows are shown above; the exit status says it was refused (as ROME's)
        raise rome_errors.UnsafeUpdateError(
            f"update not applied ({'; '.join(refused)}); the weights are unchanged"
        )


def _requests(fields: Fields, batch: Path | None) -> list[EditRequest]:
    """The requests of ``--batch FILE``, or the one request of the fields (not both)."""
    from rome import EditRequest
    from workbench.core.methods import load_batch

    prompt, subject, target_new, target_true = fields
    if batch is not None:
        if prompt is not None or subject is not None or target_new is not None:
            raise rome_errors.BadRequestError("give either --batch FILE or one request, not both")
        return load_batch(batch)
    if prompt is None or subject is None or target_new is None:
        raise rome_errors.BadRequestError(NO_REQUEST)
    return [EditRequest(prompt, subject, target_new, target_true).validate()]


def _check_lengths(lm: LoadedModel, reqs: list[EditRequest], batch: Path | None) -> None:
    """Each request within the token limit (a batch's refusal names its record), then a
    warning for each conflict within the batch."""
    from workbench.core.limits import check_request_length
    from workbench.core.methods import batch_conflicts

    for n, r in enumerate(reqs, start=1):
        try:
            check_request_length(lm.tokenizer, r)
        except rome_errors.BadRequestError as exc:
            if batch is None:
                raise
            raise rome_errors.BadRequestError(
                f"{batch}: record {n} of {len(reqs)}: {exc}"
            ) from None
    for note in batch_conflicts(reqs):
        say("warning", f"{batch}: {note}")


def _methods_editor(lm: LoadedModel, method: str, methods: list[str]) -> tuple[Editor, list[str]]:
    """The one editor the methods run on, and the methods that can edit this model."""
    from rome.hparams import method_preset
    from workbench.core.edits import make_editor
    from workbench.core.methods import ALL_METHODS, editable_methods

    # one method: one editor, with the method's own settings (no variant of the preset's)
    ed = make_editor(lm, hparams=method_preset(lm.hparams, method) if len(methods) == 1 else None)
    if method == ALL_METHODS:  # side by side: what cannot edit this model is left out, said once
        methods, left = editable_methods(ed, methods)
        for name, why in left:
            say("note", f"{name} left out: {why}")
    return ed, methods


def _methods_table(name: str, reqs: list, outs: list[MethodOutcome]) -> None:
    """The methods' rows side by side, as ``edit --method`` prints them."""
    t = Table(title=f"{len(reqs)} request(s) on {name}")
    for col in ("method", "‖ΔW‖ per layer", "‖ΔW‖/‖W‖", "p(new) before → after", "ES", "verdict"):
        t.add_column(col)
    for o in outs:
        per = ", ".join(f"{k}: {v:.3g}" for k, v in sorted(o.layer_norms.items()))
        probs = (
            f"{_mean(o.p_new_before):.3f} → {_mean(o.p_new_after):.3f}" if o.p_new_after else "-"
        )
        verdict = o.verdict + (f" ({'; '.join(o.reasons)})" if o.reasons else "")
        t.add_row(o.method, per or "-", f"{o.ratio:.3f}", probs, f"{o.efficacy:.2f}", verdict)
    out.print(t)


def _mean(xs: list[float]) -> float:
    return sum(xs) / len(xs) if xs else float("nan")
