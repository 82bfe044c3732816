"""``rome-workbench replay``: a CounterFact sequence with GLUE checkpoints, drawn on
the terminal from ``workbench.core.replay``'s events."""

from __future__ import annotations

import re
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer
from rich.progress import Progress
from rich.table import Table

from rome import errors as rome_errors
from workbench.core.replay import ReplayHandler

from .common import (
    DbOpt,
    DeviceMapOpt,
    DeviceOpt,
    DtypeOpt,
    HparamsOpt,
    LayerOpt,
    app,
    err,
    handled,
    load,
    open_db,
    out,
    output_file,
    progress_bar,
    say,
    sigterm_as_interrupt,
    writing,
)

if TYPE_CHECKING:
    import threading

    from evals.replay import (
        CheckpointDone,
        EditDone,
        ReplayConfig,
        ReplayFinished,
        ReplayStarted,
        ReplayWarning,
    )
    from rome import LoadedModel
    from rome.hparams import EditHparams
    from workbench.store import Run, Store


# Long by its signature alone (88 lines): typer reads each option's flag, help text and
# default there. The body builds the run's settings and calls one helper per phase.
@app.command()
def replay(
    ctx: typer.Context,
    model: Annotated[
        str | None,
        typer.Option(
            "--model",
            "-m",
            help="preset name, hub id or local folder (default: the --hparams file's model, "
            "else smollm2-135m; with --resume, the run's model)",
        ),
    ] = None,
    dataset: Annotated[
        str,
        typer.Option(
            help="'sample' or 'val' (bundled CounterFact), 'zsre' (bundled zsRE), or a "
            "CounterFact or MEND-format zsRE JSON file (the format is detected)"
        ),
    ] = "sample",
    order_seed: Annotated[
        int | None,
        typer.Option(
            "--order-seed",
            help="edit the records in the order random.Random(N) shuffles them into "
            "(stored with the run; default: file order)",
        ),
    ] = None,
    n_edits: Annotated[int, typer.Option("--n-edits", help="edits to apply in order")] = 100,
    mode: Annotated[str, typer.Option(help="ROME's key mode: original, rrome or prompt")] = "rrome",
    method: Annotated[str, typer.Option(help="editing method (`methods` lists them)")] = "rome",
    opt: Annotated[
        list[str] | None,
        typer.Option("--opt", help="one of the method's settings, KEY=VALUE (repeatable)"),
    ] = None,
    batch_size: Annotated[
        int, typer.Option("--batch-size", help="requests per step (rome: 1; published: 100)")
    ] = 1,
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
    retention_size: Annotated[
        int,
        typer.Option(help="the first M edits re-scored at every checkpoint (retention; 0: off)"),
    ] = 100,
    layer: LayerOpt = None,
    initial_state: Annotated[
        Path | None,
        typer.Option(
            "--initial-state",
            help="alphaedit: start from a state its package saved (save_state; export-state)",
        ),
    ] = None,
    db: DbOpt = None,
    resume: Annotated[str | None, typer.Option(help="resume this interrupted run")] = None,
    rescore: Annotated[
        bool, typer.Option("--rescore", help="with --resume of a finished run: re-score it")
    ] = False,
    extend_to: Annotated[
        int | None,
        typer.Option(
            "--extend-to",
            help="with --resume: go on to N edits in all (the next records of the run's dataset)",
        ),
    ] = None,
    json_out: Annotated[
        Path | None, typer.Option("--json-out", help="write the run as JSON")
    ] = None,
    device: DeviceOpt = "auto",
    dtype: DtypeOpt = None,
    device_map: DeviceMapOpt = None,
    hparams: HparamsOpt = None,
) -> None:
    """Apply N CounterFact edits in sequence (one per step, or --batch-size B with a batch
    method), with GLUE, perplexity, fluency and retention checkpoints."""
    import threading

    from workbench.core.replay import edit_hparams, make_config
    from workbench.core.save import stored_layer
    from workbench.core.stores import NewDatabase

    cancel = threading.Event()
    with handled(), sigterm_as_interrupt():
        _check_flags(resume, rescore, extend_to, json_out)
        cfg = make_config(
            {
                "dataset": dataset,
                "order_seed": order_seed,
                "n_edits": n_edits,
                "mode": mode,
                "method": method,
                "method_options": _options(method, opt),
                "batch_size": batch_size,
                "glue_every": glue_every,
                "glue_tasks": glue_tasks,
                "glue_limit": glue_limit,
                "glue_dir": str(glue_dir) if glue_dir else None,
                "glue_scoring": glue_scoring,
                "glue_calibration": glue_calibration,
                "guard": guard,
                "layer": layer,
                "perplexity": perplexity,
                "retention_size": retention_size,
                **({"initial_state": str(initial_state)} if initial_state else {}),
            }
        )
        # a new run's database is created only once the model and settings are good,
        # and removed again when the replay fails before its run exists
        with NewDatabase(db, active=not resume) as new:
            if resume:
                store, run = _open_resumed(ctx, db, resume, rescore, extend_to)
                resume, model, layer = run.id, model or run.model, stored_layer(run)
            lm = load(model, device, dtype, hparams, layer, device_map)
            edit_hp = edit_hparams(
                lm, None if resume else v_stop, None if resume else norm_anchor, method
            )
            if not resume:
                store = new.open()
            finished = _run_shown(
                lm, store, cfg, n_edits, cancel, resume, edit_hp, rescore, extend_to
            )
        assert finished is not None
        _summary(store, finished.run_id, finished.status, finished.summary)
        if json_out is not None:
            _write_json(store, finished, json_out)


