"""The ``rome-workbench`` command line (typer).

Exit codes: 0 ok, 1 runtime error (weights unavailable, unsafe update, store
failure), 2 usage or bad input (bad request, unknown preset / model / run,
layer out of range). Results go to stdout; messages to stderr.
"""

from __future__ import annotations

import json
import logging
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeRemainingColumn
from rich.table import Table

from rome import errors as rome_errors
from rome.paths import CACHE_ENV, cache_dir

out = Console()
err = Console(stderr=True)

HELP = f"""A workbench for rank-one model editing (ROME and r-ROME).

Run with no command to open the terminal app on the embedded SmolLM2.

Caches (converted models, covariance statistics, templates) live under
{cache_dir()} (set ${CACHE_ENV} to move them); the edit history database is
given by --db or $ROME_WORKBENCH_DB.
"""

app = typer.Typer(help=HELP, no_args_is_help=False, add_completion=False, rich_markup_mode=None)

BAD_INPUT: tuple[type[BaseException], ...] = (
    rome_errors.BadRequestError,
    rome_errors.UnknownPresetError,
    rome_errors.LayerOutOfRangeError,
    rome_errors.UnsupportedArchitectureError,
)


def _store_errors() -> tuple[tuple[type[BaseException], ...], tuple[type[BaseException], ...]]:
    from workbench import store

    return (store.UnknownRunError, store.InvalidFieldError), (store.StoreError,)


@contextmanager
def handled() -> Iterator[None]:
    """Turn the engine's and the store's named errors into one line and an exit code.

    Only named errors are caught: ``typer.Exit`` (a RuntimeError) passes through.
    """
    bad_store, any_store = _store_errors()
    try:
        yield
    except BAD_INPUT + bad_store as exc:
        err.print(f"[red]error:[/red] {exc}", highlight=False)
        raise typer.Exit(2) from None
    except (rome_errors.RomeError, *any_store) as exc:
        err.print(f"[red]error:[/red] {exc}", highlight=False)
        raise typer.Exit(1) from None
    except _eval_errors() as exc:
        err.print(f"[red]error:[/red] {exc}", highlight=False)
        raise typer.Exit(2) from None


def _eval_errors() -> tuple[type[BaseException], ...]:
    from evals.errors import DataUnavailableError, EvalDataError

    return (EvalDataError, DataUnavailableError)


def progress_bar() -> Progress:
    return Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        TextColumn("{task.completed}/{task.total}"),
        TimeRemainingColumn(),
        console=err,
        transient=True,
    )


def phase_progress(bar: Progress) -> Callable[[str, int, int], None]:
    """An engine progress callback that drives one rich task per phase."""
    tasks: dict[str, Any] = {}

    def cb(phase: str, done: int, total: int) -> None:
        if phase not in tasks:
            label = "covariance (first time for this layer)" if phase == "covariance" else phase
            tasks[phase] = bar.add_task(label, total=total)
        bar.update(tasks[phase], completed=done, total=total)

    return cb


ModelOpt = Annotated[str, typer.Option("--model", "-m", help="preset name, hub id or local folder")]
DeviceOpt = Annotated[str, typer.Option(help="auto, cpu, cuda, cuda:1 ...")]
DtypeOpt = Annotated[str | None, typer.Option(help="float32 (default), bfloat16, float16")]
LayerOpt = Annotated[int | None, typer.Option(help="edit this layer instead of the preset's")]
HparamsOpt = Annotated[Path | None, typer.Option("--hparams", help="a preset JSON file")]


def _load(model: str, device: str, dtype: str | None, hparams: Path | None, layer: int | None):
    from rome import load_model

    with err.status(f"loading {model}..."):
        return load_model(model, device=device, dtype=dtype, hparams=hparams, layer=layer)


@app.callback(invoke_without_command=True)
def main_callback(
    ctx: typer.Context,
    model: ModelOpt = "smollm2-135m",
    device: DeviceOpt = "auto",
    db: Annotated[Path | None, typer.Option(help="history database")] = None,
    verbose: Annotated[bool, typer.Option("--verbose", "-v", help="log to stderr")] = False,
) -> None:
    logging.basicConfig(level=logging.INFO if verbose else logging.WARNING, stream=sys.stderr)
    if ctx.invoked_subcommand is None:
        from workbench.tui.app import run_app

        run_app(model=model, db_path=db, device=device)


@app.command()
def info() -> None:
    """Versions, device, cache and data paths, presets."""
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
    cuda = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU visible"
    t.add_row("device", cuda)
    t.add_row("cache", f"{cache_dir()} (${CACHE_ENV})")
    t.add_row("database", f"{default_db_path()} ($ROME_WORKBENCH_DB)")
    t.add_row("bundled data", str(Path(__file__).resolve().parent.parent / "evals" / "data"))
    for name, hp in sorted(list_presets().items()):
        t.add_row(f"preset {name}", f"{hp.model}, layer {hp.layer}, {hp.mlp_out_module}")
    out.print(t)


