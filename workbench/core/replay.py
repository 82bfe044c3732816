"""A replay as both faces run it: one validation of its settings, and one driver
of ``evals.replay.replay``'s events (dispatched on their types).

The rules of :func:`config_errors` (the only place a replay's settings are
checked before a run is created):

- ``dataset``: ``"sample"`` or ``"val"`` (bundled CounterFact), ``"zsre"`` (bundled
  zsRE), ``"hub"`` (online) or an existing file that is CounterFact (either format)
  or MEND-format zsRE (kept as an absolute path, so a resume from another folder
  finds it);
- ``order_seed``: empty (file order) or a whole number, at least 0;
- ``n_edits`` and ``glue_every``: whole numbers, at least 1;
- ``glue_limit``: a whole number, at least 0; **0 means every example** of
  each task (stored as ``None``), as does an empty value;
- ``glue_tasks``: at least one, each one of ``evals.glue.TASKS`` (a sequence,
  or a comma-separated string);
- ``glue_scoring``: one of ``evals.glue.SCORINGS``; ``glue_calibration``: one
  of ``evals.glue.CALIBRATIONS``, ``contextual`` only with ``logprob``; ``mode``: one of
  ``rome.MODES``; ``glue_dir``: ``"hub"`` or a folder holding each task's
  ``<task>.jsonl``; ``layer``: empty or a whole number, at least 0;
- ``method``: one of :data:`REPLAY_METHODS`; ``batch_size``: a whole number,
  at least 1; ``retention_size``: a whole number, at least 0 (0: no retention
  passes).

:func:`form_defaults` is where both faces take their defaults from (the CLI's
options and the app's Replay pane show the same values).

Any other field of :class:`evals.replay.ReplayConfig` is passed through as
given; a name that is not a field is refused.
"""

from __future__ import annotations

import dataclasses
import logging
import threading
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from evals.datasets import check_source, is_named
from evals.glue import CALIBRATIONS, SCORINGS, TASKS
from evals.replay import (
    CheckpointDone,
    EditDone,
    ReplayConfig,
    ReplayEvent,
    ReplayFinished,
    ReplayStarted,
    ReplayWarning,
    replay,
)
from evals.sink import ReplaySink
from evals.spec import RunSpec
from rome import MODES, BadRequestError, EditHparams, Editor, LoadedModel
from rome.hparams import method_preset
from rome.methods import get_method, method_names

if TYPE_CHECKING:
    from workbench.store import Store

log = logging.getLogger(__name__)

#: settings a user names in words, and the field each one is
FIELD_LABELS = {
    "dataset": "dataset",
    "order_seed": "order seed",
    "n_edits": "edits",
    "glue_every": "GLUE interval",
    "glue_limit": "GLUE limit",
    "glue_tasks": "GLUE tasks",
    "glue_scoring": "GLUE scoring",
    "glue_dir": "GLUE folder",
    "glue_calibration": "GLUE calibration",
    "mode": "key mode",
    "layer": "layer",
    "method": "method",
    "batch_size": "batch size",
    "method_options": "method settings",
    "retention_size": "retention size",
}

#: the editing methods a replay offers: the registry's, in its order
REPLAY_METHODS = tuple(method_names())
#: the v* stopping rules (rome.hparams.V_STOPS) and the norm anchor, as a replay sets them
V_STOPS = ("loss", "most_probable")


class ReplayConfigError(BadRequestError):
    """Replay settings that do not pass :func:`config_errors`; ``fields`` says which."""

    def __init__(self, fields: Mapping[str, str]) -> None:
        self.fields = dict(fields)
        parts = [f"{FIELD_LABELS.get(k, k)} {msg}" for k, msg in self.fields.items()]
        super().__init__("replay settings: " + "; ".join(parts))


def config_fields() -> tuple[str, ...]:
    """The names of :class:`ReplayConfig`'s fields, as they are in evals today."""
    return tuple(f.name for f in dataclasses.fields(ReplayConfig))


