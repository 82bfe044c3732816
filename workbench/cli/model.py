"""The engine's commands: ``info``, ``stats`` (covariance statistics) and ``edit``."""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

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
)
from .editing import edit_methods, edit_one, refuse_unshown

if TYPE_CHECKING:
    from rome import Editor, LoadedModel
    from rome.covariance import SecondMoment
    from rome.distributed import DistInfo
    from rome.hparams import EditHparams


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
    t = Table(title="rome-workbench", show_header=False)
    _environment_rows(t)
    if model is not None:
        with handled():
            lm = load(model, device, dtype, hparams, layer, device_map)
        _model_rows(t, lm)
    out.print(t)


def _environment_rows(t: Table) -> None:
    """``info``'s rows without a model: versions, devices, cache and data paths, presets."""
    import platform

    import textual
    import torch
    import transformers

    from rome import list_presets
    from workbench.store import default_db_path

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


def _model_rows(t: Table, lm: LoadedModel) -> None:
    """``info --model``'s rows: the model, where its edited layer lives, memory per device."""
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
    from rome import Editor, distributed
    from rome import covariance as cov

    with handled():
        info = distributed.init(device=device) if distributed.launched() else distributed.DistInfo()
        try:
            device = _stats_device(info, device, import_npz, device_map, n_texts)
            lm = load(model, device, dtype, hparams, layer, device_map)
            hp = lm.hparams.replace(mom2_n_samples=n_texts) if n_texts else lm.hparams
            ed = Editor(lm.model, lm.tokenizer, hp)
            path = ed.stats_file(hp.layer, corpus)
            assert path is not None
            width = cov.expected_width(lm.model, hp.weight_module(hp.layer))
            with disk_writes(path):
                if import_npz is not None:
                    st = _import_stats(import_npz, ed, hp, path, width)
                else:
                    st = _collect_stats(
                        lm, info, path, corpus, n_texts, force, batch_tokens, precision, accumulate
                    )
        finally:
            distributed.shutdown(info)
        if info.is_main:
            _print_stats(st, path)


def _stats_device(
    info: DistInfo,
    device: str,
    import_npz: Path | None,
    device_map: str | None,
    n_texts: int | None,
) -> str:
    """The device ``stats`` loads on (under torchrun: the rank's), its options checked."""
    from rome import distributed

    if info.active:
        if import_npz is not None or device_map:
            raise rome_errors.BadRequestError(
                "under torchrun, stats collects with one model per rank: run "
                "--import-npz or --device-map in one plain process"
            )
        device = distributed.rank_device(info.backend, info.local_rank)
    if n_texts is not None and n_texts < 1:
        raise rome_errors.BadRequestError(
            f"--n-texts must be at least 1, not {n_texts} (leave it out for the preset's number)"
        )
    return device


def _import_stats(npz: Path, ed: Editor, hp: EditHparams, path: Path, width: int) -> SecondMoment:
    """A ROME stats ``.npz`` imported, stored where edits read the preset's statistics
    (the metadata says "imported")."""
    from rome import covariance as cov

    st = cov.import_rome_npz(npz, ed.model_key, hp.layer, hp.weight_module(), width)
    cov.save_stats(path, st, width)
    return st


def _collect_stats(
    lm: LoadedModel,
    info: DistInfo,
    path: Path,
    corpus: str | None,
    n_texts: int | None,
    force: bool,
    batch_tokens: int,
    precision: str,
    accumulate: str,
) -> SecondMoment:
    """Collect the statistics over the corpus (sharded over the ranks under torchrun;
    a progress bar on rank 0), or read them cached (said on rank 0)."""
    import contextlib

    from rome import distributed

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
    if outcome.cached and info.is_main:
        err.print(f"already cached: {path} (--force collects again)")
    return outcome.stats


def _print_stats(st: SecondMoment, path: Path) -> None:
    """The statistics' one line: module, texts, tokens, corpus, dtype, ranks, file."""
    m = st.meta
    ranks = m.extra.get("world_size", 1)
    on = f", {ranks} ranks" if ranks > 1 else ""
    out.print(
        f"{m.module}: {m.n_texts} texts, {m.n_tokens} tokens of {m.corpus!r} "
        f"({m.dtype}{on}) -> {path}"
    )


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
    from workbench.core.methods import edit_is_side_by_side, methods_for, parse_options

    fields = (prompt, subject, target_new, target_true)
    load_args = (model, device, dtype, hparams, layer, device_map)
    with handled():
        methods_for(method)  # an unknown name is refused with the list, ``all`` included
        options = parse_options(method, opt or [])
        if edit_is_side_by_side(method, batch is not None, options):
            refuse_unshown(ctx, method, generate_tokens)
            edit_methods(fields, batch, method, mode, load_args, as_json, options)
            return
        edit_one(fields, mode, templates, generate_tokens, load_args, as_json)


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
