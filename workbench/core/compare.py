"""A comparison: a TOML spec of methods × datasets × orders × edits × batch sizes (and
any replay setting) that names its runs, and where each run stands on disk.

The spec (every key but ``methods`` optional)::

    name = "family-smollm2"        # default: the file's stem
    model = "smollm2-135m"         # default: smollm2-135m
    methods = ["rrome", "memit"]   # registry names (rome.methods) or labels defined below
    datasets = ["val"]             # 'sample', 'val', 'hub' or a file (relative: to the spec)
    orders = ["file"]              # 'file' (the file's order) or seeds (replay --order-seed)
    edits = [1000]                 # --n-edits
    batch_sizes = [100]            # --batch-size

    [settings]                     # any other replay setting, for every run
    glue_every = 100

    [method.rrome]                 # a label: its registry method, and what differs for it
    method = "rome"                # (an axis given here replaces the spec's for this label)
    mode = "rrome"
    batch_sizes = [1]

Each run is named ``{label}-{dataset}[-o{seed}]-n{edits}-b{batch}`` and writes its own
database, ``OUT/{name}.db`` (one run each). :func:`run_states` reads those: a run with
no database is new, a finished one is skipped, any other is resumed (``replay
--resume``); a database whose run was made with other settings is refused.
"""

from __future__ import annotations

import itertools
import re
import sqlite3
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rome import BadRequestError

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

from .replay import V_STOPS, config_errors, config_fields, make_config

DEFAULT_MODEL = "smollm2-135m"

#: the spec's axes, and the replay setting each one is
AXES = {
    "methods": "method",
    "datasets": "dataset",
    "orders": "order_seed",
    "edits": "n_edits",
    "batch_sizes": "batch_size",
}
TOP_KEYS = ("name", "model", "settings", "method", *AXES)

#: replay settings a spec may give (the replay command's options) and their flags
VALUE_FLAGS = {
    "mode": "--mode",
    "glue_every": "--glue-every",
    "glue_dir": "--glue-dir",
    "glue_limit": "--glue-limit",
    "glue_tasks": "--glue-tasks",
    "glue_scoring": "--glue-scoring",
    "glue_calibration": "--glue-calibration",
    "retention_size": "--retention-size",
    "layer": "--layer",
    "v_stop": "--v-stop",
    "dtype": "--dtype",
    "device": "--device",
    "hparams": "--hparams",
    "initial_state": "--initial-state",
}
#: on/off replay settings: the flag for each value
BOOL_FLAGS = {
    "guard": ("--guard", "--no-guard"),
    "perplexity": ("--perplexity", "--no-perplexity"),
    "norm_anchor": ("--norm-anchor", "--no-norm-anchor"),
}
#: settings that load or set up the model rather than the replay (checked here)
_NOT_CONFIG = ("v_stop", "dtype", "device", "hparams", "norm_anchor")
DTYPES = ("float32", "bfloat16", "float16")


class CompareSpecError(BadRequestError):
    """A spec (or the databases of its runs) that cannot be run as it is (exit 2)."""


@dataclass(frozen=True)
class PlannedRun:
    """One run of a comparison: its name, model, axes and other settings."""

    name: str
    model: str
    label: str  # the spec's name for the method (a registry name or a label)
    method: str  # the registry's name
    dataset: str
    order: int | None  # None: the file's order
    n_edits: int
    batch_size: int
    settings: dict[str, Any] = field(default_factory=dict)

    def config_values(self) -> dict[str, Any]:
        """The run's :class:`~evals.replay.ReplayConfig` fields (for ``config_errors``)."""
        values = {k: v for k, v in self.settings.items() if k not in _NOT_CONFIG}
        values.update(
            method=self.method, dataset=self.dataset, n_edits=self.n_edits,
            batch_size=self.batch_size,
        )  # fmt: skip
        if self.order is not None:
            values["order_seed"] = self.order
        return values

    def replay_args(self) -> list[str]:
        """The ``replay`` options of a new run (no ``--db``)."""
        args = ["--model", self.model, "--method", self.method, "--dataset", self.dataset]
        args += ["--n-edits", str(self.n_edits), "--batch-size", str(self.batch_size)]
        if self.order is not None:
            args += ["--order-seed", str(self.order)]
        for key, value in self.settings.items():
            if key in BOOL_FLAGS:
                args.append(BOOL_FLAGS[key][0 if value else 1])
            elif key == "glue_tasks" and not isinstance(value, str):
                args += [VALUE_FLAGS[key], ",".join(map(str, value))]
            else:
                args += [VALUE_FLAGS[key], str(value)]
        return args