def form_defaults() -> dict[str, Any]:
    """Every replay setting's default, as :class:`ReplayConfig` has it (the one place the
    CLI's option defaults and the app's form values are checked against)."""
    return ReplayConfig().to_dict()


def _whole(value: Any, low: int) -> tuple[int | None, str | None]:
    """``value`` as an int ≥ ``low`` (text accepted), or the reason it is not."""
    if isinstance(value, bool):
        return None, "must be a whole number"
    try:
        n = int(str(value).strip()) if not isinstance(value, int) else value
    except ValueError:
        return None, "must be a whole number"
    if n < low:
        return None, f"must be at least {low}"
    return n, None


def parse_tasks(value: Any) -> tuple[str, ...]:
    """GLUE task names from a sequence or a comma-separated string (blanks dropped)."""
    items = value.split(",") if isinstance(value, str) else list(value or ())
    return tuple(str(t).strip() for t in items if str(t).strip())


def _named_dataset(data: str) -> bool:
    return is_named(data)


def _dataset_error(value: Any) -> str | None:
    data = str(value if value is not None else "").strip()
    if not data:
        return "is empty: 'sample' or 'zsre' (bundled), or a CounterFact or zsRE JSON file"
    return check_source(data)


def _glue_dir_error(value: Any, tasks: tuple[str, ...]) -> str | None:
    if value in (None, "", "hub"):
        return None
    folder = Path(str(value)).expanduser()
    if not folder.is_dir():
        return f"{folder} is not a folder"
    missing = [t for t in tasks if not (folder / f"{t}.jsonl").is_file()]
    if missing:
        return f"{folder} has no {', '.join(t + '.jsonl' for t in missing)}"
    return None


def _check_numbers(values: Mapping[str, Any], errors: dict[str, str]) -> None:
    for key, low in (("n_edits", 1), ("glue_every", 1), ("batch_size", 1), ("retention_size", 0)):
        if key in values:
            _, why = _whole(values[key], low)
            if why:
                errors[key] = why
    limit = values.get("glue_limit")
    if limit not in (None, ""):
        _, why = _whole(limit, 0)
        if why:
            errors["glue_limit"] = why + " (0: every example)"
    layer = values.get("layer")
    if layer not in (None, ""):
        _, why = _whole(layer, 0)
        if why:
            errors["layer"] = why + " (empty: the preset's layer)"
    seed = values.get("order_seed")
    if seed not in (None, ""):
        _, why = _whole(seed, 0)
        if why:
            errors["order_seed"] = why + " (empty: the file's order)"


def _check_method(values: Mapping[str, Any], errors: dict[str, str]) -> None:
    from rome.methods import METHODS

    method = values.get("method", "rome")
    if method not in METHODS:
        errors["method"] = f"must be one of {', '.join(sorted(METHODS))}"
        return
    if "batch_size" in values:
        n, why = _whole(values["batch_size"], 1)
        if why:
            errors["batch_size"] = why
        elif n != 1 and not METHODS[method].capabilities.batched:
            errors["batch_size"] = f"must be 1 for {method} (it edits one request at a time)"
    if values.get("method_options"):
        from rome.methods.base import check_overrides

        try:
            check_overrides(METHODS[method], values["method_options"])
        except BadRequestError as exc:
            errors["method_options"] = str(exc)


def _check_choices(values: Mapping[str, Any], errors: dict[str, str]) -> None:
    _check_method(values, errors)
    if "mode" in values and values["mode"] not in MODES:
        errors["mode"] = f"must be one of {', '.join(MODES)}"
    if "glue_scoring" in values and values["glue_scoring"] not in SCORINGS:
        errors["glue_scoring"] = f"must be one of {', '.join(SCORINGS)}"
    calibration = values.get("glue_calibration", "none")
    if calibration not in CALIBRATIONS:
        errors["glue_calibration"] = f"must be one of {', '.join(CALIBRATIONS)}"
    elif calibration != "none" and values.get("glue_scoring", "logprob") != "logprob":
        errors["glue_calibration"] = f"{calibration} needs logprob scoring"
    if "glue_tasks" in values:
        tasks = parse_tasks(values["glue_tasks"])
        unknown = [t for t in tasks if t not in TASKS]
        if unknown:
            errors["glue_tasks"] = (
                f"has unknown task(s) {', '.join(unknown)}: choose from {', '.join(TASKS)}"
            )
        elif not tasks:
            errors["glue_tasks"] = f"is empty: choose at least one of {', '.join(TASKS)}"
        else:
            why = _glue_dir_error(values.get("glue_dir"), tasks)
            if why:
                errors["glue_dir"] = why


