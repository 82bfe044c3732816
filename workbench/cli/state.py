"""``export-state``: a run's AlphaEdit state in its package's ``save_state`` format."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from .common import DbOpt, DeviceOpt, DtypeOpt, app, err, handled, output_file, read_db


@app.command("export-state")
def export_state(
    run: Annotated[str, typer.Argument(help="run id (or a unique prefix)")],
    output: Annotated[Path, typer.Option("-o", "--output", help="the .pt file to write")],
    db: DbOpt = None,
    device: DeviceOpt = "auto",
    dtype: DtypeOpt = None,
) -> None:
    """Write an AlphaEdit run's state (per edited layer the null-space projector and the
    accumulated K Kᵀ) as jianghoucheng/AlphaEdit's AlphaEditor.save_state does; a
    replay starts from such a file with --initial-state."""
    from workbench.core.state_io import export_state as export

    with handled():
        store = read_db(db)
        r = store.get_run(run)
        output_file(output, example="state.pt")
        done = export(store, r.id, output, device=device, dtype=dtype)
        err.print(
            f"wrote {done.path} (run {done.run_id}: layers {done.layers}, {done.steps} step(s))",
            highlight=False,
        )
