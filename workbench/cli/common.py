"""What every command shares: the consoles, the app, the error handler (one line
and the exit code from ``workbench.core.errors``), progress bars, common options
and how the top-level ones reach the commands, log lines, loading a model,
opening the history database, and checking the files a command is asked to write."""

from __future__ import annotations

import logging
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer
from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeRemainingColumn
from rich.text import Text
from typer.core import TyperGroup

from rome import errors as rome_errors
from rome.paths import CACHE_ENV, cache_root

if TYPE_CHECKING:
    from rome import LoadedModel
    from workbench.store import Store

out = Console()
#: messages: never wrapped by rich (a terminal wraps them itself; a pipe or a log
#: file gets each message on one line)
err = Console(stderr=True, soft_wrap=True)

HELP = f"""A workbench for locate-then-edit model editing (ROME, r-ROME, MEMIT, EMMET, AlphaEdit).

Run with no command to open the terminal app on the embedded SmolLM2.

Caches (converted models, covariance statistics, templates) live under
{cache_root()} (set ${CACHE_ENV} to move them); the edit history database is
given by --db or $ROME_WORKBENCH_DB.

--model, --device, --dtype, --device-map and --db given before the command
apply to it unless it gives its own (rome-workbench --model tiny-gpt2 edit ...);
one the command does not take is refused.
"""


class _OneLineUsage(TyperGroup):
    """Click's usage errors (a missing argument or option, an unknown option, a bad
    value) as one ``error: ...`` line on stderr naming the command, exit 2, as every
    other bad input (click would print the usage, a "Try ... --help" line and the error)."""

    def make_context(self, *args: Any, **kwargs: Any) -> Any:
        with _usage_line():
            return super().make_context(*args, **kwargs)

    def invoke(self, ctx: Any) -> Any:
        with _usage_line():
            return super().invoke(ctx)


@contextmanager
def _usage_line() -> Iterator[None]:
    try:
        yield
    except typer.TyperException as exc:  # click's (vendored by typer) usage errors: exit 2
        if getattr(exc, "exit_code", None) != 2 or not hasattr(exc, "format_message"):
            raise
        ctx = getattr(exc, "ctx", None)
        where = ctx.command_path if ctx is not None else "rome-workbench"
        message = exc.format_message().rstrip(".")
        say("error", f"{where}: {message[:1].lower()}{message[1:]} (see {where} --help)", "red")
        raise typer.Exit(2) from None


app = typer.Typer(
    help=HELP,
    no_args_is_help=False,
    add_completion=False,
    rich_markup_mode=None,
    cls=_OneLineUsage,
)


def one_line(text: str) -> str:
    """``text`` with its line breaks (and the blanks around them) turned into spaces."""
    return " ".join(part.strip() for part in str(text).splitlines() if part.strip())


def say(label: str, message: str, style: str = "yellow") -> None:
    """``label: message`` on stderr as one line (markup in ``message`` is not read)."""
    err.print(Text.assemble((f"{label}:", style), " ", one_line(message)), highlight=False)


@contextmanager
def handled() -> Iterator[None]:
    """Turn the errors of ``workbench.core.errors``' table into one line and its exit code.

    Typer's own exceptions pass through: ``typer.Exit`` and ``typer.Abort`` (both
    RuntimeErrors, which a broad ``except Exception`` would swallow) and its usage
    errors; an exception the table does not know is a bug and keeps its traceback.
    """
    from workbench.core.errors import describe

    try:
        yield
    except (typer.Exit, typer.Abort, typer.TyperException):
        raise
    except Exception as exc:
        info = describe(exc)
        if not info.expected:
            raise
        say("error", info.message, "red")
        raise typer.Exit(info.exit_code) from None


def progress_bar() -> Progress:
    """A transient bar on stderr; drawn only on a terminal (piped, it would leave a
    blank line behind and nothing else)."""
    return Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        TextColumn("{task.completed}/{task.total}"),
        TimeRemainingColumn(),
        console=err,
        transient=True,
        disable=not err.is_terminal,
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


