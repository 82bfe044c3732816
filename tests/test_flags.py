"""The flags that call an edit disabling, each against a known answer: the replay's
update-norm, fluency and perplexity flags, ``--guard``, and the session's verdict."""

from __future__ import annotations

import dataclasses

import pytest

from evals.replay import (
    EditDone,
    ReplayConfig,
    fluency_flag,
    norm_flag,
    perplexity_flag,
    replay,
)
from rome import Editor, EditRequest, EditResult, load_model
from workbench.core.verdict import LOW_COS, MODE_NORM_FACTOR, judge
from workbench.store import Store

CFG = ReplayConfig()  # factor 4 over the running median after 3 edits; fluency 0.6; ppl 1.5


# --------------------------------------------------------------------------- update norm


def test_norm_flag_waits_for_enough_history():
    assert norm_flag(1000.0, [], CFG) is None
    assert norm_flag(1000.0, [1.0, 1.0], CFG) is None  # 2 < flag_min_history
    assert norm_flag(1000.0, [1.0, 1.0, 1.0], CFG) is not None


def test_norm_flag_is_strictly_over_factor_times_the_median():
    history = [1.0, 2.0, 3.0, 100.0]  # median 2.5: the outlier does not move it much
    assert norm_flag(10.0, history, CFG) is None  # exactly 4x
    reason = norm_flag(10.5, history, CFG)
    assert reason == "update norm 10.5 is 4.2x the running median 2.5"
    assert norm_flag(10.5, history, dataclasses.replace(CFG, flag_norm_factor=5.0)) is None


def test_norm_flag_ignores_a_zero_median():
    assert norm_flag(5.0, [0.0, 0.0, 0.0], CFG) is None


# --------------------------------------------------------------------------- checkpoints


def test_fluency_flag_under_a_share_of_the_start():
    assert fluency_flag(3.0, 5.0, CFG) is None  # exactly 0.6 x 5.0
    assert fluency_flag(2.5, 5.0, CFG) == "fluency entropy fell to 2.50 from 5.00 at the start"
    assert fluency_flag(4.0, 5.0, dataclasses.replace(CFG, flag_entropy_ratio=0.9)) is not None
    assert fluency_flag(0.0, None, CFG) is None  # no start measured
    assert fluency_flag(0.0, 0.0, CFG) is None


def test_perplexity_flag_over_a_multiple_of_the_start():
    assert perplexity_flag(30.0, 20.0, CFG) is None  # exactly 1.5 x 20
    assert (
        perplexity_flag(7110.0, 21.8, CFG)
        == "perplexity rose to 7110.0 from 21.8 at the start (over 1.5x)"
    )
    assert perplexity_flag(25.0, 20.0, dataclasses.replace(CFG, flag_ppl_ratio=1.2)) is not None
    assert perplexity_flag(1e9, None, CFG) is None


# --------------------------------------------------------------------------- --guard


def _edits(guard: bool, tmp_path) -> tuple[list[EditDone], Store, str]:
    """Three edits on tiny-gpt2 where every edit after the first is flagged (factor 0.01
    over the median of one applied edit)."""
    cfg = ReplayConfig(
        n_edits=3,
        glue_every=3,
        glue_tasks=("sst2",),
        glue_limit=4,
        fluency_tokens=8,
        perplexity=False,
        pre_metrics=False,
        rescore=False,
        guard=guard,
        flag_min_history=1,
        flag_norm_factor=0.01,
    )
    store = Store.open(tmp_path / f"guard-{guard}.db")
    events = list(replay(load_model("tiny-gpt2"), store, cfg))
    done = [e for e in events if isinstance(e, EditDone)]
    return done, store, store.list_runs()[0].id


def test_guard_refuses_flagged_edits_and_keeps_the_weights(tmp_path):
    done, store, run_id = _edits(True, tmp_path)
    assert [e.flagged for e in done] == [False, True, True]
    assert [e.refused for e in done] == [False, True, True]
    assert all("running median" in (e.flag_reason or "") for e in done[1:])
    edits = store.edits(run_id)
    assert [e.applied for e in edits] == [True, False, False]
    # a refused edit leaves the weights as they were after the last applied one
    assert edits[1].fingerprint == edits[2].fingerprint == edits[0].fingerprint
    assert done[2].w_delta_norm == pytest.approx(done[0].w_delta_norm)


