"""``rome-workbench report``: a Markdown page (and its plot) for stored runs."""

from __future__ import annotations

import shlex
from pathlib import Path
from typing import Annotated

import typer

from .common import DbOpt, app, err, handled, read_db, writing


@app.command()
def report(
    run_ids: Annotated[list[str], typer.Argument(help="one or more run ids (or unique prefixes)")],
    output: Annotated[Path, typer.Option("-o", "--output", help="folder to write the page into")],
    db: DbOpt = None,
) -> None:
    """Write DIR/README.md (settings, ES/PS/NS/S under the three protocols, retention,
    flagged edits) and DIR/runs.png (the plot) for a run or runs to compare."""
    from workbench.core.errors import OutputPathError
    from workbench.core.report import report_markdown
    from workbench.plot import plot_runs

    with handled():
        target = output.expanduser()
        if target.exists() and not target.is_dir():
            raise OutputPathError(f"{output} is a file; give a folder for the report")
        store = read_db(db)
        ids = list(dict.fromkeys(store.get_run(r).id for r in run_ids))  # each run once
        page, image = target / "README.md", target / "runs.png"
        with writing(target):
            target.mkdir(parents=True, exist_ok=True)
            plot_runs(store, ids, image)
            words = ["rome-workbench", "report", *run_ids, "-o", str(output)]
            words += ["--db", str(db)] if db is not None else []
            command = " ".join(shlex.quote(w) for w in words)
            page.write_text(report_markdown(store, ids, image.name, command), encoding="utf-8")
        err.print(f"wrote {page} and {image}", highlight=False)