@app.command()
def stats(
    model: ModelOpt = "smollm2-135m",
    layer: LayerOpt = None,
    corpus: Annotated[
        str | None, typer.Option(help="wikipedia, wikitext, sampled, or a folder of .txt files")
    ] = None,
    n_texts: Annotated[int | None, typer.Option(help="texts to read (preset default)")] = None,
    import_npz: Annotated[
        Path | None, typer.Option("--import-npz", help="import a ROME stats .npz instead")
    ] = None,
    device: DeviceOpt = "auto",
    dtype: DtypeOpt = None,
    hparams: HparamsOpt = None,
) -> None:
    """Compute (or import) and cache the covariance statistics of the edited layer."""
    from rome import Editor
    from rome import covariance as cov

    with handled():
        lm = _load(model, device, dtype, hparams, layer)
        hp = lm.hparams.replace(mom2_n_samples=n_texts) if n_texts else lm.hparams
        ed = Editor(lm.model, lm.tokenizer, hp)
        path = ed.stats_file(hp.layer, corpus)
        assert path is not None
        if import_npz is not None:
            st = cov.import_rome_npz(import_npz, ed.model_key, hp.layer, hp.weight_module())
            path = ed.stats_file(hp.layer, st.meta.corpus)
            assert path is not None
            cov.save_stats(path, st)
        elif path.is_file():
            err.print(f"already cached: {path}")
            st = cov.load_stats(path)
        else:
            with progress_bar() as bar:
                st = ed.stats(hp.layer, phase_progress(bar), corpus)
        m = st.meta
        out.print(
            f"{m.module}: {m.n_texts} texts, {m.n_tokens} tokens of {m.corpus!r} "
            f"({m.dtype}) -> {path}"
        )


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


@app.command()
def edit(
    prompt: Annotated[str, typer.Option(help='template with "{}" for the subject')],
    subject: Annotated[str, typer.Option()],
    target_new: Annotated[str, typer.Option("--target-new")],
    target_true: Annotated[str | None, typer.Option("--target-true")] = None,
    model: ModelOpt = "smollm2-135m",
    mode: Annotated[str, typer.Option(help="rrome, original, prompt or all")] = "rrome",
    layer: LayerOpt = None,
    hparams: HparamsOpt = None,
    templates: Annotated[
        Path | None, typer.Option(help="JSON list of context templates to use")
    ] = None,
    device: DeviceOpt = "auto",
    dtype: DtypeOpt = None,
    as_json: Annotated[bool, typer.Option("--json", help="print the record(s) as JSON")] = False,
    generate_tokens: Annotated[int, typer.Option(help="tokens of greedy text")] = 20,
) -> None:
    """Compute an edit in one mode (or all), show its record and text before and after."""
    from evals.metrics import generate
    from rome import MODES, EditRequest, Editor
    from rome.templates import load_templates_file

    with handled():
        if mode not in (*MODES, "all"):
            raise rome_errors.BadRequestError(f"unknown mode {mode!r}: rrome, original, prompt, all")
        req = EditRequest(prompt, subject, target_new, target_true).validate()
        lm = _load(model, device, dtype, hparams, layer)
        tpl = load_templates_file(templates) if templates else None
        ed = Editor(lm.model, lm.tokenizer, lm.hparams, templates=tpl)
        ed.check_layer(lm.hparams.layer)
        modes = list(MODES) if mode == "all" else [mode]
        with progress_bar() as bar:
            results = ed.compare(req, progress=phase_progress(bar), modes=modes)
        before = generate(lm.model, lm.tokenizer, [req.text], generate_tokens)[0]
        after: dict[str, str] = {}
        for m, r in results.items():
            if r.unsafe_reason:
                after[m] = f"(not applied: {r.unsafe_reason})"
                continue
            ed.apply(r)
            after[m] = generate(lm.model, lm.tokenizer, [req.text], generate_tokens)[0]
            ed.undo()
        if as_json:
            payload = [
                {**r.to_dict(), "generation_before": before, "generation_after": after[m]}
                for m, r in results.items()
            ]
            out.print_json(json.dumps(payload if len(payload) > 1 else payload[0]))
            return
        out.print(_record_table(results))
        out.print(f"[bold]before[/bold]  {req.text}[cyan]{before}[/cyan]", highlight=False)
        for m, text in after.items():
            out.print(f"[bold]{m:7s}[/bold] {req.text}[green]{text}[/green]", highlight=False)


def main() -> None:
    app()


if __name__ == "__main__":
    main()