def _check_flags(
    resume: str | None, rescore: bool, extend_to: int | None, json_out: Path | None
) -> None:
    """The options that need ``--resume``, and ``--json-out``'s file, checked first."""
    if rescore and not resume:
        raise rome_errors.BadRequestError("--rescore re-scores a finished run: give --resume RUN")
    if extend_to is not None and not resume:
        raise rome_errors.BadRequestError("--extend-to extends a stored run: give --resume RUN")
    if json_out is not None:
        output_file(json_out, example="run.json")


def _open_resumed(
    ctx: typer.Context, db: Path | None, resume: str, rescore: bool, extend_to: int | None
) -> tuple[Store, Run]:
    """The store and the run ``--resume`` names (a bad or ambiguous id stops here, before
    the model loads), with a note for the options the resumed run does not take, and
    one when ``--rescore`` has to finish the run first."""
    store = open_db(db, create=False)
    run = store.get_run(resume)
    ignored = _not_taken_on_resume(ctx)
    if ignored:
        err.print(
            f"note: a resumed run keeps its own settings and preset; ignoring "
            f"{', '.join(ignored)}"
            + (" (--extend-to N goes on to more edits)" if "--n-edits" in ignored else ""),
            highlight=False,
        )
    if rescore and run.status != "finished" and extend_to is None:
        err.print(
            f"note: run {run.id} is {run.status}, not finished: --rescore resumes "
            f"it from edit {run.n_edits} of {run.n_edits_planned or '?'}; it is "
            "re-scored when it finishes",
            highlight=False,
        )
    return store, run


def _run_shown(
    lm: LoadedModel,
    store: Store,
    cfg: ReplayConfig,
    n_edits: int,
    cancel: threading.Event,
    resume: str | None,
    edit_hp: EditHparams,
    rescore: bool,
    extend_to: int | None,
) -> ReplayFinished | None:
    """The replay run under a progress bar; interrupted once its run exists: where to
    resume it, exit 1."""
    from workbench.core.replay import run_replay

    with progress_bar() as bar:
        shown = _ReplayProgress(bar, n_edits, resume, cfg.dataset)
        try:
            return run_replay(
                lm,
                store,
                shown,
                cfg,
                resume=resume,
                cancel=cancel,
                hparams=edit_hp,
                rescore_finished=rescore,
                extend_to=extend_to,
            )
        except KeyboardInterrupt:
            if shown.run_id is None:
                raise
            err.print(
                f"[yellow]interrupted[/yellow]: finished edits are saved; "
                f"resume with --resume {shown.run_id}"
            )
            raise typer.Exit(1) from None
        finally:
            shown.report_skipped()


