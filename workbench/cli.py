"""The ``rome-workbench`` command line (typer): a thin face over ``workbench.core``.

Each command parses its options, calls core, and renders the result with rich.
Exit codes come from one table (``workbench.core.errors``): 0 ok, 1 runtime
error (weights unavailable, unsafe update, store failure, memory, system),
2 usage or bad input (bad request, unknown preset / model / run, layer out of
range, bad replay settings, bad data file). Results go to stdout; messages
to stderr.
"""

from __future__ import annotations

import json
import logging
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import click
import typer
from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeRemainingColumn
from rich.table import Table

from rome import errors as rome_errors
from rome.paths import CACHE_ENV, cache_dir, cache_root
from workbench.core.replay import ReplayHandler

if TYPE_CHECKING:
    from evals.replay import CheckpointDone, EditDone, ReplayStarted, ReplayWarning
    from workbench.store import Store

out = Console()
err = Console(stderr=True)

HELP = f"""A workbench for rank-one model editing (ROME and r-ROME).

Run with no command to open the terminal app on the embedded SmolLM2.

Caches (converted models, covariance statistics, templates) live under
{cache_root()} (set ${CACHE_ENV} to move them); the edit history database is
given by --db or $ROME_WORKBENCH_DB.
"""

app = typer.Typer(help=HELP, no_args_is_help=False, add_completion=False, rich_markup_mode=None)


@contextmanager
def handled() -> Iterator[None]:
    """Turn the errors of ``workbench.core.errors``' table into one line and its exit code.

    Click's own exceptions (``typer.Exit``, a RuntimeError, and ``Abort``) pass
    through; an exception the table does not know is a bug and keeps its traceback.
    """
    from workbench.core.errors import describe

    try:
        yield
    except (click.exceptions.Exit, click.exceptions.Abort, click.ClickException):
        raise
    except Exception as exc:
        info = describe(exc)
        if not info.expected:
            raise
        err.print(f"[red]error:[/red] {info.message}", highlight=False)
        raise typer.Exit(info.exit_code) from None


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
DeviceMapOpt = Annotated[
    str | None,
    typer.Option(
        "--device-map",
        help="auto, balanced, balanced_low_0 or sequential: spread a model larger than one "
        "GPU over the devices (accelerate); --device is then not used",
    ),
]


def _load(
    model: str,
    device: str,
    dtype: str | None,
    hparams: Path | None,
    layer: int | None,
    device_map: str | None = None,
):
    from rome import load_model

    with err.status(f"loading {model}..."):
        return load_model(
            model, device=device, dtype=dtype, hparams=hparams, layer=layer, device_map=device_map
        )


