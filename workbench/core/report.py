"""A shareable page for one or more stored replay runs: the settings, the scores
under the three evaluation protocols, the retention curve, the collapse probes,
the flagged edits and the plot, as Markdown. The CLI's ``report`` writes it;
:func:`edit_facts` is also what the app shows for a selected flagged edit."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from datetime import UTC, datetime
from typing import Any

from evals.protocols import DESCRIPTIONS, PROTOCOLS, RETENTION, RETENTION_TASK
from evals.spec import RunSpec
from workbench.store import Edit, Run, Store

from .forms import has_key_modes
from .report_stats import glue_change_section, groups_section, needed_section, paired_section
from .run_stats import RunStats, count_rate, run_stats
from .summary import (
    SCORE_KEYS,
    checkpoint_rows,
    edit_rows,
    figure_rows,
    fmt,
    layer_rows,
    protocol_scores,
    retention_curve,
)


def _num(x: Any, digits: int = 3) -> str:
    if isinstance(x, bool) or not isinstance(x, (int, float)):
        return "-"
    if abs(x) >= 100:
        return f"{x:.1f}"
    return f"{x:.{digits}f}".rstrip("0").rstrip(".")


def request_text(e: Edit) -> str:
    """``"Crossfire premiered on" → CBS (was NBC)``: the edit's request in one line."""
    req = e.request
    prompt = str(req.get("prompt", "")).replace("{}", str(req.get("subject", "")))
    true = req.get("target_true")
    return f'"{prompt}" → {req.get("target_new", "")}' + (f" (was {true})" if true else "")


def _scores(m: dict[str, Any]) -> str:
    return " · ".join(f"{k.upper()} {_num(m.get(k), 2)}" for k in ("es", "ps", "ns"))


def edit_facts(e: Edit) -> list[tuple[str, str]]:
    """An edit's record as ``(label, value)`` rows: the request; for ROME its key mode,
    cos(k*, k(s)), the denominator and ‖ΔW‖, for a batch method its layers and its step's
    ‖ΔW‖ in all and per layer; the flag's reason, and its metrics before and right after."""
    rows = [
        ("edit", f"{e.seq} (case {e.case_id if e.case_id is not None else '-'})"),
        ("request", request_text(e)),
    ]
    norm = f"{_num(e.update_norm)} ({_num(e.update_norm_ratio)}×‖W‖)"
    if has_key_modes(e.method_name):
        rows += [
            ("update", f"{e.mode} · layer {e.layer}"),
            ("cos(k*, k(s))", _num(e.cos_kstar_ks)),
            ("denominator", _num(e.denominator)),
            ("‖ΔW‖", norm),
        ]
    else:  # a batch method: the edit is one request of a step; the norms are the step's
        layer_norms = (e.record or {}).get("layer_norms")
        layers = list(layer_norms) if isinstance(layer_norms, dict) else [str(e.layer)]
        where = f"layer{'s' if len(layers) > 1 else ''} {', '.join(layers)}"
        rows.append(("update", f"{e.method_name} · {where} · the step from edit {e.step_index}"))
        rows.append(("‖ΔW‖", f"{norm}, the whole step"))
        if isinstance(layer_norms, dict):
            per = ", ".join(f"{k}: {_num(v)}" for k, v in layer_norms.items())
            rows.append(("‖ΔW_l‖ per layer", per))
    if e.flag_reason:
        rows.append(("flag", e.flag_reason))
    if e.refused:
        rows.append(("refused", "yes: not applied"))
    m = e.metrics or {}
    pre = m.get("pre")
    if isinstance(pre, dict):
        rows.append(("pre (just before)", _scores(pre)))
    if any(k in m for k in ("es", "ps", "ns")):
        rows.append(("post (immediate)", _scores(m)))
    if "w_delta_norm" in m:
        rows.append(
            (
                "weights after",
                f"‖W−W₀‖ {_num(m['w_delta_norm'])} · ‖W‖/‖W₀‖ {_num(m.get('w_norm_ratio'))}",
            )
        )
    return rows