@dataclass(frozen=True)
class CompareSpec:
    """A parsed, checked spec: its name, file and runs in order."""

    name: str
    path: Path
    runs: tuple[PlannedRun, ...]


def _as_list(value: Any, where: str) -> list[Any]:
    items = list(value) if isinstance(value, list) else [value]
    if not items:
        raise CompareSpecError(f"{where} is empty: give at least one value")
    return items


def _read_toml(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise CompareSpecError(f"no spec file at {path}")
    try:
        return tomllib.loads(path.read_text(encoding="utf-8"))
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise CompareSpecError(f"{path} is not valid TOML: {exc}") from None


def _check_keys(table: Mapping[str, Any], known: Sequence[str], where: str) -> None:
    unknown = [k for k in table if k not in known]
    if unknown:
        raise CompareSpecError(
            f"unknown setting {unknown[0]!r} in {where} (known: {', '.join(sorted(known))})"
        )


def _setting_keys() -> tuple[str, ...]:
    return (*VALUE_FLAGS, *BOOL_FLAGS)


def _methods(spec: Mapping[str, Any]) -> list[tuple[str, str, dict[str, Any]]]:
    """``(label, registry name, the label's table)`` for each of ``methods``."""
    from rome.methods import METHODS

    tables = spec.get("method", {})
    if not isinstance(tables, dict):
        raise CompareSpecError("[method] must be a table of labels, e.g. [method.rrome]")
    if "methods" not in spec:
        raise CompareSpecError('the spec names no methods: methods = ["rome", ...]')
    out = []
    for label in _as_list(spec["methods"], "methods"):
        own = tables.get(str(label), {})
        if not isinstance(own, dict):
            raise CompareSpecError(f"[method.{label}] must be a table")
        _check_keys(own, ("method", "model", *AXES.keys() - {"methods"}, *_setting_keys()),
                    f"[method.{label}]")  # fmt: skip
        name = own.get("method", label)
        if name not in METHODS:
            raise CompareSpecError(
                f"unknown method {name!r} (methods: {', '.join(sorted(METHODS))}, "
                "or a label with its own [method.LABEL] method = ...)"
            )
        if not re.fullmatch(r"[A-Za-z0-9_.-]+", str(label)):
            raise CompareSpecError(f"method label {label!r}: use letters, digits, '-', '_', '.'")
        out.append((str(label), str(name), own))
    for label in tables:
        if label not in {m[0] for m in out}:
            raise CompareSpecError(f"[method.{label}] is not one of methods = [...]")
    return out


def _dataset(value: Any, base: Path) -> str:
    data = str(value).strip()
    why = config_errors({"dataset": data}).get("dataset")
    if why and not Path(data).is_absolute() and (base / data).is_file():
        return str((base / data).absolute())
    if why:
        raise CompareSpecError(f"unknown dataset {data!r}: it {why}")
    return make_config({"dataset": data}).dataset


def _order(value: Any) -> int | None:
    if value == "file":
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise CompareSpecError(f"order {value!r}: give 'file' or a seed (a whole number ≥ 0)")
    if "order_seed" not in config_fields():
        raise CompareSpecError(
            f"order {value}: this rome-workbench's replay has no --order-seed; use 'file'"
        )
    return value


def _tag(dataset: str) -> str:
    if "/" not in dataset and "\\" not in dataset:
        return dataset
    return re.sub(r"[^A-Za-z0-9_]+", "_", Path(dataset).stem) or "data"


def _check_settings(run: PlannedRun) -> None:
    errors = config_errors(run.config_values())
    s = run.settings
    if "v_stop" in s and s["v_stop"] not in V_STOPS:
        errors["v_stop"] = f"must be one of {', '.join(V_STOPS)}"
    if "dtype" in s and s["dtype"] not in DTYPES:
        errors["dtype"] = f"must be one of {', '.join(DTYPES)}"
    if "hparams" in s and not Path(str(s["hparams"])).is_file():
        errors["hparams"] = f"has no file at {s['hparams']}"
    for key in BOOL_FLAGS:
        if key in s and not isinstance(s[key], bool):
            errors[key] = "must be true or false"
    if errors:
        key, why = next(iter(errors.items()))
        raise CompareSpecError(f"run {run.name}: setting {key} {why}")


def _base_settings(spec: Mapping[str, Any], base: Path) -> dict[str, Any]:
    settings = spec.get("settings", {})
    if not isinstance(settings, dict):
        raise CompareSpecError("[settings] must be a table")
    axis_fields = {v: k for k, v in AXES.items()}
    for key in settings:
        if key in axis_fields:
            raise CompareSpecError(f"{key} is an axis: give it as {axis_fields[key]} = [...]")
    _check_keys(settings, _setting_keys(), "[settings]")
    return _files_from(dict(settings), base)


def _files_from(settings: dict[str, Any], base: Path) -> dict[str, Any]:
    """``settings`` with its file paths relative to the spec's folder made absolute."""
    for key in ("hparams", "initial_state", "glue_dir"):
        if key in settings and not Path(str(settings[key])).expanduser().is_absolute():
            settings[key] = str((base / str(settings[key])).absolute())
    return settings


def load_spec(path: Path) -> CompareSpec:
    """Parse and check the spec at ``path`` (see the module); nothing is written.
    Raises :class:`CompareSpecError` with one line on the first problem."""
    spec = _read_toml(path)
    _check_keys(spec, TOP_KEYS, path.name)
    base = path.parent
    name = str(spec.get("name", path.stem))
    if not re.fullmatch(r"[A-Za-z0-9_.-]+", name):
        raise CompareSpecError(f"name {name!r}: use letters, digits, '-', '_', '.'")
    model = str(spec.get("model", DEFAULT_MODEL))
    settings = _base_settings(spec, base)
    runs: list[PlannedRun] = []
    for label, method, own in _methods(spec):
        axes = {k: _as_list(own.get(k, spec.get(k, _AXIS_DEFAULTS[k])), k) for k in AXES}
        mine = {
            **settings,
            **_files_from({k: v for k, v in own.items() if k in _setting_keys()}, base),
        }
        for data, order, n, b in itertools.product(
            axes["datasets"], axes["orders"], axes["edits"], axes["batch_sizes"]
        ):
            dataset, seed = _dataset(data, base), _order(order)
            if isinstance(n, bool) or isinstance(b, bool):
                raise CompareSpecError("edits and batch_sizes must be whole numbers")
            run_name = f"{label}-{_tag(dataset)}" + (f"-o{seed}" if seed is not None else "")
            run = PlannedRun(
                f"{run_name}-n{n}-b{b}", str(own.get("model", model)), label, method,
                dataset, seed, n, b, mine,
            )  # fmt: skip
            _check_settings(run)
            runs.append(run)
    names = [r.name for r in runs]
    dup = next((n for n in names if names.count(n) > 1), None)
    if dup is not None:
        raise CompareSpecError(f"two runs are named {dup}: the spec lists one of its axes twice")
    return CompareSpec(name, path, tuple(runs))


def order_groups(spec: CompareSpec) -> dict[str, list[str]]:
    """The runs that differ only by order (two or more), by the name they share without
    their order: ``{"memit-val-n300-b100": ["memit-val-n300-b100", "memit-val-o1-..."]}``."""
    groups: dict[str, list[str]] = {}
    for run in spec.runs:
        key = f"{run.label}-{_tag(run.dataset)}-n{run.n_edits}-b{run.batch_size}"
        groups.setdefault(key, []).append(run.name)
    return {k: v for k, v in groups.items() if len(v) > 1}


_AXIS_DEFAULTS: dict[str, Any] = {
    "methods": [],
    "datasets": ["sample"],
    "orders": ["file"],
    "edits": [100],
    "batch_sizes": [1],
}


# ------------------------------------------------------------------------- on disk


@dataclass
class RunState:
    """Where one planned run stands: its database, and what running the spec does."""

    run: PlannedRun
    db: Path
    action: str  # "start", "resume" or "skip" (finished)
    run_id: str | None = None
    edits_done: int = 0

    def argv(self, python: str = sys.executable) -> list[str]:
        """The command that runs it (``replay``, kill-safe and resumable)."""
        head = [python, "-m", "workbench.cli", "replay", "--db", str(self.db)]
        if self.action == "resume" and self.run_id is not None:
            load = [a for k in ("dtype", "device") if k in self.run.settings
                    for a in (VALUE_FLAGS[k], str(self.run.settings[k]))]  # fmt: skip
            return [*head, "--model", self.run.model, "--resume", self.run_id, *load]
        return [*head, *self.run.replay_args()]


def read_run(db: Path) -> tuple[str, str, int, dict[str, Any]] | None:
    """The one run of a comparison's database, read-only: ``(id, status, edits stored,
    stored replay settings)``; ``None`` when it holds no run (or is no database)."""
    from evals.spec import RunSpec

    try:
        conn = sqlite3.connect(db.absolute().as_uri() + "?mode=ro", uri=True)
    except sqlite3.Error:
        return None
    try:
        rows = conn.execute("SELECT id, status, hparams FROM runs").fetchall()
        if not rows:
            return None
        if len(rows) > 1:
            raise CompareSpecError(f"{db} holds {len(rows)} runs; a comparison's holds one")
        rid, status, hp = rows[0]
        n = conn.execute("SELECT COUNT(*) FROM edits WHERE run_id = ?", (rid,)).fetchone()[0]
        return str(rid), str(status), int(n), RunSpec.of(hp).stored_replay
    except sqlite3.Error:
        return None
    finally:
        conn.close()


def _mismatch(run: PlannedRun, stored: Mapping[str, Any]) -> str | None:
    """The first setting the stored run was made with that the spec changes."""
    import json

    planned = json.loads(json.dumps(make_config(run.config_values()).to_dict()))
    for key in run.config_values():
        if key in stored and stored[key] != planned.get(key):
            want = planned.get(key)
            return f"{key} {stored[key]!r} (the spec: {want!r})"
    return None


def run_states(spec: CompareSpec, out: Path) -> list[RunState]:
    """Each planned run's state under ``out`` (read-only). A database that holds a run
    made with other settings is refused (:class:`CompareSpecError`)."""
    states = []
    for run in spec.runs:
        db = out / f"{run.name}.db"
        found = read_run(db) if db.is_file() else None
        if found is None:
            states.append(RunState(run, db, "start"))
            continue
        rid, status, n, stored = found
        why = _mismatch(run, stored)
        if why is not None:
            raise CompareSpecError(
                f"run {run.name}: {db} was made with {why}; move it away to start it anew"
            )
        action = "skip" if status == "finished" else "resume"
        states.append(RunState(run, db, action, rid, n))
    return states


def selected(states: list[RunState], patterns: Sequence[str] | None) -> list[RunState]:
    """The states whose run names match any of the shell-style ``patterns`` (all of them
    when none are given); a pattern that matches no run is refused."""
    from fnmatch import fnmatchcase

    if not patterns:
        return states
    for pattern in patterns:
        if not any(fnmatchcase(s.run.name, pattern) for s in states):
            names = ", ".join(s.run.name for s in states)
            raise CompareSpecError(f"--only {pattern!r} matches no run of the spec ({names})")
    return [s for s in states if any(fnmatchcase(s.run.name, p) for p in patterns)]
