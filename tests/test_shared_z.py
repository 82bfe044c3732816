"""The family's z is optimised once per state of the weights (rome/caches.py ``Shared``):
MEMIT, EMMET and AlphaEdit with the same z settings, templates and last layer share it,
on one editor and on its variants (another method's preset), and get the updates they
get alone, bit for bit; an applied edit changes the weights and so the z.

z optimisations are counted by wrapping the family loop's ``optimise_zs`` (the real one
runs underneath); every comparison is ``torch.equal``: both sides are computed here."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

import rome.methods.family.loop as loop_mod
from rome import Editor, EditRequest, load_model, load_preset
from rome.methods.base import Update
from rome.methods.family import family_templates, use_templates

REQ = EditRequest("{} is located in the city of", "The Eiffel Tower", "Rome", "Paris")


@pytest.fixture(scope="module")
def lm() -> Any:
    return load_model("tiny-gpt2")


@pytest.fixture
def z_runs(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """The block of each z optimisation the family loop runs, in order."""
    runs: list[str] = []
    real = loop_mod.optimise_zs

    def counted(*args: Any, **kwargs: Any) -> Any:
        runs.append(args[5])
        return real(*args, **kwargs)

    monkeypatch.setattr(loop_mod, "optimise_zs", counted)
    return runs


def fresh(lm: Any, hp: Any) -> Editor:
    return Editor(lm.model, lm.tokenizer, hp, cache_dir=None)


def assert_same(a: Update, b: Update) -> None:
    assert a.method == b.method and len(a.layers) == len(b.layers)
    for x, y in zip(a.layers, b.layers, strict=True):
        assert x.layer == y.layer and torch.equal(x.U, y.U) and torch.equal(x.V, y.V)
    assert torch.equal(a.results[0]["z"], b.results[0]["z"])
    assert a.records == b.records


def emmet_preset() -> Any:
    """EMMET on the last layer only, as smollm2-135m-emmet beside smollm2-135m-memit."""
    hp = load_preset("tiny-gpt2-family")
    return hp.replace(name="tiny-gpt2-family-emmet", method="emmet", layers=[1])


def test_memit_then_emmet_optimise_z_once_and_equal_each_alone(lm, z_runs):
    hp = load_preset("tiny-gpt2-family")
    ed = fresh(lm, hp)
    em = ed.variant(emmet_preset())  # another preset, layers [1]: the same z layer
    memit = ed.edit([REQ], "memit")
    emmet = em.edit([REQ], "emmet")
    alpha = ed.edit([REQ], "alphaedit")
    assert len(z_runs) == 1  # one z for the three
    assert_same(memit, fresh(lm, hp).edit([REQ], "memit"))
    assert_same(emmet, fresh(lm, emmet_preset()).edit([REQ], "emmet"))
    assert_same(alpha, fresh(lm, hp).edit([REQ], "alphaedit"))
    assert len(z_runs) == 4  # each alone optimised its own


def test_another_z_setting_or_request_is_not_shared(lm, z_runs):
    hp = load_preset("tiny-gpt2-family")
    ed = fresh(lm, hp)
    ed.edit([REQ], "memit")
    ed.variant(hp.replace(name="other-lr", v_lr=hp.v_lr / 2)).edit([REQ], "emmet")
    ed.edit([EditRequest(REQ.prompt, REQ.subject, "Berlin", "Paris")], "emmet")
    ed.edit([REQ], "emmet", z_loop="reference")
    assert len(z_runs) == 4


def test_an_applied_edit_changes_z_and_undo_brings_the_kept_one_back(lm, z_runs):
    hp = load_preset("tiny-gpt2-family")
    ed = fresh(lm, hp)
    first = ed.edit([REQ], "memit")
    ed.apply_step(first)
    try:
        edited = ed.edit([REQ], "emmet")  # the weights changed: z optimised again
        assert len(z_runs) == 2
        # z on the same edited weights by an editor of its own, given ed's templates (it
        # would sample its own, and take C₀, on the edited model: z and the first R compared)
        other = fresh(lm, hp)
        use_templates(other, family_templates(ed))
        alone = other.edit([REQ], "emmet")
        assert torch.equal(edited.results[0]["z"], alone.results[0]["z"])
        assert torch.equal(edited.layers[0].V, alone.layers[0].V)  # before any write
        assert not torch.equal(edited.results[0]["z"], first.results[0]["z"])
    finally:
        ed.undo()
    n = len(z_runs)
    back = ed.edit([REQ], "emmet")  # the base weights again, bit for bit
    assert len(z_runs) == n
    assert torch.equal(back.results[0]["z"], first.results[0]["z"])


def test_app_compare_of_the_three_methods_optimises_z_once(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, z_runs: list[str]
) -> None:
    """The app's Compare (MethodCompare.compare, each method on an editor of its own preset,
    its update applied for a moment and undone to score it) computes z once."""
    from workbench.core.forms import EditForm
    from workbench.core.method_compare import MethodCompare
    from workbench.core.session import Session
    from workbench.store import Store

    monkeypatch.setenv("ROME_WORKBENCH_CACHE", str(tmp_path / "cache"))
    with Store.open(tmp_path / "s.db") as store:
        session = Session(store)
        session.load("tiny-gpt2", device="cpu")
        lm, _ = session.require()
        lm.hparams = load_preset("tiny-gpt2-family")
        form = EditForm(REQ.prompt, REQ.subject, REQ.target_new, REQ.true_object)
        rows = MethodCompare(session).compare(form, {}, ["memit", "emmet", "alphaedit"])
        assert [r.method for r in rows] == ["memit", "emmet", "alphaedit"]
        assert all(r.error is None for r in rows)
        assert len(z_runs) == 1
        session.finish()


def test_statistics_read_once_and_emmet_inverts_once_per_layer(
    lm: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """C₀ comes from disk once for an editor and its variants (the same statistics
    settings), and EMMET's (w·C₀)⁻¹ is made once per editor and layer, not per step."""
    import rome.caches
    import rome.methods.emmet

    hp = load_preset("tiny-gpt2-family")
    first = Editor(lm.model, lm.tokenizer, hp, cache_dir=tmp_path)
    first.stats(0), first.stats(1)  # collected and saved
    reads: list[Path] = []
    inverses: list[int] = []
    real_load, real_inv = rome.caches.cov.load_stats, rome.methods.emmet.emmet_c_inv
    monkeypatch.setattr(
        rome.caches.cov, "load_stats", lambda p, **k: reads.append(p) or real_load(p, **k)
    )
    monkeypatch.setattr(
        rome.methods.emmet,
        "emmet_c_inv",
        lambda c0, w, nu=0.0: inverses.append(1) or real_inv(c0, w, nu),
    )
    ed = Editor(lm.model, lm.tokenizer, hp, cache_dir=tmp_path)
    em = ed.variant(emmet_preset())
    ed.edit([REQ], "memit")
    em.edit([REQ], "emmet")
    em.edit([EditRequest(REQ.prompt, REQ.subject, "Berlin", "Paris")], "emmet")
    assert [p.name for p in reads] == [ed.stats_file(0).name, ed.stats_file(1).name]
    assert len(inverses) == 1  # layer 1, two steps