def test_without_guard_the_same_flags_are_applied(tmp_path):
    done, store, run_id = _edits(False, tmp_path)
    assert [e.flagged for e in done] == [False, True, True]
    assert [e.refused for e in done] == [False, False, False]
    edits = store.edits(run_id)
    assert [e.applied for e in edits] == [True, True, True]
    assert len({e.fingerprint for e in edits}) == 3
    assert done[2].w_delta_norm > done[0].w_delta_norm


# --------------------------------------------------------------------------- the verdict


@pytest.fixture(scope="module")
def result() -> EditResult:
    """One real edit on tiny-gpt2; the cases below set the figures the verdict reads."""
    lm = load_model("tiny-gpt2")
    hp = lm.hparams.replace(v_num_grad_steps=2)
    ed = Editor(lm.model, lm.tokenizer, hp, templates=["{}"], cache_dir=None)
    res = ed.compute(EditRequest("The city of {}", "the Eiffel Tower", "Rome"), mode="rrome")
    return dataclasses.replace(res, weight_norm=100.0, update_norm=10.0, cos_kstar_ks=0.9)


def _as(res: EditResult, **changes: object) -> EditResult:
    return dataclasses.replace(res, **changes)  # type: ignore[arg-type]


def test_a_clean_edit_is_ok(result):
    verdict = judge(result)
    assert (verdict.level, verdict.disabling, verdict.reasons) == ("ok", False, ())


def test_an_update_the_engine_refused_is_refused(result):
    verdict = judge(_as(result, unsafe_reason="too large"))
    assert (verdict.level, verdict.disabling, verdict.reasons) == ("refused", True, ("too large",))


def test_update_norm_against_the_weight_norm(result):
    assert judge(_as(result, update_norm=49.0)).level == "ok"  # 0.49 x ||W||
    verdict = judge(_as(result, update_norm=50.0))  # 0.5 x ||W||: the default line
    assert verdict.disabling and verdict.reasons == ("‖ΔW‖ is 0.50× ‖W‖",)
    assert judge(_as(result, update_norm=50.0), disabling_ratio=0.6).level == "ok"


def test_update_norm_against_the_other_modes(result):
    prompt = _as(result, mode="prompt", update_norm=10.0)
    original = _as(result, mode="original", update_norm=MODE_NORM_FACTOR * 10.0)
    verdict = judge(original, others=[prompt, original])
    assert verdict.disabling and verdict.reasons[0] == "‖ΔW‖ is 4.0× prompt's"
    assert judge(_as(original, update_norm=39.0), others=[prompt]).level == "ok"
    assert judge(prompt, others=[prompt, original]).level == "ok"


def test_update_norm_against_the_sessions_median(result):
    history = [10.0, 10.0, 10.0]
    assert judge(_as(result, update_norm=40.0), history_norms=history).level == "ok"
    verdict = judge(_as(result, update_norm=41.0), history_norms=history)
    assert verdict.disabling and verdict.reasons == ("‖ΔW‖ is 4.1× this session's median",)
    assert judge(_as(result, update_norm=41.0), history_norms=history[:2]).level == "ok"


def test_low_cosine_warns_in_original_mode_and_adds_to_a_disabling_one(result):
    low = LOW_COS - 0.1
    assert judge(_as(result, mode="rrome", cos_kstar_ks=low)).level == "ok"
    warned = judge(_as(result, mode="original", cos_kstar_ks=low))
    assert warned.level == "warn" and not warned.disabling
    assert warned.reasons == ("cos(k*, k(s)) = 0.20 is low: small denominator",)
    bad = judge(_as(result, mode="original", cos_kstar_ks=low, update_norm=60.0))
    assert bad.level == "bad" and len(bad.reasons) == 2


def test_the_hamlet_case_from_the_design(result):
    """SmolLM2, "Hamlet" -> "Charles Dickens": original 254 = 1.48 ||W||, rrome 29, prompt 30."""
    w = 254 / 1.48
    modes = {
        m: _as(result, mode=m, update_norm=n, weight_norm=w, cos_kstar_ks=0.15)
        for m, n in (("original", 254.0), ("rrome", 29.0), ("prompt", 30.0))
    }
    verdicts = {m: judge(r, others=list(modes.values())) for m, r in modes.items()}
    assert verdicts["original"].disabling
    assert verdicts["original"].reasons[:2] == ("‖ΔW‖ is 1.48× ‖W‖", "‖ΔW‖ is 8.8× rrome's")
    assert not verdicts["rrome"].disabling and not verdicts["prompt"].disabling
