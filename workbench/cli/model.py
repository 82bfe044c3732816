"""The engine's commands: ``info``, ``stats`` (covariance statistics) and ``edit``."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.table import Table

import evals
from rome import errors as rome_errors
from rome.paths import CACHE_ENV, cache_dir
from workbench.core.limits import MAX_GENERATE_TOKENS, MAX_REQUEST_TOKENS

from .common import (
    DeviceMapOpt,
    DeviceOpt,
    DtypeOpt,
    HparamsOpt,
    LayerOpt,
    ModelOpt,
    app,
    disk_writes,
    err,
    handled,
    load,
    out,
    phase_progress,
    progress_bar,
    say,
)


@app.command()
def info(
    model: Annotated[
        str | None,
        typer.Option("--model", "-m", help="also load this model: where its edited layer lives"),
    ] = None,
    layer: LayerOpt = None,
    device: DeviceOpt = "auto",
    dtype: DtypeOpt = None,
    device_map: DeviceMapOpt = None,
    hparams: HparamsOpt = None,
) -> None:
    """Versions, devices, cache and data paths, presets; with --model, the edited layer's
    device and the memory per device."""
    import platform

    import textual
    import torch
    import transformers

    from rome import list_presets
    from workbench.store import default_db_path

    t = Table(title="rome-workbench", show_header=False)
    t.add_row("python", platform.python_version())
    t.add_row("torch", torch.__version__)
    t.add_row("transformers", transformers.__version__)
    t.add_row("textual", textual.__version__)
    if torch.cuda.is_available():
        for i in range(torch.cuda.device_count()):
            free, total = torch.cuda.mem_get_info(i)
            t.add_row(
                f"device cuda:{i}",
                f"{torch.cuda.get_device_name(i)}, {free / 2**30:.1f} of "
                f"{total / 2**30:.1f} GiB free",
            )
    else:
        t.add_row("device", "cpu (no GPU visible)")
    try:
        t.add_row("cache", f"{cache_dir()} (${CACHE_ENV})")
    except rome_errors.CacheDirError as exc:
        t.add_row("cache", f"unusable: {exc}")
    t.add_row("database", f"{default_db_path()} ($ROME_WORKBENCH_DB)")
    t.add_row("bundled data", str(Path(evals.__file__).resolve().parent / "data"))
    for name, hp in sorted(list_presets().items()):
        t.add_row(f"preset {name}", f"{hp.model}, layer {hp.layer}, {hp.mlp_out_module}")
    if model is not None:
        with handled():
            lm = load(model, device, dtype, hparams, layer, device_map)
        hp = lm.hparams
        t.add_row("model", f"{lm.name} ({lm.source}), {lm.dtype}, {lm.n_layers} layers")
        t.add_row(
            "edited layer",
            f"{hp.layer}: {hp.weight_module(hp.layer)} on {lm.edited_layer_device()}",
        )
        if lm.device_map is not None:
            where: dict[str, int] = {}
            for value in lm.device_map.values():
                key = f"cuda:{value}" if isinstance(value, int) else str(value)
                where[key] = where.get(key, 0) + 1
            t.add_row(
                "device map", ", ".join(f"{n} module(s) on {d}" for d, n in sorted(where.items()))
            )
        for dev, size in lm.memory_per_device().items():
            t.add_row(f"memory {dev}", f"{size / 2**30:.3f} GiB of weights")
    out.print(t)


@app.command()
def stats(
    model: ModelOpt = None,
    layer: LayerOpt = None,
    corpus: Annotated[
        str | None, typer.Option(help="wikipedia, wikitext, sampled, or a folder of .txt files")
    ] = None,
    n_texts: Annotated[int | None, typer.Option(help="texts to read (preset default)")] = None,
    import_npz: Annotated[
        Path | None, typer.Option("--import-npz", help="import a ROME stats .npz instead")
    ] = None,
    force: Annotated[
        bool,
        typer.Option(
            "--force", help="collect again even if cached (replaces the file once checked)"
        ),
    ] = False,
    batch_tokens: Annotated[int, typer.Option(help="tokens per forward batch")] = 4096,
    precision: Annotated[
        str, typer.Option(help="forward precision: float32, bf16 (autocast) or tf32 (GPU)")
    ] = "float32",
    accumulate: Annotated[
        str, typer.Option(help="dtype of the running sum on the device: float64 or float32")
    ] = "float64",
    device: DeviceOpt = "auto",
    dtype: DtypeOpt = None,
    device_map: DeviceMapOpt = None,
    hparams: HparamsOpt = None,
) -> None:
    """Compute (or import) and cache the covariance statistics of the edited layer.

    Under torchrun (torchrun --nproc-per-node N -m workbench.cli stats ...) the
    corpus is sharded over the ranks (NCCL on GPUs, gloo on CPUs) and rank 0
    writes the cache.
    """
    import contextlib

    from rome import Editor, distributed
    from rome import covariance as cov

    with handled():
        info = distributed.init(device=device) if distributed.launched() else distributed.DistInfo()
        try:
            if info.active:
                if import_npz is not None or device_map:
                    raise rome_errors.BadRequestError(
                        "under torchrun, stats collects with one model per rank: run "
                        "--import-npz or --device-map in one plain process"
                    )
                device = distributed.rank_device(info.backend, info.local_rank)
            if n_texts is not None and n_texts < 1:
                raise rome_errors.BadRequestError(
                    f"--n-texts must be at least 1, not {n_texts} (leave it out for the "
                    "preset's number)"
                )
            lm = load(model, device, dtype, hparams, layer, device_map)
            hp = lm.hparams.replace(mom2_n_samples=n_texts) if n_texts else lm.hparams
            ed = Editor(lm.model, lm.tokenizer, hp)
            path = ed.stats_file(hp.layer, corpus)
            assert path is not None
            width = cov.expected_width(lm.model, hp.weight_module(hp.layer))
            with disk_writes(path):
                if import_npz is not None:
                    # stored where edits read the preset's statistics; the metadata says "imported"
                    st = cov.import_rome_npz(
                        import_npz, ed.model_key, hp.layer, hp.weight_module(), width
                    )
                    cov.save_stats(path, st, width)
                else:
                    bar = progress_bar() if info.is_main else contextlib.nullcontext()
                    with bar as b:
                        cb = phase_progress(b) if b is not None else None
                        outcome = distributed.run_stats(
                            lm,
                            corpus=corpus,
                            n_texts=n_texts,
                            force=force,
                            progress=(lambda d, t: cb("covariance", d, t)) if cb else None,
                            batch_tokens=batch_tokens,
                            forward=precision,
                            accumulate=accumulate,
                            info=info,
                            path=path,
                        )
                    st = outcome.stats
                    if outcome.cached and info.is_main:
                        err.print(f"already cached: {path} (--force collects again)")
        finally:
            distributed.shutdown(info)
        if info.is_main:
            m = st.meta
            ranks = m.extra.get("world_size", 1)
            on = f", {ranks} ranks" if ranks > 1 else ""
            out.print(
                f"{m.module}: {m.n_texts} texts, {m.n_tokens} tokens of {m.corpus!r} "
                f"({m.dtype}{on}) -> {path}"
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


def _record_table(results: dict[str, Any]) -> Table:
    t = Table(title="edit")
    t.add_column("field")
    for mode in results:
        t.add_column(mode, justify="right")
    rows = [
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
    ]
    dicts = {m: r.to_dict(factors=False) for m, r in results.items()}
    for key, fmt in rows:
        cells = []
        for d in dicts.values():
            v = d[key]
            cells.append("-" if v is None else fmt.format(v))
        t.add_row(key, *cells)
    t.add_row("v* steps", *[str(len(d["v_star_trace"])) for d in dicts.values()])
    t.add_row("seconds", *[f"{sum(d['timings'].values()):.1f}" for d in dicts.values()])
    t.add_row("warning", *[d["unsafe_reason"] or "" for d in dicts.values()])
    return t


@app.command(
    epilog="The prompt with its subject filled in, and each target, may be up to "
    f"{MAX_REQUEST_TOKENS} tokens of the model's tokenizer (checked before the edit is "
    "computed)."
)
def edit(
    ctx: typer.Context,
    prompt: Annotated[str | None, typer.Option(help='template with "{}" for the subject')] = None,
    subject: Annotated[str | None, typer.Option()] = None,
    target_new: Annotated[str | None, typer.Option("--target-new")] = None,
    target_true: Annotated[str | None, typer.Option("--target-true")] = None,
    model: ModelOpt = None,
    mode: Annotated[
        str, typer.Option(help="ROME's key mode: rrome, original, prompt or all")
    ] = "rrome",
    method: Annotated[
        str, typer.Option(help="an editing method (`methods` lists them), or all (side by side)")
    ] = "rome",
    opt: Annotated[
        list[str] | None,
        typer.Option("--opt", help="one of the method's settings, KEY=VALUE (repeatable)"),
    ] = None,
    batch: Annotated[
        Path | None,
        typer.Option(help="JSON list of requests {prompt, subject, target_new[, target_true]}"),
    ] = None,
    layer: LayerOpt = None,
    hparams: HparamsOpt = None,
    templates: Annotated[
        Path | None, typer.Option(help="JSON list of context templates to use")
    ] = None,
    device: DeviceOpt = "auto",
    dtype: DtypeOpt = None,
    device_map: DeviceMapOpt = None,
    as_json: Annotated[bool, typer.Option("--json", help="print the record(s) as JSON")] = False,
    generate_tokens: Annotated[
        int, typer.Option(help=f"tokens of greedy text (0 to {MAX_GENERATE_TOKENS})")
    ] = 20,
) -> None:
    """Compute an edit (ROME in one key mode or all, or --method memit|emmet|alphaedit|all),
    show its record and the text before and after.

    With --method other than rome, or --batch, the methods' updates on the same
    request(s) side by side: update norm per layer, efficacy before and after, a verdict.
    """
    from rome import EditRequest
    from workbench.core.edits import make_editor, modes_for, preview_edit
    from workbench.core.limits import check_generate_tokens, check_request_length
    from workbench.core.methods import edit_is_side_by_side, methods_for, parse_options

    with handled():
        methods_for(method)  # an unknown name is refused with the list, ``all`` included
        options = parse_options(method, opt or [])
        if edit_is_side_by_side(method, batch is not None, options):
            _refuse_unshown(ctx, method, generate_tokens)
            _edit_methods(
                (prompt, subject, target_new, target_true), batch, method, mode, model, layer,
                hparams, device, dtype, device_map, as_json, options,
            )  # fmt: skip
            return
        modes = modes_for(mode)
        check_generate_tokens(generate_tokens)
        if prompt is None or subject is None or target_new is None:
            raise rome_errors.BadRequestError(
                "give --prompt, --subject and --target-new (or --batch FILE)"
            )
        req = EditRequest(prompt, subject, target_new, target_true).validate()
        chosen = _templates_file(templates) if templates is not None else None
        lm = load(model, device, dtype, hparams, layer, device_map)
        check_request_length(lm.tokenizer, req)
        ed = make_editor(lm, chosen)
        with progress_bar() as bar:
            # the process ends next: the last mode's update may stay on the model
            pv = preview_edit(
                lm, ed, req, modes, generate_tokens, phase_progress(bar), restore=False
            )
        if as_json:
            payload = pv.records()
            out.print_json(json.dumps(payload if len(payload) > 1 else payload[0]))
        else:
            out.print(_record_table(pv.results))
            out.print(f"[bold]before[/bold]  {req.text}[cyan]{pv.before}[/cyan]", highlight=False)
            for m, text in pv.after.items():
                out.print(f"[bold]{m:7s}[/bold] {req.text}[green]{text}[/green]", highlight=False)
        refused = [f"{m}: {r.unsafe_reason}" for m, r in pv.results.items() if r.unsafe_reason]
        if refused:  # the records are shown above; the exit status says it was refused
            raise rome_errors.UnsafeUpdateError(
                f"update not applied ({'; '.join(refused)}); the weights are unchanged"
            )


def _edit_methods(
    fields: tuple[str | None, str | None, str | None, str | None],
    batch: Path | None,
    method: str,
    mode: str,
    model: str | None,
    layer: int | None,
    hparams: Path | None,
    device: str,
    dtype: str | None,
    device_map: str | None,
    as_json: bool,
    options: dict[str, Any],
) -> None:
    """``edit --method M`` / ``--batch FILE``: the methods side by side (nothing kept)."""
    from rome import MODES, EditRequest
    from rome.hparams import method_preset
    from workbench.core.edits import make_editor
    from workbench.core.limits import check_request_length
    from workbench.core.methods import (
        ALL_METHODS,
        batch_conflicts,
        compare_methods,
        editable_methods,
        load_batch,
        methods_for,
    )

    methods = methods_for(method)
    prompt, subject, target_new, target_true = fields
    if batch is not None:
        if prompt is not None or subject is not None or target_new is not None:
            raise rome_errors.BadRequestError("give either --batch FILE or one request, not both")
        reqs = load_batch(batch)
    else:
        if prompt is None or subject is None or target_new is None:
            raise rome_errors.BadRequestError(
                "give --prompt, --subject and --target-new (or --batch FILE)"
            )
        reqs = [EditRequest(prompt, subject, target_new, target_true).validate()]
    if mode not in (*MODES, "all"):
        raise rome_errors.BadRequestError(f"unknown mode {mode!r}: {', '.join(MODES)}")
    lm = load(model, device, dtype, hparams, layer, device_map)
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
    # one method: one editor, with the method's own settings (no variant of the preset's)
    ed = make_editor(lm, hparams=method_preset(lm.hparams, method) if len(methods) == 1 else None)
    if method == ALL_METHODS:  # side by side: what cannot edit this model is left out, said once
        methods, left = editable_methods(ed, methods)
        for name, why in left:
            say("note", f"{name} left out: {why}")
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


def _methods_table(name: str, reqs: list, outs: list) -> None:
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


def _refuse_unshown(ctx: typer.Context, method: str, generate_tokens: int) -> None:
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


def _mean(xs: list[float]) -> float:
    return sum(xs) / len(xs) if xs else float("nan")


@app.command("methods")
def methods_cmd(
    as_json: Annotated[bool, typer.Option("--json", help="print them as JSON")] = False,
) -> None:
    """The editing methods: what each can do and the settings --opt KEY=VALUE takes."""
    from workbench.core.methods import describe_methods

    with handled():
        described = describe_methods()
        if as_json:
            out.print_json(json.dumps(described))
            return
        t = Table(title="editing methods")
        for col in ("method", "what", "batched", "key modes", "settings (--opt KEY=VALUE)"):
            t.add_column(col)
        for d in described:
            opts = "\n".join(
                f"{o['name']}={o['default']!s} ({o['type']}): {o['help']}" for o in d["options"]
            )
            modes = ", ".join(d["key_modes"]) or "-"
            t.add_row(d["name"], d["summary"], "yes" if d["batched"] else "no", modes, opts)
        out.print(t)
