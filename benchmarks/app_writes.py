"""Weight writes per layer (``param._version``) of the app's edits on the tiny GPT-2.

    PYTHONPATH=<checkout> python benchmarks/app_writes.py

For ROME, AlphaEdit and MEMIT on the tiny family preset (ROME at layer 1, the family
at layers 0-1), once every cache is filled (one Compute first): Compute (F5), Apply of
that outcome (F7 after F5), undo (F8), and F7 with nothing computed (compute to apply
at once, then apply), each as the writes of every layer's edited weight. It runs on a
checkout from before the app's one application path too (``MethodEdits`` for the batch
methods there), to state the before and after.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable
from typing import Any


def main() -> None:
    tmp = tempfile.mkdtemp()
    os.environ["ROME_WORKBENCH_CACHE"] = os.path.join(tmp, "cache")
    from rome import load_preset
    from rome.update import weight_of
    from workbench.core.forms import EditForm
    from workbench.core.session import Session
    from workbench.store import Store

    store = Store.open(os.path.join(tmp, "w.db"))
    s = Session(store)
    s.load("tiny-gpt2", device="cpu")
    lm, ed = s.require()
    lm.hparams = ed.hp = load_preset("tiny-gpt2-family")
    compute, apply, direct = _paths(s)

    def versions() -> list[int]:
        return [weight_of(ed.module(x))._version for x in range(ed.n_layers)]

    def writes(do: Callable[[], Any]) -> tuple[list[int], Any]:
        start = versions()
        out = do()
        return [b - a for a, b in zip(start, versions(), strict=True)], out

    for m in ("rome", "alphaedit", "memit"):
        f = EditForm(
            "{} is located in the city of", "The Eiffel Tower", "Rome", "Paris",
            "The Eiffel Tower can be found in", "The Louvre is located in the city of",
            method=m,
        )  # fmt: skip
        compute(f)
        c, o = writes(lambda f=f: compute(f))  # type: ignore[misc]
        a, _ = writes(lambda o=o: apply(o))  # type: ignore[misc]
        u, _ = writes(s.undo)
        d, _ = writes(lambda f=f: apply(direct(f)))  # type: ignore[misc]
        s.undo()
        print(f"{m:10s} compute {c} apply {a} undo {u} F7-direct {d}")
    s.finish()
    store.close()


def _paths(s: Any) -> tuple[Callable, Callable, Callable]:
    """compute, apply and F7's compute on this checkout's app path(s)."""
    try:
        import workbench.core.method_compare  # noqa: F401  (the one path)
    except ImportError:  # before it: ROME by the session, the rest by MethodEdits
        from workbench.core.method_edits import MethodEdits  # type: ignore

        me = MethodEdits(s)

        def rome(f: Any) -> bool:
            return bool(f.method == "rome")

        return (
            lambda f: s.compute(f) if rome(f) else me.compute(f),
            lambda o: (s.apply if rome(o.form) else me.apply)(o, generate=False),
            lambda f: s.compute(f, trial=False) if rome(f) else me.compute(f),
        )
    return (
        s.compute,
        lambda o: s.apply(o, generate=False),
        lambda f: s.compute(f, trial=False),
    )


if __name__ == "__main__":
    main()