@app.callback(invoke_without_command=True)
def main_callback(
    ctx: typer.Context,
    model: ModelOpt = "smollm2-135m",
    device: DeviceOpt = "auto",
    dtype: DtypeOpt = None,
    device_map: DeviceMapOpt = None,
    db: Annotated[Path | None, typer.Option(help="history database")] = None,
    verbose: Annotated[bool, typer.Option("--verbose", "-v", help="log to stderr")] = False,
) -> None:
    logging.basicConfig(level=logging.INFO if verbose else logging.WARNING, stream=sys.stderr)
    if ctx.invoked_subcommand is None:
        import inspect

        from rome.models import resolve_device_map, resolve_dtype
        from workbench.tui.app import run_app

        extra: dict[str, Any] = {}
        with handled():
            resolve_dtype(dtype)
            if resolve_device_map(device_map) is not None:
                if "device_map" not in inspect.signature(run_app).parameters:
                    raise rome_errors.BadRequestError(
                        "the app does not take --device-map yet; use it with edit, stats or replay"
                    )
                extra["device_map"] = device_map
        run_app(model=model, db_path=db, device=device, dtype=dtype, **extra)


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
    t.add_row("bundled data", str(Path(__file__).resolve().parent.parent / "evals" / "data"))
    for name, hp in sorted(list_presets().items()):
        t.add_row(f"preset {name}", f"{hp.model}, layer {hp.layer}, {hp.mlp_out_module}")
    if model is not None:
        with handled():
            lm = _load(model, device, dtype, hparams, layer, device_map)
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
    model: ModelOpt = "smollm2-135m",
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
            lm = _load(model, device, dtype, hparams, layer, device_map)
            hp = lm.hparams.replace(mom2_n_samples=n_texts) if n_texts else lm.hparams
            ed = Editor(lm.model, lm.tokenizer, hp)
            path = ed.stats_file(hp.layer, corpus)
            assert path is not None
            width = cov.expected_width(lm.model, hp.weight_module(hp.layer))
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
    device_map: DeviceMapOpt = None,
    as_json: Annotated[bool, typer.Option("--json", help="print the record(s) as JSON")] = False,
    generate_tokens: Annotated[int, typer.Option(help="tokens of greedy text")] = 20,
) -> None:
    """Compute an edit in one mode (or all), show its record and text before and after."""
    from rome import EditRequest
    from workbench.core.edits import make_editor, modes_for, preview_edit

    with handled():
        modes = modes_for(mode)
        req = EditRequest(prompt, subject, target_new, target_true).validate()
        lm = _load(model, device, dtype, hparams, layer, device_map)
        ed = make_editor(lm, templates)
        with progress_bar() as bar:
            pv = preview_edit(lm, ed, req, modes, generate_tokens, phase_progress(bar))
        if as_json:
            payload = pv.records()
            out.print_json(json.dumps(payload if len(payload) > 1 else payload[0]))
            return
        out.print(_record_table(pv.results))
        out.print(f"[bold]before[/bold]  {req.text}[cyan]{pv.before}[/cyan]", highlight=False)
        for m, text in pv.after.items():
            out.print(f"[bold]{m:7s}[/bold] {req.text}[green]{text}[/green]", highlight=False)


DbOpt = Annotated[Path | None, typer.Option("--db", help="history database ($ROME_WORKBENCH_DB)")]


def _store(db: Path | None) -> Store:
    from workbench.core.stores import open_and_recover

    return open_and_recover(db)


@app.command()
def replay(
    model: ModelOpt = "smollm2-135m",
    dataset: Annotated[
        str, typer.Option(help="'sample' (bundled) or a CounterFact JSON")
    ] = "sample",
    n_edits: Annotated[int, typer.Option("--n-edits", help="edits to apply in order")] = 100,
    mode: Annotated[str, typer.Option(help="original, rrome or prompt")] = "rrome",
    glue_every: Annotated[int, typer.Option("--glue-every", help="GLUE every K edits")] = 10,
    glue_dir: Annotated[Path | None, typer.Option(help="JSON-lines GLUE folder")] = None,
    glue_limit: Annotated[int, typer.Option(help="examples per task (0: all)")] = 50,
    glue_tasks: Annotated[str, typer.Option(help="comma-separated tasks")] = "sst2,mrpc,cola,rte",
    glue_scoring: Annotated[str, typer.Option(help="logprob or generate")] = "logprob",
    glue_calibration: Annotated[
        str, typer.Option(help="none, or contextual (Calibrate Before Use; log-prob scoring)")
    ] = "none",
    guard: Annotated[bool, typer.Option(help="refuse edits flagged as disabling")] = False,
    v_stop: Annotated[
        str | None,
        typer.Option(help="v* stopping rule: loss (reference) or most_probable (ENCORE)"),
    ] = None,
    norm_anchor: Annotated[
        bool | None,
        typer.Option("--norm-anchor/--no-norm-anchor", help="norm-anchor scaling of v* (NAS)"),
    ] = None,
    perplexity: Annotated[
        bool, typer.Option(help="the held-out perplexity probe at every checkpoint")
    ] = True,
    layer: LayerOpt = None,
    db: DbOpt = None,
    resume: Annotated[str | None, typer.Option(help="resume this interrupted run")] = None,
    rescore: Annotated[
        bool, typer.Option("--rescore", help="with --resume of a finished run: re-score it")
    ] = False,
    json_out: Annotated[
        Path | None, typer.Option("--json-out", help="write the run as JSON")
    ] = None,
    device: DeviceOpt = "auto",
    dtype: DtypeOpt = None,
    device_map: DeviceMapOpt = None,
    hparams: HparamsOpt = None,
) -> None:
    """Apply N CounterFact edits in sequence, with GLUE and fluency checkpoints."""
    import threading

    from workbench.core.replay import edit_hparams, make_config, run_replay

    cancel = threading.Event()
    with handled():
        cfg = make_config(
            {
                "dataset": dataset,
                "n_edits": n_edits,
                "mode": mode,
                "glue_every": glue_every,
                "glue_tasks": glue_tasks,
                "glue_limit": glue_limit,
                "glue_dir": str(glue_dir) if glue_dir else None,
                "glue_scoring": glue_scoring,
                "glue_calibration": glue_calibration,
                "guard": guard,
                "layer": layer,
                "perplexity": perplexity,
            }
        )
        store = _store(db)
        lm = _load(model, device, dtype, hparams, layer, device_map)
        edit_hp = edit_hparams(lm, v_stop, norm_anchor)
        if resume and edit_hp is not lm.hparams:
            err.print(
                "note: a resumed run edits with the preset stored with it; ignoring "
                "--v-stop / --norm-anchor"
            )
        with progress_bar() as bar:
            shown = _ReplayProgress(bar, n_edits, resume)
            try:
                finished = run_replay(
                    lm,
                    store,
                    shown,
                    cfg,
                    resume=resume,
                    cancel=cancel,
                    hparams=edit_hp,
                    rescore_finished=rescore,
                )
            except KeyboardInterrupt:
                err.print(
                    f"[yellow]interrupted[/yellow]: finished edits are saved; "
                    f"resume with --resume {shown.run_id}"
                )
                raise typer.Exit(1) from None
        assert finished is not None
        _summary(store, finished.run_id, finished.status, finished.summary)
        if json_out is not None:
            store.export_run(finished.run_id, "json", json_out)
            err.print(f"wrote {json_out}")


