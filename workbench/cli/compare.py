"""``rome-workbench compare SPEC`` (a comparison's runs on local workers or a Ray
cluster, one live table, the merged database and its report) and ``rome-workbench
merge`` (workbench databases into one)."""

from __future__ import annotations

import shlex
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer
from rich import box
from rich.live import Live
from rich.table import Table

from .common import app, err, handled, out, say, sigterm_as_interrupt, writing

if TYPE_CHECKING:
    from workbench.core.compare import CompareSpec, RunState
    from workbench.core.compare_runner import Runner, RunProgress

_STYLE = {"done": "green", "running": "cyan", "failed": "red", "waiting": "dim"}


def _table(rows: Sequence[RunProgress], title: str) -> Table:
    from workbench.core.format import fseconds

    t = Table(title=title, box=box.SIMPLE_HEAD, pad_edge=False)
    for col in ("run", "status", "edits", "worker", "ETA", "note"):
        t.add_column(col, no_wrap=col != "note", justify="right" if col == "edits" else "left")
    for r in rows:
        status = f"[{_STYLE.get(r.status, '')}]{r.status}[/]"
        eta = fseconds(r.eta_s) if r.status == "running" and r.eta_s is not None else ""
        t.add_row(r.name, status, f"{r.edits}/{r.total}", r.worker, eta, r.note)
    return t


class _Shown:
    """The live table on a terminal; elsewhere one line per run whose status changed."""

    def __init__(self, live: Live | None) -> None:
        self.live = live
        self.last: dict[str, str] = {}

    def __call__(self, rows: list[RunProgress]) -> None:
        if self.live is not None:
            self.live.update(_table(rows, "runs"))
            return
        for r in rows:
            if self.last.get(r.name) != r.status:
                self.last[r.name] = r.status
                note = f" ({r.note})" if r.note else ""
                where = f" on {r.worker}" if r.worker and r.status == "running" else ""
                err.print(f"{r.name}: {r.status}{where}, {r.edits}/{r.total} edits{note}",
                          highlight=False, markup=False)  # fmt: skip


def _runs(n: int) -> str:
    return f"{n} run" if n == 1 else f"{n} runs"


def _dry_run(spec: CompareSpec, states: Sequence[RunState]) -> None:
    """The runs, what running the spec does to each, and its command (one line each)."""
    counts = {a: sum(s.action == a for s in states) for a in ("start", "resume", "skip")}
    out.print(
        f"{spec.name}: {_runs(len(states))} ({counts['start']} to start, {counts['resume']} to "
        f"resume, {counts['skip']} finished)",
        highlight=False,
    )
    for s in states:
        done = f"{s.edits_done}/{s.run.n_edits} edits"
        out.print(f"{s.run.name}  {s.action}  {done}", highlight=False)
        if s.action != "skip":
            cmd = shlex.join(["python", *s.argv()[1:]])
            out.print(f"  {cmd}", highlight=False, markup=False, soft_wrap=True)


def _runner(states: list[RunState], spec: CompareSpec, target: Path, workers: int | None,
            ray_address: str | None, shown: _Shown) -> Runner:  # fmt: skip
    from workbench.core.compare_runner import LocalRunner, local_workers

    if ray_address is not None:
        from workbench.core.ray_runner import RayRunner, connect

        return RayRunner(connect(ray_address), states, shown, spec_name=spec.name)
    return LocalRunner(states, local_workers(workers), target / "logs", shown, spec_name=spec.name)


def _finish(spec: CompareSpec, finished: Sequence[RunState], merged: Path,
            report_dir: Path) -> None:  # fmt: skip
    """Merge the finished runs' databases and write the report of every finished run (by
    the id in its own database, so that a run adopted with ``merge --run`` counts)."""
    from workbench.core.compare import order_groups, read_run
    from workbench.core.report import report_markdown
    from workbench.plot import plot_runs
    from workbench.store import Store
    from workbench.store.merge import merge_databases

    if not finished:
        return
    result = merge_databases([s.db for s in finished], merged)
    err.print(f"merged {len(finished)} run database(s) into {merged}: {len(result.added)} "
              f"run(s) added, {len(result.already)} already there", highlight=False)  # fmt: skip
    ids = {}
    for s in finished:
        found = read_run(s.db)
        if found is not None:
            ids[s.run.name] = found[0]
    with Store.open(merged) as store:
        order = [s.run.name for s in finished if s.run.name in ids]
        groups = {
            key: [ids[n] for n in names if n in ids] for key, names in order_groups(spec).items()
        }
        with writing(report_dir):
            report_dir.mkdir(parents=True, exist_ok=True)
            plot_runs(store, [ids[n] for n in order], report_dir / "runs.png")
            command = shlex.join(["rome-workbench", "compare", str(spec.path)])
            page = report_markdown(
                store, [ids[n] for n in order], "runs.png", command, groups=groups
            )
            (report_dir / "README.md").write_text(page, encoding="utf-8")
    err.print(f"wrote {report_dir / 'README.md'} and {report_dir / 'runs.png'}", highlight=False)


