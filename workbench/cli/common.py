"""What every command shares: the consoles, the app, the error handler (one line
and the exit code from ``workbench.core.errors``), progress bars, common options,
loading a model and opening the history database."""

from __future__ import annotations

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

from rome import errors as rome_errors
from rome.paths import CACHE_ENV, cache_root

if TYPE_CHECKING:
    from rome import LoadedModel
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


def load(
    model: str,
    device: str,
    dtype: str | None,
    hparams: Path | None,
    layer: int | None,
    device_map: str | None = None,
) -> LoadedModel:
    """Load a model (preset, hub id or folder) with a spinner on stderr."""
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


DbOpt = Annotated[Path | None, typer.Option("--db", help="history database ($ROME_WORKBENCH_DB)")]


def open_db(db: Path | None) -> Store:
    """The history database, stale runs marked interrupted."""
    from workbench.core.stores import open_and_recover

    return open_and_recover(db)