def _settings(run: Run) -> str:
    spec = RunSpec.of(run)
    cfg, hp, method = spec.stored_replay, spec.hparams, spec.method
    if has_key_modes(method):
        layer = spec.layer()
        where = [f"key mode {run.mode}", f"layer {'-' if layer is None else layer}"]
    else:  # the family edits its preset's layer range; ROME's key mode is not its
        layers = ", ".join(map(str, spec.edited_layers()))
        where = [f"preset {spec.preset_name or '-'}", f"layers {layers}"]
    parts = [
        f"dataset {cfg.get('dataset', run.data_source)}" + _order(cfg),
        f"method {method}",
        *where,
        f"batch size {cfg.get('batch_size', 1)}",
        f"GLUE every {cfg.get('glue_every', run.glue_every)} edits, "
        f"{cfg.get('glue_limit', run.glue_limit) or 'all'} examples of "
        f"{', '.join(cfg.get('glue_tasks', run.glue_tasks) or [])}, "
        f"{cfg.get('glue_scoring', 'logprob')} scoring, "
        f"calibration {cfg.get('glue_calibration', 'none')}",
        f"retention size {cfg['retention_size']}" if "retention_size" in cfg else "no retention",
        f"v* stop {hp.get('v_stop', 'loss')}",
        f"norm anchor {'on' if hp.get('v_norm_anchor') else 'off'}",
        f"guard {'on' if run.guard else 'off'}",
    ]
    return "; ".join(parts)


def _order(cfg: dict[str, Any]) -> str:
    seed = cfg.get("order_seed")
    return "" if seed is None else f" in the order of seed {seed}"


def _table(head: Sequence[str], rows: Sequence[Sequence[str]]) -> list[str]:
    def cell(x: str) -> str:
        return str(x).replace("|", "\\|").replace("\n", " ")

    out = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    out += ["| " + " | ".join(cell(c) for c in row) + " |" for row in rows]
    return out


def report_markdown(
    store: Store,
    run_ids: Sequence[str],
    plot_file: str | None,
    command: str = "",
    groups: Mapping[str, Sequence[str]] | None = None,
) -> str:
    """The Markdown page for ``run_ids`` (the plot, when given, is linked as ``plot_file``);
    ``groups`` (name -> run ids that differ only by order) adds their mean ± spread."""
    runs = [store.get_run(r) for r in run_ids]
    stats = {r.id: run_stats(store, r.id) for r in runs}
    lines = _head(store, runs, command)
    scores, missing_retention, retention_pending = _scores_section(store, runs, stats)
    lines += scores
    lines += _zsre_section(store, runs, stats)
    lines += _retention_notes(missing_retention, retention_pending)
    lines += needed_section(runs, stats)
    lines += _retention_section(store, runs)
    lines += glue_change_section(store, runs)
    lines += paired_section(store, runs)
    lines += groups_section(store, groups or {})
    lines += _run_figures_section(store, runs)
    lines += _layers_section(store, runs)
    lines += _flagged_section(store, runs)
    if plot_file:
        lines += _plot_section(store, runs, plot_file, retention=len(missing_retention) < len(runs))
    return "\n".join(lines) + "\n"


def _head(store: Store, runs: Sequence[Run], command: str) -> list[str]:
    """The title, where the runs come from, and the table of the runs' settings."""
    models = sorted({r.model for r in runs})
    when = datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC")
    lines = [
        f"# Replay report: {', '.join(r.label for r in runs)}",
        "",
        f"{len(runs)} run(s) of {', '.join(models)} from `{store.path}`, written {when}"
        + (f" by `{command}`." if command else "."),
        "",
        "## Runs",
        "",
    ]
    return lines + _table(
        ("run", "status", "edits", "created", "settings"),
        [
            (
                r.label,
                r.status,
                f"{r.n_edits}/{r.n_edits_planned or '-'}",
                r.created_at[:16],
                _settings(r),
            )
            for r in runs
        ],
    )


