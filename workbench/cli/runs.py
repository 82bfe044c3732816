"""The history's commands: ``runs``, ``history``, ``export``, ``plot`` and ``save``."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, Literal

import typer
from rich import box
from rich.table import Table

from rome import errors as rome_errors

from .common import (
    DbOpt,
    DeviceOpt,
    DtypeOpt,
    app,
    err,
    handled,
    out,
    output_file,
    phase_progress,
    progress_bar,
    read_db,
    sigterm_as_interrupt,
    writing,
)


def _compact_table(title: str, caption: str | None = None) -> Table:
    """A table that fits a narrow terminal: no vertical rules, one space between columns."""
    return Table(
        title=title, caption=caption, box=box.SIMPLE_HEAD, pad_edge=False, collapse_padding=True
    )


@app.command()
def runs(
    db: DbOpt = None, model: Annotated[str | None, typer.Option(help="only this model")] = None
) -> None:
    """List the runs in the database."""
    with handled():
        store = read_db(db)
        t = _compact_table(f"runs in {store.path}")
        # the id, status and counts are never cut (the id is what the other commands take);
        # on a narrow terminal the text columns wrap instead
        for col in ("id", "kind", "model", "method", "status", "edits", "flagged", "created"):
            t.add_column(col, no_wrap=col in ("id", "status", "edits"), overflow="fold")
        for r in store.list_runs(model):
            t.add_row(
                r.id,
                r.kind,
                r.model,
                r.mode or "-",
                r.status,
                f"{r.n_edits}/{r.n_edits_planned or '-'}",
                str(r.n_flagged),
                r.created_at[:16].replace("T", " "),
            )
        out.print(t)


@app.command()
def history(
    run: Annotated[str, typer.Argument(help="run id (or a unique prefix)")], db: DbOpt = None
) -> None:
    """The edits of one run, in order, with their figures."""
    with handled():
        store = read_db(db)
        r = store.get_run(run)
        t = _compact_table(
            f"run {r.id}: {r.model}, {r.mode}, {r.status}",
            caption="ES / PS / NS: the immediate protocol (each record right after its edit)",
        )
        cols = ("#", "case", "subject", "target", "|dW|", "ratio", "denom", "cos",
                "ES", "PS", "NS", "flag")  # fmt: skip
        rows = []
        for e in store.edits(r.id):
            m = e.metrics or {}

            def f(x: Any, fmt: str = "{:.2f}") -> str:
                return "-" if x is None else fmt.format(x)

            req = e.request
            rows.append(
                (
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
            )
        # a column with nothing in it (ROME's denominator and cos for a batch method, an
        # empty flag column) is left out; numbers are never cut, text wraps when narrow
        keep = [
            i
            for i, c in enumerate(cols)
            if c in ("#", "subject", "target", "ES", "PS", "NS")
            or any(row[i] not in ("", "-") for row in rows)
        ]
        for i in keep:
            text = cols[i] in ("subject", "target", "flag")
            t.add_column(cols[i], no_wrap=not text, overflow="fold")
        for row in rows:
            t.add_row(*(row[i] for i in keep))
        out.print(t)


@app.command()
def export(
    run: Annotated[str, typer.Argument(help="run id")],
    csv: Annotated[bool, typer.Option("--csv", help="one row per edit")] = False,
    as_json: Annotated[bool, typer.Option("--json", help="the whole run (default)")] = False,
    output: Annotated[
        Path | None,
        typer.Option(
            "-o", "--output", help="file to write (without --csv/--json, a .csv name writes CSV)"
        ),
    ] = None,
    db: DbOpt = None,
) -> None:
    """Export a run as JSON (run, edits, checkpoints) or CSV (one row per edit);
    -o - writes it to standard output."""
    with handled():
        if csv and as_json:
            raise rome_errors.BadRequestError("choose one of --csv and --json")
        by_name = output is not None and output.suffix.lower() == ".csv"
        fmt: Literal["csv", "json"] = "csv" if csv or (by_name and not as_json) else "json"
        if output is not None and str(output) == "-":
            store = read_db(db)
            _export_to_stdout(store, store.get_run(run).id, fmt)
            return
        if output is not None:
            output_file(output, example=f"run.{fmt}")
        store = read_db(db)
        r = store.get_run(run)
        path = output_file(output or Path(f"run-{r.id}.{fmt}"), example=f"run-{r.id}.{fmt}")
        with writing(path):
            store.export_run(r.id, fmt, path)
        err.print(f"wrote {path}", highlight=False)


def _export_to_stdout(store: Any, run_id: str, fmt: Literal["csv", "json"]) -> None:
    """The export on standard output (written to a private temporary file first)."""
    import sys
    import tempfile

    with tempfile.TemporaryDirectory(prefix="rome-wb-export-") as tmp:
        path = store.export_run(run_id, fmt, Path(tmp) / f"run.{fmt}")
        text = path.read_text(encoding="utf-8")
    sys.stdout.write(text if text.endswith("\n") else text + "\n")
    sys.stdout.flush()


@app.command()
def plot(
    run_ids: Annotated[list[str], typer.Argument(help="one or more run ids to overlay")],
    output: Annotated[
        Path,
        typer.Option(
            "-o", "--output", help="image file: .png (added when there is no suffix), .pdf, .svg..."
        ),
    ] = Path("runs.png"),
    db: DbOpt = None,
) -> None:
    """Plot GLUE per task, update norms, drift, perplexity, fluency, retention and the
    end-of-stream survival against the edit number."""
    with handled():
        target = plot_file(output)
        store = read_db(db)
        ids = list(dict.fromkeys(store.get_run(r).id for r in run_ids))  # each run once
        from workbench.plot import plot_runs

        with writing(target):
            path = plot_runs(store, ids, target)
        err.print(f"wrote {path}", highlight=False)


def plot_file(path: Path) -> Path:
    """Where ``plot -o`` writes: ``path``, with ``.png`` added when it has no suffix;
    a format matplotlib cannot write is refused."""
    from matplotlib.backend_bases import FigureCanvasBase

    from workbench.core.errors import OutputPathError

    target = output_file(path, example="runs.png")
    if not target.suffix:
        target = output_file(target.with_name(target.name + ".png"), example="runs.png")
    kinds = FigureCanvasBase.get_supported_filetypes()
    fmt = target.suffix[1:].lower()
    if fmt not in kinds:
        raise OutputPathError(
            f"cannot write {path}: a plot is one of {', '.join(sorted(kinds))}, not .{fmt}"
        )
    return target


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
    from workbench.core.save import check_output_folder, save_run

    with handled(), sigterm_as_interrupt():
        store = read_db(db)
        r = store.get_run(run)
        check_output_folder(output, overwrite)
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