#: the model a command loads when neither --model nor a --hparams file names one
DEFAULT_MODEL = "smollm2-135m"

ModelOpt = Annotated[
    str | None,
    typer.Option(
        "--model",
        "-m",
        help=f"preset name, hub id or local folder (default: the --hparams file's model, "
        f"else {DEFAULT_MODEL})",
    ),
]
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
    model: str | None,
    device: str,
    dtype: str | None,
    hparams: Path | None,
    layer: int | None,
    device_map: str | None = None,
) -> LoadedModel:
    """Load a model (preset, hub id or folder) with a spinner on stderr. ``--model``
    decides which weights load; without it, a ``--hparams`` file's own model does."""
    from rome import load_model
    from rome.bundle import CONVERSION_PHASE, conversion_pending
    from rome.hparams import load_preset

    if model is None:
        model = load_preset(hparams).name if hparams is not None else DEFAULT_MODEL

    what = f"{CONVERSION_PHASE}, then loading" if conversion_pending(model) else "loading"
    with err.status(f"{what} {model}..."):
        return load_model(
            model, device=device, dtype=dtype, hparams=hparams, layer=layer, device_map=device_map
        )


class _LogLines(logging.StreamHandler):  # type: ignore[type-arg]
    """Log lines on stderr: ``warning: ...`` as the CLI's own messages, or with the
    logger's name under ``--verbose``. Without it, the CounterFact loader's
    per-record warnings are left out: the replay reports skipped records itself."""

    QUIET = (("evals.counterfact", logging.WARNING),)

    def __init__(self) -> None:
        super().__init__(sys.stderr)
        self.verbose = False

    def filter(self, record: logging.LogRecord) -> bool:
        if not self.verbose and (record.name, record.levelno) in self.QUIET:
            return False
        return bool(super().filter(record))

    def format(self, record: logging.LogRecord) -> str:
        if self.verbose:
            return logging.Formatter(logging.BASIC_FORMAT).format(record)
        return f"{record.levelname.lower()}: {one_line(record.getMessage())}"

    def emit(self, record: logging.LogRecord) -> None:
        self.stream = sys.stderr  # the stderr of now (a test runner swaps it)
        super().emit(record)


def setup_logging(verbose: bool) -> None:
    """Warnings (and with ``verbose`` info lines) on stderr, one handler however often
    this is called."""
    root = logging.getLogger()
    root.setLevel(logging.INFO if verbose else logging.WARNING)
    handler = next((h for h in root.handlers if isinstance(h, _LogLines)), None)
    if handler is None:
        handler = _LogLines()
        root.addHandler(handler)
    handler.verbose = verbose


#: the top-level options a command inherits when it takes an option of that name
SHARED_OPTIONS = {
    "model": "--model",
    "device": "--device",
    "dtype": "--dtype",
    "device_map": "--device-map",
    "db": "--db",
}


def pass_down(ctx: typer.Context) -> None:
    """Hand the shared options given before the command to it as its defaults (its
    own options still win); refuse one the command does not take."""
    name = ctx.invoked_subcommand
    given = {
        key: ctx.params[key]
        for key in SHARED_OPTIONS
        if getattr(ctx.get_parameter_source(key), "name", None) == "COMMANDLINE"
    }
    if name is None or not given:
        return
    command = ctx.command.get_command(ctx, name)  # type: ignore[attr-defined]
    if command is None:  # typer reports the unknown command itself
        return
    takes = {p.name for p in command.params}
    refused = [SHARED_OPTIONS[key] for key in given if key not in takes]
    if refused:
        raise rome_errors.BadRequestError(
            f"{', '.join(refused)} before the command does not apply to {name!r}, "
            f"which has no such option (rome-workbench {name} --help)"
        )
    defaults = dict(ctx.default_map or {})
    defaults[name] = {**dict(defaults.get(name) or {}), **given}
    ctx.default_map = defaults