def _scores_section(
    store: Store, runs: Sequence[Run], stats: Mapping[str, RunStats]
) -> tuple[list[str], list[str], list[str]]:
    """The scores under the three protocols, with the runs whose retention rows are empty:
    (lines, runs that stored no retention passes, runs whose first pass is still to come)."""
    lines = ["", "## Scores under the three protocols", ""]
    lines += [f"- **{p}**: {DESCRIPTIONS[p]}." for p in PROTOCOLS]
    lines += [
        "",
        "An edit *holds* when its edit prompt still prefers the new object (ES = 1). "
        "S is the harmonic mean of ES, PS and NS. In brackets: the 95 % interval (exact "
        "binomial for ES and holds, a bootstrap over records, 10,000 resamples, for PS, NS "
        "and S; none where only a mean was stored).",
        "",
    ]
    rows: list[list[str]] = []
    missing_retention: list[str] = []
    retention_pending: list[str] = []
    for r in runs:
        for p in protocol_scores(store, r.id, stats=stats[r.id]):
            if p.protocol == RETENTION and not p.recorded:
                if RunSpec.of(r).stored_replay.get("retention_size"):
                    retention_pending.append(r.id)
                else:
                    missing_retention.append(r.id)
            hold = p.with_interval("hold") if p.hold is not None else "-"
            cells = [p.with_interval(k) if p.recorded else fmt(None) for k in SCORE_KEYS]
            rows.append([r.label, p.protocol, *cells, hold, p.note])
    lines += _table(("run", "protocol", "ES", "PS", "NS", "S", "hold", "what was scored"), rows)
    return lines, missing_retention, retention_pending


def _retention_notes(missing_retention: list[str], retention_pending: list[str]) -> list[str]:
    """Why a run's retention rows are empty: no passes stored, or none yet."""
    lines: list[str] = []
    if missing_retention:
        lines += [
            "",
            f"Run(s) {', '.join(missing_retention)} stored no retention passes (they were "
            "made before the workbench recorded the retention protocol, or with a retention "
            "size of 0): their retention rows are left empty, not estimated. A resumed or "
            "extended run records them from its next checkpoint on.",
        ]
    if retention_pending:
        lines += [
            "",
            f"Run(s) {', '.join(retention_pending)} record retention but have no checkpoint "
            "after the start yet (there is no retention pass at step 0).",
        ]
    return lines


def _run_figures_section(store: Store, runs: Sequence[Run]) -> list[str]:
    """One column per run: its edit, stored and checkpoint figures (``-`` where it has none)."""
    per_run = {
        r.id: dict(
            edit_rows(store, r.id)
            + figure_rows(_figures(store, r.id))
            + checkpoint_rows(store, r.id)
        )
        for r in runs
    }
    labels: list[str] = []
    for figs in per_run.values():
        labels += [k for k in figs if k not in labels]
    return ["", "## Run figures", ""] + _table(
        ("figure", *(r.label for r in runs)),
        [[k, *(per_run[r.id].get(k, "-") for r in runs)] for k in labels],
    )


def _plot_section(store: Store, runs: Sequence[Run], plot_file: str, retention: bool) -> list[str]:
    """The plot's link and what its panels show (``retention``: some run has the curve)."""
    return [
        "",
        "## Plot",
        "",
        f"![{', '.join(r.id for r in runs)}]({plot_file})",
        "",
        "GLUE accuracy per task, update norm per step (one edit, or one batch of a batch "
        "method; flagged edits marked with a red x), "
        "cumulative change and norm growth of the edited matrix, held-out perplexity, "
        "fluency"
        + (", the retention curve" if retention else "")
        + ", against the number of edits applied"
        + (
            "; and, for runs that finished, the end-of-stream re-scoring by position in "
            "the stream (the fraction of each block of edits still holding at the end)."
            if any(store.rescores(r.id) for r in runs)
            else "."
        ),
    ]