class _ReplayProgress(ReplayHandler):
    """A replay on the terminal: a progress bar, and a line on stderr per checkpoint."""

    def __init__(self, bar: Progress, total: int, run_id: str | None) -> None:
        self.bar = bar
        self.task = bar.add_task("replay", total=total)
        self.run_id = run_id

    def started(self, ev: ReplayStarted) -> None:
        self.run_id = ev.run_id
        self.bar.update(self.task, total=ev.total, completed=ev.start_seq)
        err.print(f"run {ev.run_id}: {ev.total} edits, from edit {ev.start_seq}")

    def edit_done(self, ev: EditDone) -> None:
        mark = " [red]FLAGGED[/red]" if ev.flagged else ""
        self.bar.update(
            self.task,
            completed=ev.seq + 1,
            description=f"{ev.subject[:24]} -> {ev.target_new[:12]} "
            f"|dW| {ev.update_norm:.1f}{mark}",
        )

    def checkpoint(self, ev: CheckpointDone) -> None:
        accs = " ".join(f"{t} {r['accuracy']:.2f}" for t, r in ev.glue.items())
        ppl = f" perplexity {ev.perplexity:.2f}" if ev.perplexity else ""
        flu = f" fluency {ev.fluency:.2f}" if ev.fluency is not None else ""
        err.print(f"after {ev.step:4d} edits: {accs}{flu}{ppl}")

    def warning(self, ev: ReplayWarning) -> None:
        err.print(f"[yellow]warning:[/yellow] {ev.message}", highlight=False)


def _summary(store: Store, run_id: str, status: str, summary: dict[str, Any]) -> None:
    from workbench.core.summary import run_summary

    rs = run_summary(store, run_id, status, summary)
    t = Table(title=rs.title)
    t.add_column("figure")
    t.add_column("value", justify="right")
    for label, value in rs.rows:
        t.add_row(label, value)
    out.print(t)


@app.command()
def runs(
    db: DbOpt = None, model: Annotated[str | None, typer.Option(help="only this model")] = None
) -> None:
    """List the runs in the database."""
    with handled():
        store = _store(db)
        t = Table(title=f"runs in {store.path}")
        for col in ("id", "kind", "model", "mode", "status", "edits", "flagged", "created"):
            t.add_column(col)
        for r in store.list_runs(model):
            t.add_row(
                r.id,
                r.kind,
                r.model,
                r.mode or "-",
                r.status,
                f"{r.n_edits}/{r.n_edits_planned or '-'}",
                str(r.n_flagged),
                r.created_at[:19],
            )
        out.print(t)


