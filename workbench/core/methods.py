"""Editing methods side by side on the same request(s): what ``edit --method`` shows.

Each method computes its update on the same unchanged model; the update is
applied, the requests are scored on the bare prompt, and it is undone (bit for
bit). ROME edits one request at a time: on several requests its updates are
applied one after another, then all undone. The verdict uses the thresholds of
a single edit's (:mod:`workbench.core.verdict`): the update norm against the
weight's, and against the smallest of the methods compared.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from evals.zsre import is_zsre_row, parse_zsre
from rome import BadRequestError, Editor, EditRequest, LoadedModel, RomeError
from rome.hparams import method_preset
from rome.methods import METHODS, Update, get_method, method_names, options_of
from rome.methods.base import parse_pairs
from rome.scoring import score_targets

from .verdict import DISABLING_FRACTION, Figures, Held, judge

#: the ``--method`` value that asks for every method
ALL_METHODS = "all"


def methods_for(name: str) -> list[str]:
    """The methods a ``--method`` value names (``all``: every registered one, in the
    registry's order)."""
    if name == ALL_METHODS:
        return method_names()
    if name not in METHODS:
        raise BadRequestError(
            f"unknown method {name!r}: use one of {', '.join(sorted(METHODS))}, "
            f"or {ALL_METHODS} (side by side)"
        )
    get_method(name)
    return [name]


def describe_methods() -> list[dict[str, Any]]:
    """Every registered method as data: its summary, capabilities and options."""
    out = []
    for name in method_names():
        m = get_method(name)
        caps = m.capabilities
        out.append(
            {
                "name": name,
                "summary": m.summary,
                "batched": caps.batched,
                "key_modes": list(caps.key_modes),
                "needs_c0": caps.needs_c0,
                "templates": caps.templates,
                "options": [
                    {"name": o.name, "type": o.type.__name__, "default": o.default, "help": o.help}
                    for o in options_of(m.Settings)
                ],
            }
        )
    return out


def parse_options(method: str, pairs: Sequence[str]) -> dict[str, Any]:
    """``--opt KEY=VALUE`` texts as ``method``'s settings (one error naming a bad one)."""
    if not pairs:
        return {}
    if method == ALL_METHODS:
        raise BadRequestError("--opt sets one method's settings: give --method NAME, not all")
    return parse_pairs(get_method(method), pairs)


def edit_is_side_by_side(method: str, batch: bool, options: dict[str, Any]) -> bool:
    """Whether ``edit`` shows the methods' table (``--method all``, a method without key
    modes, ``--batch`` or settings) rather than one ROME-style edit in its key mode(s)."""
    if method == ALL_METHODS or batch or options:
        return True
    return not get_method(method).capabilities.key_modes


@dataclass
class MethodOutcome:
    """One method's update on the requests, and p(target) before and with it."""

    method: str
    label: str = ""  # the row's name: the method, or ``rome/<mode>`` for a ROME key mode
    preset: str = ""  # the settings it edited with (``method_preset``)
    layer_norms: dict[int, float] = field(default_factory=dict)
    norm: float = 0.0
    ratio: float = 0.0  # ‖ΔW‖ / ‖W‖ over the edited layers
    p_new_before: list[float] = field(default_factory=list)
    p_new_after: list[float] = field(default_factory=list)
    p_true_before: list[float | None] = field(default_factory=list)
    p_true_after: list[float | None] = field(default_factory=list)
    error: str | None = None
    verdict: str = ""
    reasons: list[str] = field(default_factory=list)
    updates: list[Update] = field(default_factory=list, repr=False)

    def __post_init__(self) -> None:
        self.label = self.label or self.method

    @property
    def efficacy(self) -> float:
        """The fraction of requests whose target_new beats target_true (or gained) after."""
        wins = [
            (a > t) if t is not None else (a > b)
            for a, b, t in zip(self.p_new_after, self.p_new_before, self.p_true_after, strict=True)
        ]
        return sum(wins) / len(wins) if wins else math.nan

    @property
    def took(self) -> float:
        """The fraction of requests the update moved: target_new wins after (as in
        :attr:`efficacy`) and p(new) at least doubled, or closed half its gap to 1.

        A request whose target_new already won before wins after whatever the update
        does; only a rise says the edit took.
        """
        moved = [
            a > (t if t is not None else b) and a >= min(2 * b, (1 + b) / 2)
            for a, b, t in zip(self.p_new_after, self.p_new_before, self.p_true_after, strict=True)
        ]
        return sum(moved) / len(moved) if moved else math.nan

    @property
    def efficacy_before(self) -> float:
        """The same fraction on the unedited model (a request without target_true: 0)."""
        wins = [
            t is not None and b > t
            for b, t in zip(self.p_new_before, self.p_true_before, strict=True)
        ]
        return sum(wins) / len(wins) if wins else math.nan

    def to_dict(self) -> dict[str, Any]:
        return {
            "method": self.method,
            "label": self.label,
            "preset": self.preset,
            "layer_norms": {str(k): v for k, v in self.layer_norms.items()},
            "update_norm": self.norm,
            "update_norm_ratio": self.ratio,
            "p_new_before": self.p_new_before,
            "p_new_after": self.p_new_after,
            "p_true_before": self.p_true_before,
            "p_true_after": self.p_true_after,
            "efficacy_before": self.efficacy_before,
            "efficacy": self.efficacy,
            "verdict": self.verdict,
            "reasons": self.reasons,
            "error": self.error,
            "records": [r for u in self.updates for r in u.records],
        }


def load_batch(path: Path) -> list[EditRequest]:
    """Requests from a JSON list (or JSON lines) of {prompt, subject, target_new[, target_true]}
    objects, or of MEND-format zsRE records; a malformed record is one clear error naming it."""
    try:
        text = path.read_text()
    except (OSError, UnicodeDecodeError) as exc:
        raise BadRequestError(f"cannot read the batch file {path}: {exc}") from exc
    try:
        items = json.loads(text)
    except json.JSONDecodeError:
        try:
            items = [json.loads(line) for line in text.splitlines() if line.strip()]
        except json.JSONDecodeError as exc:
            raise BadRequestError(f"{path} is neither JSON nor JSON lines: {exc}") from exc
    if isinstance(items, dict):
        items = [items]
    if not isinstance(items, list) or not items:
        raise BadRequestError(f"{path} holds no requests: give a JSON list of objects")
    if is_zsre_row(items[0]):
        return _zsre_requests(path, items)
    out = []
    for n, item in enumerate(items, start=1):
        which = f"record {n} of {len(items)}"
        if not isinstance(item, dict):
            raise BadRequestError(f"{path}: {which} is not an object")
        try:
            req = EditRequest(
                prompt=str(item["prompt"]),
                subject=str(item["subject"]),
                target_new=str(item["target_new"]),
                target_true=None if item.get("target_true") is None else str(item["target_true"]),
            )
            out.append(req.validate())
        except KeyError as exc:
            raise BadRequestError(f"{path}: {which} has no {exc.args[0]!r}") from exc
        except RomeError as exc:
            raise BadRequestError(f"{path}: {which}: {exc}") from exc
    return out


def batch_conflicts(reqs: Sequence[EditRequest]) -> list[str]:
    """A note for each subject and prompt a batch asks for more than one target of: the
    methods are given both, and cannot make both hold."""
    targets: dict[tuple[str, str], list[tuple[int, str]]] = {}
    for n, r in enumerate(reqs, start=1):
        targets.setdefault((r.subject, r.prompt), []).append((n, r.target_new))
    notes = []
    for (subject, prompt), asked in targets.items():
        if len({t for _, t in asked}) > 1:
            which = ", ".join(f"record {n} -> {t!r}" for n, t in asked)
            notes.append(
                f"{subject!r} in {prompt!r} is asked for different targets ({which}): "
                "both are edited in, and at most one can hold"
            )
    return notes


def _zsre_requests(path: Path, items: list[Any]) -> list[EditRequest]:
    """A MEND-format zsRE file's records as the published code makes them requests
    (``evals.zsre``: target_true the end-of-text marker); a bad one is one error."""
    out = []
    for n, item in enumerate(items):
        try:
            out.append(parse_zsre(item, n).to_request().validate())
        except (ValueError, RomeError) as exc:
            raise BadRequestError(f"{path}: zsRE record {n}: {exc}") from exc
    return out


def _probe(lm: LoadedModel, reqs: Sequence[EditRequest]) -> tuple[list[float], list[float | None]]:
    prompts = [r.text for r in reqs]
    new = [
        s.prob for s in score_targets(lm.model, lm.tokenizer, prompts, [r.target_new for r in reqs])
    ]
    with_true = [i for i, r in enumerate(reqs) if r.true_object is not None]
    true: list[float | None] = [None] * len(reqs)
    if with_true:
        scores = score_targets(
            lm.model,
            lm.tokenizer,
            [prompts[i] for i in with_true],
            [str(reqs[i].true_object) for i in with_true],
        )
        for i, s in zip(with_true, scores, strict=True):
            true[i] = s.prob
    return new, true


def editable_methods(
    editor: Editor, names: Sequence[str]
) -> tuple[list[str], list[tuple[str, str]]]:
    """``names`` split into the methods that can edit ``editor``'s model (each with its
    shipped variant's settings) and, for the others, why not (UltraEdit on GPT-2)."""
    kept: list[str] = []
    left: list[tuple[str, str]] = []
    for name in names:
        m = get_method(name)
        hp = method_preset(editor.hp, name)
        ed = editor if hp == editor.hp else editor.variant(hp)
        why = m.cannot_edit(ed.context(m), m.settings(hp))
        if why is None:
            kept.append(name)
        else:
            left.append((name, why))
    return kept, left


def run_method(
    lm: LoadedModel,
    editor: Editor,
    reqs: Sequence[EditRequest],
    method: str,
    mode: str | None,
    label: str = "",
    options: dict[str, Any] | None = None,
    restore: bool = True,
) -> MethodOutcome:
    """One method's update on ``reqs``, applied for a moment to score them, then undone
    (not when ``restore`` is false: a caller about to drop the model saves the writes).

    ``editor`` edits with the method's own settings when its preset is already the
    method's (``method_preset``); otherwise an editor with the shipped variant is made.
    """
    hp = method_preset(editor.hp, method)
    if hp != editor.hp:  # the method's own settings on this model (its shipped variant):
        editor = editor.variant(hp)  # the same model and edits, caches of its own
    out = MethodOutcome(method, label=label, preset=hp.name)
    out.p_new_before, out.p_true_before = _probe(lm, reqs)
    m = get_method(method)
    groups = [[r] for r in reqs] if not m.capabilities.batched else [list(reqs)]
    applied = 0
    opts: dict[str, Any] = {"mode": mode} if mode and m.capabilities.key_modes else {}
    opts.update(options or {})
    try:
        for group in groups:
            upd = editor.edit(group, method, **opts)
            out.updates.append(upd)
            reason = upd.unsafe_reason or editor.update_unsafe_reason(upd)
            if reason:
                out.error = f"not applied: {reason}"
                break
            editor.apply_step(upd, force=True)
            applied += 1
        out.p_new_after, out.p_true_after = _probe(lm, reqs)
        weights = {
            lu.layer: editor.weight_norm(lu)  # the weight(s) it writes
            for u in out.updates
            for lu in u.layers
        }
    finally:
        for _ in range(applied if restore or out.error else 0):
            editor.undo()  # the weights and the carried state as they were
    for u in out.updates:
        for layer, n in u.layer_norms().items():
            out.layer_norms[layer] = math.sqrt(out.layer_norms.get(layer, 0.0) ** 2 + n**2)
    out.norm = math.sqrt(sum(n**2 for n in out.layer_norms.values()))
    w = math.sqrt(sum(v**2 for v in weights.values()))
    out.ratio = out.norm / w if w else math.inf
    return out


def compare_methods(
    lm: LoadedModel,
    editor: Editor,
    reqs: Sequence[EditRequest],
    methods: Sequence[str],
    mode: str | None = None,
    options: dict[str, Any] | None = None,
    restore: bool = True,
) -> list[MethodOutcome]:
    """Each method's update on ``reqs``, with a verdict (``options``: settings of the
    one method compared). The model is unchanged afterwards, but when ``restore`` is
    false the last method's update stays (a caller about to drop the model)."""
    outs = [
        run_method(
            lm, editor, reqs, m, mode, options=options, restore=restore or i < len(methods) - 1
        )
        for i, m in enumerate(methods)
    ]
    return judge_outcomes(outs, editor.hp.max_update_ratio)


def judge_outcomes(outs: list[MethodOutcome], max_update_ratio: float) -> list[MethodOutcome]:
    """Set each outcome's verdict (in place), by :func:`~.verdict.judge` with the row's
    figures and the smallest update among the rows whose edit holds (every request won
    after and its p(new) rose: :attr:`MethodOutcome.took`)."""
    held = [o for o in outs if o.norm > 0 and o.error is None and o.took >= 1.0]
    ref = min(held, key=lambda o: o.norm) if len(outs) > 1 and held else None
    for o in outs:
        figures = Figures(o.label, o.norm, o.ratio, unsafe_reason=o.error)
        yardstick = (ref.label, ref.norm) if ref is not None and ref is not o else None
        v = judge(
            figures,
            disabling_ratio=DISABLING_FRACTION * max_update_ratio,
            held=Held(yardstick, o.efficacy, o.took),
        )
        o.verdict, o.reasons = v.label, list(v.reasons)
    return outs