def _figures(store: Store, run_id: str) -> dict[str, Any]:
    from evals.figures import stored_figures

    return stored_figures(store, run_id)


def _zsre_section(store: Store, runs: Sequence[Run], stats: Mapping[str, RunStats]) -> list[str]:
    """For zsRE runs: what their ES / PS / NS are, and the teacher-forced figures."""
    from .summary import zsre_rows

    found = [(r, zsre_rows(_figures(store, r.id), stats.get(r.id))) for r in runs]
    found = [(r, rows) for r, rows in found if rows]
    if not found:
        return []
    lines = [
        "",
        "zsRE runs score each target token, not a comparison with a true object (zsRE "
        "has none): an edit *holds* when every token of its answer is the model's top-1 "
        "after the edit prompt and the answer's tokens before it (ES = 1).",
        "",
    ]
    for r, rows in found:
        lines += [f"- **{r.label}**: " + "; ".join(f"{k}: {v}" for k, v in rows)]
    return lines


def _retention_section(store: Store, runs: Sequence[Run]) -> list[str]:
    curves = {r.id: retention_curve(store.checkpoints(r.id, task=RETENTION_TASK)) for r in runs}
    if not any(curves.values()):
        return []
    lines = ["", "### Retention curve", ""]
    steps = sorted({p.step for c in curves.values() for p in c})
    head = ["edits applied", *(r.label for r in runs)]
    rows = []
    for step in steps:
        row = [str(step)]
        for r in runs:
            p = next((p for p in curves[r.id] if p.step == step), None)
            row.append(count_rate(p.n_hold, p.m).text(2) if p is not None and p.m else "-")
        rows.append(row)
    lines += _table(head, rows)
    lines += ["", "Held of the first M, with its exact 95 % interval."]
    return lines


def _layers_section(store: Store, runs: Sequence[Run]) -> list[str]:
    rows = [[r.label, *row] for r in runs for row in layer_rows(store.edits(r.id), r.glue_every)]
    if not rows:
        return []
    lines = ["", "### Per edited layer", ""]
    lines += _table(
        (
            "run",
            "layer",
            "steps",
            "median ‖ΔW_l‖",
            "max ‖ΔW_l‖",
            "‖W_l − W_l0‖",
            "‖W_l‖ / ‖W_l0‖",
            "‖W_l‖ / ‖W_l0‖ as edits went on",
        ),
        rows,
    )
    lines += [
        "",
        "‖ΔW_l‖: the layer's update in one step (one edit, or one batch); the drift "
        "after the last stored edit, and after every checkpoint interval.",
    ]
    return lines


def _flagged_section(store: Store, runs: Sequence[Run]) -> list[str]:
    lines = ["", "## Flagged edits", ""]
    for r in runs:
        flagged = [e for e in store.edits(r.id) if e.flagged]
        lines.append(f"### {r.label}: {len(flagged)} flagged")
        lines.append("")
        if not flagged:
            lines.append("No edit was flagged.")
            lines.append("")
            continue
        lines += _table(
            (
                "edit",
                "case",
                "request",
                "cos(k*, k(s))",
                "denominator",
                "‖ΔW‖",
                "pre ES/PS/NS",
                "post ES/PS/NS",
                "reason",
            ),
            [
                [
                    str(e.seq),
                    str(e.case_id if e.case_id is not None else "-"),
                    request_text(e),
                    _num(e.cos_kstar_ks, 2),
                    _num(e.denominator),
                    _num(e.update_norm),
                    _scores((e.metrics or {}).get("pre") or {}).replace(" · ", " "),
                    _scores(e.metrics or {}).replace(" · ", " "),
                    ("refused; " if e.refused else "") + (e.flag_reason or ""),
                ]
                for e in flagged
            ],
        )
        lines.append("")
    return lines