def config_errors(values: Mapping[str, Any]) -> dict[str, str]:
    """Per-field problems of replay settings (empty: valid). See the module's rules.

    ``values`` maps :class:`ReplayConfig` field names to typed values or to the
    text of a form's inputs; fields left out take ReplayConfig's defaults.
    """
    errors: dict[str, str] = {}
    known = set(config_fields())
    for key in values:
        if key not in known:
            errors[key] = "is not a replay setting"
    if "dataset" in values:
        why = _dataset_error(values["dataset"])
        if why:
            errors["dataset"] = why
    _check_numbers(values, errors)
    _check_choices(values, errors)
    return errors


def make_config(values: Mapping[str, Any]) -> ReplayConfig:
    """A :class:`ReplayConfig` from settings that pass :func:`config_errors`.

    Raises :class:`ReplayConfigError` (a ``BadRequestError``, exit code 2) naming
    every bad field otherwise.
    """
    errors = config_errors(values)
    if errors:
        raise ReplayConfigError(errors)
    out = dict(values)
    if "dataset" in out:
        data = str(out["dataset"]).strip()
        out["dataset"] = data if _named_dataset(data) else str(Path(data).expanduser().absolute())
    for key in ("n_edits", "glue_every", "batch_size", "retention_size"):
        if key in out:
            out[key] = int(str(out[key]).strip())
    if "glue_limit" in out:
        limit = out["glue_limit"]
        out["glue_limit"] = None if limit in (None, "") or int(str(limit)) == 0 else int(limit)
    if "layer" in out:
        out["layer"] = None if out["layer"] in (None, "") else int(str(out["layer"]))
    if "order_seed" in out:
        seed = out["order_seed"]
        out["order_seed"] = None if seed in (None, "") else int(str(seed).strip())
    if "glue_tasks" in out:
        out["glue_tasks"] = parse_tasks(out["glue_tasks"])
    if out.get("glue_dir") in ("",):
        out["glue_dir"] = None
    elif out.get("glue_dir") is not None:
        out["glue_dir"] = str(out["glue_dir"])
    return ReplayConfig(**out)


def replay_layer(lm: LoadedModel, cfg: ReplayConfig | None, run_hparams: Mapping | None) -> int:
    """The layer a replay edits: its config's, a resumed run's, else the preset's."""
    layer = cfg.layer if cfg is not None else None
    if run_hparams is not None:
        stored = RunSpec.of(dict(run_hparams)).replay
        layer = stored.layer if stored is not None else None
    return lm.hparams.layer if layer is None else int(layer)


def replay_layers(
    lm: LoadedModel, ed: Editor, cfg: ReplayConfig | None, run_hparams: Mapping | None
) -> list[int]:
    """Every layer a replay may write: its layer (a key-mode method's one) and the
    method's edited layers (its preset's, or the resumed run's)."""
    layers = {replay_layer(lm, cfg, run_hparams)}
    if run_hparams is not None:
        spec = RunSpec.of(dict(run_hparams))
        method, hp = spec.method, spec.edit_hparams(lm.hparams)
    else:
        method = (cfg or ReplayConfig()).method
        hp = method_preset(lm.hparams, method)
    if not get_method(method).capabilities.key_modes:  # ROME writes its one layer
        layers |= set(hp.edited_layers())
    return sorted(ed.check_layer(x) for x in layers)


# --------------------------------------------------------------------------- events


