"""Weight writes of the app's one application path, counted with ``param._version`` (each
in-place write of a weight bumps it) on every layer's edited weight of the tiny GPT-2.

Per edited layer, for ROME's key modes and each batch method of the family:

- Compute (F5): 2 (the update added, then put back) in the method's one trial: ROME's
  probe trial or the family's layer loop, where the session's probes are scored too
  (no trial of the session's); 4 for RECT and PRUNE, whose ``finish`` changes the
  loop's update and probes it again (the session's probes are scored in that trial);
- Apply of that computed outcome (F7 after F5): 1;
- undo (F8): 1;
- F7 without a computed outcome (compute to apply at once, then apply): ROME 1 (no
  trial: the probes after are scored on the applied weights); the family 3 (its layer
  loop's 2, where the probes after are scored, and the apply's 1); RECT and PRUNE 5.

Layers the step does not edit are never written. (The CLI's and a replay's counts:
tests/test_weight_writes_cli.py.)
"""

from __future__ import annotations

import pytest

from rome import load_preset
from rome.update import weight_of
from workbench.core.forms import EditForm
from workbench.core.method_compare import family_methods
from workbench.core.outcomes import score_probes
from workbench.core.session import Session
from workbench.store import Store

#: the family methods whose finish changes the layer loop's update and probes it again
REPROBED = {"rect", "prune"}
#: the default selection runs these; the rest of the family is marked slow
QUICK = {"rome/original", "rome/rrome", "rome/prompt", "memit", "emmet", "alphaedit"}
CASES = [f"rome/{m}" for m in ("original", "rrome", "prompt")] + family_methods()


def _form(case: str) -> EditForm:
    method, _, mode = case.partition("/")
    return EditForm(
        "{} is located in the city of", "The Eiffel Tower", "Rome", "Paris",
        "The Eiffel Tower can be found in", "The Louvre is located in the city of",
        mode=mode or "rrome", method=method,
    )  # fmt: skip


def _versions(session: Session) -> list[int]:
    _, ed = session.require()
    return [weight_of(ed.module(x))._version for x in range(ed.n_layers)]


def _writes(session: Session, start: list[int]) -> list[int]:
    return [b - a for a, b in zip(start, _versions(session), strict=True)]


@pytest.fixture
def session(tmp_path, monkeypatch):
    monkeypatch.setenv("ROME_WORKBENCH_CACHE", str(tmp_path / "cache"))
    with Store.open(tmp_path / "w.db") as store:
        s = Session(store)
        s.load("tiny-gpt2", device="cpu")
        lm, ed = s.require()
        # the family on layers 0-1 (two edited layers), ROME on the preset's layer 1
        lm.hparams = ed.hp = load_preset("tiny-gpt2-family")
        yield s
        s.finish()


@pytest.mark.parametrize(
    "case", [c if c in QUICK else pytest.param(c, marks=pytest.mark.slow) for c in CASES]
)
def test_compute_apply_undo_write_each_edited_weight_as_stated(session, case):
    form = _form(case)
    lm, ed = session.require()
    edits_one = form.method == "rome"
    session.compute(form)  # every cache filled before counting (C₀, templates, and
    # PRUNE's σ_max of the base weight, whose first read writes the weight once more)
    start = _versions(session)
    outcome = session.compute(form)
    layers = [lu.layer for lu in outcome.update.layers]
    assert layers == ([1] if edits_one else [0, 1])
    compute = 4 if form.method in REPROBED else 2
    want = [compute if x in layers else 0 for x in range(ed.n_layers)]
    assert _writes(session, start) == want, "compute"
    assert outcome.after is not None

    start = _versions(session)
    info = session.apply(outcome, generate=False)
    assert _writes(session, start) == [1 if x in layers else 0 for x in range(ed.n_layers)]
    # the probes after, scored in the compute's trial, are the applied weights' own
    assert info.outcome.after == score_probes(lm, form)
    start = _versions(session)
    session.undo()
    assert _writes(session, start) == [1 if x in layers else 0 for x in range(ed.n_layers)]

    # F7 with nothing computed: compute to apply at once, then apply
    start = _versions(session)
    direct = session.compute(form, trial=False)
    session.apply(direct, generate=False)
    once = 1 if edits_one else compute + 1
    assert _writes(session, start) == [once if x in layers else 0 for x in range(ed.n_layers)]
    if edits_one:
        assert direct.after is None  # scored by the apply, on the applied weights
    else:
        assert direct.after == info.outcome.after  # scored in the method's own trial
    session.undo()