def _write_json(store: Store, finished: ReplayFinished, json_out: Path) -> None:
    """``--json-out``: the run exported as JSON (where that fails: the run is kept, and how
    to export it)."""
    rid = finished.run_id
    kept = (
        f"; run {rid} is {finished.status} and stored in {store.path}: export it with "
        f"rome-workbench export {rid} --json -o FILE --db {store.path}"
    )
    with writing(json_out, kept):
        output_file(json_out, example=f"run-{rid}.json")
        store.export_run(rid, "json", json_out)
    err.print(f"wrote {json_out}", highlight=False)


#: the options that set up a new run; a resumed run keeps the ones it started with
NEW_RUN_OPTIONS = (
    "dataset",
    "initial_state",
    "order_seed",
    "n_edits",
    "mode",
    "glue_every",
    "glue_dir",
    "glue_limit",
    "glue_tasks",
    "glue_scoring",
    "glue_calibration",
    "guard",
    "v_stop",
    "norm_anchor",
    "perplexity",
    "layer",
)


def _not_taken_on_resume(ctx: typer.Context) -> list[str]:
    """The options of :data:`NEW_RUN_OPTIONS` given on the command line, as typed."""
    flags = {p.name: p.opts[0] for p in ctx.command.params}
    return [
        flags.get(name, name)
        for name in NEW_RUN_OPTIONS
        if getattr(ctx.get_parameter_source(name), "name", None) == "COMMANDLINE"
    ]


#: how many skipped CounterFact records the warning names (the rest are counted)
SKIPPED_SHOWN = 3
_SKIPPED = re.compile(r"skipped (CounterFact|zsRE) record (-?\d+): (.*)", re.DOTALL)


class _ReplayProgress(ReplayHandler):
    """A replay on the terminal: a progress bar, and a line on stderr per checkpoint;
    skipped CounterFact records in one warning (a count and the first few)."""

    def __init__(self, bar: Progress, total: int, run_id: str | None, dataset: str) -> None:
        self.bar = bar
        self.task = bar.add_task("replay", total=total)
        self.run_id = run_id
        self.dataset = dataset
        self.skipped: list[tuple[str, str]] = []
        self.kind = "CounterFact"

    def report_skipped(self) -> None:
        """One warning for the records the loader skipped (then none until more come)."""
        if not self.skipped:
            return
        n = len(self.skipped)
        shown = "; ".join(
            f"case {'?' if case == '-1' else case} ({why})"
            for case, why in self.skipped[:SKIPPED_SHOWN]
        )
        more = f"; and {n - SKIPPED_SHOWN} more" if n > SKIPPED_SHOWN else ""
        say("warning", f"skipped {n} {self.kind} record(s) of {self.dataset}: {shown}{more}")
        self.skipped = []

    def started(self, ev: ReplayStarted) -> None:
        self.report_skipped()
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
        held = ev.retention
        ret = f" retention {held['n_hold']}/{held['m']} of the first hold" if held else ""
        err.print(f"after {ev.step:4d} edits: {accs}{flu}{ppl}{ret}")

    def warning(self, ev: ReplayWarning) -> None:
        skipped = _SKIPPED.fullmatch(ev.message)
        if skipped:
            self.kind = skipped[1]
            self.skipped.append((skipped[2], skipped[3]))
            return
        self.report_skipped()
        say("warning", ev.message)


def _summary(store: Store, run_id: str, status: str, summary: dict[str, Any]) -> None:
    from workbench.core.summary import run_summary

    rs = run_summary(store, run_id, status, summary)
    t = Table(title=rs.title)
    t.add_column("figure")
    t.add_column("value", justify="right")
    for label, value in rs.rows:
        t.add_row(label, value)
    out.print(t)


def _options(method: str, pairs: list[str] | None) -> dict[str, Any]:
    """``--opt KEY=VALUE`` as the method's settings (an unknown method: checked later)."""
    from rome.methods import METHODS
    from workbench.core.methods import parse_options

    return parse_options(method, pairs or []) if method in METHODS else {}