class ReplayHandler:
    """What a face does with each replay event; every method does nothing by default.

    :func:`dispatch` calls the method for the event's type (``isinstance``).
    """

    def started(self, ev: ReplayStarted) -> None:
        """The run exists (or was resumed); ``ev.start_seq`` edits are already done."""

    def edit_done(self, ev: EditDone) -> None:
        """One edit was computed, maybe applied, scored and stored."""

    def checkpoint(self, ev: CheckpointDone) -> None:
        """GLUE and fluency after ``ev.step`` edits."""

    def warning(self, ev: ReplayWarning) -> None:
        """Something the user should know (a flagged edit, a skipped record)."""

    def finished(self, ev: ReplayFinished) -> None:
        """The run ended: finished or cancelled, with its summary."""

    def other(self, ev: object) -> None:
        """An event type this handler does not know (newer evals)."""
        log.debug("replay event %r not handled", ev)


def dispatch(ev: object, handler: ReplayHandler) -> None:
    """Call ``handler``'s method for ``ev``'s type."""
    if isinstance(ev, EditDone):
        handler.edit_done(ev)
    elif isinstance(ev, CheckpointDone):
        handler.checkpoint(ev)
    elif isinstance(ev, ReplayWarning):
        handler.warning(ev)
    elif isinstance(ev, ReplayStarted):
        handler.started(ev)
    elif isinstance(ev, ReplayFinished):
        handler.finished(ev)
    else:
        handler.other(ev)


EventSink = ReplayHandler | Callable[[object], None]


def drive(events: Iterable[ReplayEvent], handler: EventSink) -> ReplayFinished | None:
    """Feed every event to ``handler``; the final :class:`ReplayFinished`, if any.

    ``handler`` is a :class:`ReplayHandler` (its method for each event's type is
    called) or a function handed every event as it is (the app posts them to
    its UI thread, then dispatches them there).
    """
    finished: ReplayFinished | None = None
    for ev in events:
        if isinstance(handler, ReplayHandler):
            dispatch(ev, handler)
        else:
            handler(ev)
        if isinstance(ev, ReplayFinished):
            finished = ev
    return finished


def replay_sink(store: Store) -> ReplaySink:
    """The store as a replay's sink: ``evals`` reads and writes a run only through
    :class:`evals.sink.ReplaySink`, and mypy checks here that a ``Store`` is one."""
    return store


def run_replay(
    lm: LoadedModel,
    store: Store,
    handler: EventSink,
    cfg: ReplayConfig | None = None,
    *,
    resume: str | None = None,
    cancel: threading.Event | None = None,
    hparams: EditHparams | None = None,
    rescore_finished: bool = False,
    extend_to: int | None = None,
) -> ReplayFinished | None:
    """Run a new replay (``cfg``) or resume the run ``resume`` on ``lm``, which must
    hold the base weights; events go to ``handler``. ``hparams`` (default
    ``lm.hparams``) is what a new run edits with; a resumed one uses its own.
    ``rescore_finished``: resuming a finished run re-scores it (else nothing
    happens); ``extend_to``: the resumed run goes on to that many edits. The
    run's edits stay on ``lm`` afterwards (see
    :meth:`workbench.core.session.Session.run_replay` for a replay that gives
    the weights back)."""
    events = replay(
        lm,
        replay_sink(store),
        None if resume else cfg,
        cancel=cancel,
        resume=resume,
        hparams=hparams,
        rescore_finished=rescore_finished,
        extend_to=extend_to,
    )
    return drive(events, handler)


def edit_hparams(
    lm: LoadedModel,
    v_stop: str | None = None,
    norm_anchor: bool | None = None,
    method: str = "rome",
) -> EditHparams:
    """The preset ``method`` edits ``lm`` with (:func:`rome.hparams.method_preset`), with
    the stabilisers a replay asks for (``None``: as the preset)."""
    base = method_preset(lm.hparams, method)
    changes: dict[str, Any] = {}
    if v_stop is not None:
        changes["v_stop"] = v_stop
    if norm_anchor is not None:
        changes["v_norm_anchor"] = norm_anchor
    return base.replace(**changes).validate() if changes else base
