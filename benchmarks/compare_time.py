"""Wall seconds of the app's Compare on one request: ROME's key modes, then batch methods.

    python benchmarks/compare_time.py [--model smollm2-135m] [--methods memit,emmet,alphaedit]
                                      [--threads 1] [--device cpu]

What the app's Compare runs (``workbench/tui/actions/edit.py`` ``action_compare``):
``Session.compare`` (the key modes, one v* shared), then
``MethodCompare.compare`` (``MethodEdits.compare`` before it) over the batch
methods (each on the editor of its own preset: templates and statistics, its
update, applied for a moment to score it, undone). The model is loaded first
and not timed; the cache folder is a new temporary one (``--cache`` to keep
one), so shipped statistics and templates are read as on a first Compare.
Printed: the commit of the ``rome`` package imported (run it with
``PYTHONPATH`` at another checkout to time that one), the seconds of each part
and in all, how many z optimisations the batch methods ran, and the load
average (``os.getloadavg``) before and after.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REQUEST = ("{} is located in the city of", "The Eiffel Tower", "Rome", "Paris")


def commit_of(package: Path) -> str:
    """The commit of the checkout holding the folder ``package`` (``rome/``), marked
    when its ``rome/`` or ``workbench/`` has uncommitted changes."""
    run = lambda *a: subprocess.run(  # noqa: E731
        ["git", "-C", str(package), *a], capture_output=True, text=True, check=False
    ).stdout.strip()
    head = run("rev-parse", "--short", "HEAD") or "unknown"
    changed = run("status", "--porcelain", "--", ".", "../workbench")
    return head + (" (with uncommitted changes)" if changed else "")


def count_z() -> list[int]:
    """One entry per z optimisation the family loop runs (its ``optimise_zs`` wrapped)."""
    import rome.methods.family.loop as loop

    runs: list[int] = []
    real = loop.optimise_zs

    def counted(*args: Any, **kwargs: Any) -> Any:
        runs.append(1)
        return real(*args, **kwargs)

    loop.optimise_zs = counted  # type: ignore[assignment]
    return runs


def load_text() -> str:
    one, five, fifteen = os.getloadavg()
    return f"{one:.2f} {five:.2f} {fifteen:.2f}"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--methods", default="memit,emmet,alphaedit", help="comma-separated")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--cache", type=Path, default=None, help="cache folder (default: a new one)")
    args = ap.parse_args()
    if args.threads < 1:
        print(f"error: --threads must be at least 1, not {args.threads}", file=sys.stderr)
        return 2
    tmp = tempfile.TemporaryDirectory()
    os.environ["ROME_WORKBENCH_CACHE"] = str(args.cache or Path(tmp.name) / "cache")
    import torch

    torch.set_num_threads(args.threads)
    import rome
    from rome.methods import method_names
    from workbench.core.forms import EditForm

    try:
        from workbench.core.method_compare import MethodCompare
    except ImportError:  # a tree from before the app's one application path
        from workbench.core.method_edits import MethodEdits as MethodCompare  # type: ignore
    from workbench.core.session import Session
    from workbench.store import Store

    methods = [m for m in args.methods.split(",") if m]
    unknown = [m for m in methods if m not in method_names()]
    if unknown:
        print(f"error: unknown method(s) {', '.join(unknown)}", file=sys.stderr)
        return 2
    runs = count_z()
    package = Path(rome.__file__).parent
    print(f"rome from {package} at commit {commit_of(package)}")
    with Store.open(Path(tmp.name) / "compare.db") as store:
        session = Session(store)
        session.load(args.model, device=args.device)
        form = EditForm(*REQUEST)
        print(f"{args.model}, {args.threads} thread(s), load before: {load_text()}")
        t0 = time.perf_counter()
        modes = session.compare(form)
        t1 = time.perf_counter()
        rows = MethodCompare(session).compare(form, modes, methods)
        t2 = time.perf_counter()
        session.finish()
    for r in rows:
        print(f"  {r.label or r.method:>10}: verdict {r.verdict}, norm {r.norm:.4g}")
    print(f"key modes ({', '.join(modes)}): {t1 - t0:.1f} s")
    print(f"methods ({', '.join(methods)}): {t2 - t1:.1f} s, z optimisations: {len(runs)}")
    print(f"Compare in all: {t2 - t0:.1f} s; load after: {load_text()}")
    tmp.cleanup()
    return 0


if __name__ == "__main__":
    sys.exit(main())