@app.callback(invoke_without_command=True)
def main_callback(
    ctx: typer.Context,
    model: Annotated[
        str,
        typer.Option(
            "--model",
            "-m",
            help="preset name, hub id or local folder (also the command's, unless it gives one)",
        ),
    ] = "smollm2-135m",
    device: DeviceOpt = "auto",
    dtype: DtypeOpt = None,
    device_map: DeviceMapOpt = None,
    db: Annotated[Path | None, typer.Option(help="history database")] = None,
    verbose: Annotated[bool, typer.Option("--verbose", "-v", help="log to stderr")] = False,
) -> None:
    setup_logging(verbose)
    if ctx.invoked_subcommand is not None:
        with handled():
            pass_down(ctx)
        return
    from rome.models import resolve_device_map, resolve_dtype
    from workbench.tui.app import run_app

    extra: dict[str, Any] = {}
    with handled():
        resolve_dtype(dtype)
        if resolve_device_map(device_map) is not None:
            extra["device_map"] = device_map
    run_app(model=model, db_path=db, device=device, dtype=dtype, **extra)


DbOpt = Annotated[Path | None, typer.Option("--db", help="history database ($ROME_WORKBENCH_DB)")]


def open_db(db: Path | None, *, create: bool = True) -> Store:
    """The history database to write to, stale runs marked interrupted (migrated if
    older, with a warning). ``create=False``: where there is none, say so, create nothing."""
    from workbench.core.stores import open_and_recover

    return open_and_recover(db, create=create)


def read_db(db: Path | None) -> Store:
    """The history database for a command that only reads: opened read-only, nothing
    written to it (not even a migration); where there is none, say so."""
    from workbench.core.stores import open_to_read

    return open_to_read(db)


def output_file(path: Path, *, example: str = "out.json") -> Path:
    """``path`` if a command can write a file there; else :class:`OutputPathError`
    (a folder, a file in the way of its folder, a folder without write permission).
    Missing folders on the way are fine: the writer makes them."""
    from workbench.core.errors import OutputPathError, where_problem

    target = path.expanduser()
    if target.is_dir():
        raise OutputPathError(f"{path} is a folder; give a file name, e.g. {Path(path) / example}")
    problem = where_problem(target)
    if problem is not None:
        raise OutputPathError(f"cannot write {path}: {problem}")
    return target


@contextmanager
def writing(path: Path, note: str = "") -> Iterator[None]:
    """Turn an ``OSError`` while writing ``path`` into one :class:`OutputPathError` line
    (``note`` is added to it: what was kept, what to do)."""
    from workbench.core.errors import OutputPathError

    try:
        yield
    except OutputPathError as exc:  # the file checked again, just before writing
        raise OutputPathError(f"{exc}{note}") from None
    except OSError as exc:
        why = exc.strerror or str(exc)
        raise OutputPathError(f"cannot write {path}: {why}{note}") from None


#: system errors that say the disk, not the path, is the problem
_DISK_ERRNOS = ("ENOSPC", "EDQUOT", "EROFS", "EFBIG")


@contextmanager
def disk_writes(path: Path) -> Iterator[None]:
    """Turn a failed write of a cache file at ``path`` (a full disk, a read-only file
    system; safetensors' error included) into one :class:`WriteError` line, exit 1."""
    import errno

    from safetensors import SafetensorError

    from workbench.core.errors import write_error

    codes = {getattr(errno, name) for name in _DISK_ERRNOS if hasattr(errno, name)}
    try:
        yield
    except (SafetensorError, OSError) as exc:
        if isinstance(exc, OSError) and exc.errno not in codes:
            raise
        failed = write_error(exc, path)
        if failed is None:
            raise
        raise failed from None


@contextmanager
def sigterm_as_interrupt() -> Iterator[None]:
    """While the block runs, SIGTERM stops it as Ctrl-C does (``KeyboardInterrupt``:
    a replay marks its run interrupted and says how to resume, a save removes its
    partial folder). Only the main thread can take signals; elsewhere nothing changes."""
    import signal
    import threading

    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def interrupt(signum: int, frame: object) -> None:
        raise KeyboardInterrupt(f"signal {signum}")

    previous = signal.signal(signal.SIGTERM, interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)