@app.command()
def compare(
    spec_file: Annotated[Path, typer.Argument(metavar="SPEC", help="the comparison's TOML spec")],
    workers: Annotated[
        int | None,
        typer.Option(help="local workers (default: one per GPU, else one per CPU core)", min=1),
    ] = None,
    ray: Annotated[
        str | None,
        typer.Option("--ray", help="run on Ray: auto, HOST:PORT, ray://HOST:PORT or local"),
    ] = None,
    out_dir: Annotated[
        Path | None,
        typer.Option(
            "--out", help="the runs' databases and logs (default: SPEC's folder/NAME-runs)"
        ),
    ] = None,
    db: Annotated[
        Path | None, typer.Option("--db", help="the merged database (default: OUT/NAME.db)")
    ] = None,
    dry_run: Annotated[
        bool, typer.Option("--dry-run", help="list the runs and their commands; run nothing")
    ] = False,
    only: Annotated[
        list[str] | None,
        typer.Option(
            "--only",
            metavar="PATTERN",
            help="run only the runs whose names match (shell-style, e.g. 'ultraedit-*'; "
            "repeatable); the report still takes every finished run",
        ),
    ] = None,
) -> None:
    """Run a comparison: every run of SPEC (methods x datasets x orders x edits x batch
    sizes) as its own replay, skipping finished runs and resuming interrupted ones; then
    merge their databases and write the comparison's report."""
    from workbench.core.compare import CompareSpecError, load_spec, run_states, selected

    with handled(), sigterm_as_interrupt():
        if ray is not None and workers is not None:
            raise CompareSpecError("--workers sets local workers; with --ray each run is a task")
        spec = load_spec(spec_file)
        target = out_dir or spec_file.parent / f"{spec.name}-runs"
        every = run_states(spec, target)
        states = selected(every, only)
        if dry_run:
            _dry_run(spec, states)
            return
        live = Live(console=err, refresh_per_second=2, transient=False) if err.is_terminal else None
        shown = _Shown(live)
        runner = _runner(states, spec, target, workers, ray, shown)
        target.mkdir(parents=True, exist_ok=True)
        try:
            if live is not None:
                with live:
                    rows = runner.run()
            else:
                rows = runner.run()
        except KeyboardInterrupt:
            say("interrupted", f"finished edits are saved; run the spec again to resume: "
                f"rome-workbench compare {spec_file}")  # fmt: skip
            raise typer.Exit(1) from None
        out.print(_table(rows, f"{spec.name}: {_runs(len(rows))}"))
        done = {r.name for r in rows if r.status == "done"}
        finished = [s for s in every if s.run.name in done or s.action == "skip"]
        _finish(spec, finished, db or target / f"{spec.name}.db", target / "report")
        failed = [r.name for r in rows if r.status != "done"]
        if failed:
            again = f"rome-workbench compare {spec_file}"
            say("warning", f"{len(failed)} run(s) did not finish ({', '.join(failed)}); "
                f"run the spec again to resume them: {again}")  # fmt: skip
            raise typer.Exit(1)


@app.command()
def merge(
    sources: Annotated[list[Path], typer.Argument(metavar="DB...", help="databases to merge")],
    output: Annotated[Path, typer.Option("-o", "--output", help="the merged database")],
    runs: Annotated[
        list[str] | None,
        typer.Option(
            "--run", metavar="ID", help="merge only this run (an id or its prefix; repeatable)"
        ),
    ] = None,
) -> None:
    """Merge workbench databases into one: every run and step once (a merge repeated adds
    nothing); two different copies of one run are refused."""
    from workbench.store.merge import merge_databases

    with handled():
        result = merge_databases(sources, output, runs)
        added = f" ({', '.join(result.added)})" if result.added else ""
        err.print(f"merged into {output}: {len(result.added)} run(s) added{added}, "
                  f"{len(result.already)} already there, {result.rows} rows written",
                  highlight=False)  # fmt: skip