@app.command()
def history(
    run: Annotated[str, typer.Argument(help="run id (or a unique prefix)")], db: DbOpt = None
) -> None:
    """The edits of one run, in order, with their figures."""
    with handled():
        store = _store(db)
        r = store.get_run(run)
        t = Table(title=f"run {r.id}: {r.model}, {r.mode}, {r.status}")
        for col in (
            "#",
            "case",
            "subject",
            "target",
            "|dW|",
            "ratio",
            "denom",
            "cos",
            "ES",
            "PS",
            "NS",
            "flag",
        ):
            t.add_column(col)
        for e in store.edits(r.id):
            m = e.metrics or {}

            def f(x: Any, fmt: str = "{:.2f}") -> str:
                return "-" if x is None else fmt.format(x)

            req = e.request
            t.add_row(
                str(e.seq),
                str(e.case_id or "-"),
                req.get("subject", "")[:22],
                req.get("target_new", "")[:14],
                f(e.update_norm),
                f(e.update_norm_ratio, "{:.3f}"),
                f(e.denominator, "{:.3g}"),
                f(e.cos_kstar_ks),
                f(m.get("es")),
                f(m.get("ps")),
                f(m.get("ns")),
                ("refused " if e.refused else "") + (e.flag_reason or ""),
            )
        out.print(t)


@app.command()
def export(
    run: Annotated[str, typer.Argument(help="run id")],
    csv: Annotated[bool, typer.Option("--csv", help="one row per edit")] = False,
    as_json: Annotated[bool, typer.Option("--json", help="the whole run (default)")] = False,
    output: Annotated[Path | None, typer.Option("-o", "--output", help="file to write")] = None,
    db: DbOpt = None,
) -> None:
    """Export a run as JSON (run, edits, checkpoints) or CSV (one row per edit)."""
    with handled():
        if csv and as_json:
            raise rome_errors.BadRequestError("choose one of --csv and --json")
        store = _store(db)
        fmt = "csv" if csv else "json"
        r = store.get_run(run)
        path = output or Path(f"run-{r.id}.{fmt}")
        store.export_run(r.id, fmt, path)
        err.print(f"wrote {path}")


@app.command()
def plot(
    run_ids: Annotated[list[str], typer.Argument(help="one or more run ids to overlay")],
    output: Annotated[Path, typer.Option("-o", "--output", help="PNG file")] = Path("runs.png"),
    db: DbOpt = None,
) -> None:
    """Plot GLUE per task, update norms and fluency against the edit number."""
    from workbench.plot import plot_runs

    with handled():
        store = _store(db)
        ids = [store.get_run(r).id for r in run_ids]
        path = plot_runs(store, ids, output)
        err.print(f"wrote {path}")


@app.command()
def save(
    run: Annotated[str, typer.Argument(help="run id (or a unique prefix)")],
    output: Annotated[Path, typer.Option("-o", "--output", help="folder to write (new or empty)")],
    overwrite: Annotated[
        bool, typer.Option("--overwrite", help="replace a folder that is not empty")
    ] = False,
    db: DbOpt = None,
    device: DeviceOpt = "auto",
    dtype: DtypeOpt = None,
) -> None:
    """Save a run's edited model as a Hugging Face folder (safetensors, config,
    tokenizer, a README.md listing the edits): the base model plus the run's
    applied edits in order, fingerprints checked as on resume."""
    from workbench.core.save import save_run

    with handled():
        store = _store(db)
        r = store.get_run(run)
        err.print(f"rebuilding run {r.id} on {r.model}...")
        with progress_bar() as bar:
            path = save_run(
                store,
                r.id,
                output,
                device=device,
                dtype=dtype,
                overwrite=overwrite,
                progress=phase_progress(bar),
            )
        n = len(store.edits(r.id, applied_only=True))
        err.print(f"wrote {path} ({r.model} with {n} edit(s) of run {r.id})")


def main() -> None:
    app()


if __name__ == "__main__":
    main()
