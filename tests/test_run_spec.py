"""RunSpec writes a run's settings and reads them back, for new runs and every stored one
(the committed docs/results databases and the schema-v2 fixtures)."""

from __future__ import annotations

import ast
import json
import sqlite3
from pathlib import Path

import pytest

from evals.spec import ReplayConfig, RunSpec
from rome.hparams import load_preset
from workbench.core.report import _settings, report_markdown
from workbench.store import Store

ROOT = Path(__file__).resolve().parents[1]
DATABASES = sorted((ROOT / "docs" / "results").glob("*.db")) + sorted(
    (ROOT / "tests" / "data").glob("v2-*.db")
)
#: a report of these takes over ten seconds (thousands of edits)
LARGE = 10 * 2**20


def test_what_the_spec_writes_a_store_gives_back(tmp_path: Path) -> None:
    hp = load_preset("tiny-gpt2").replace(v_norm_anchor=True)
    cfg = ReplayConfig(method="memit", batch_size=4, method_options={"scale": 0.5}, layer=2)
    with Store.open(tmp_path / "wb.db") as store:
        run = store.create_run(model="tiny-gpt2", hparams=RunSpec.new(hp, cfg).to_dict())
        spec = RunSpec.of(store.get_run(run.id))
        assert spec.replay == cfg and spec.method == "memit" and spec.layer() == 2
        assert spec.edit_hparams(load_preset("tiny-llama")) == hp
        assert store.get_run(run.id).label.endswith("+ norm anchor")
        # each writer changes its part only
        later = ReplayConfig(method="memit", n_edits=7)
        store.update_run(run.id, hparams=spec.with_replay(later).to_dict())
        spec = RunSpec.of(store.get_run(run.id))
        assert spec.replay == later and spec.edit_hparams(hp.replace(layer=0)) == hp
        other = hp.replace(layer=3, v_norm_anchor=False)
        store.update_run(run.id, hparams=spec.with_hparams(other).to_dict())
        spec = RunSpec.of(store.get_run(run.id))
        assert spec.replay == later and spec.edit_hparams(hp) == other
        assert spec.layer() == 3 and not store.get_run(run.id).label.endswith("anchor")


def test_a_session_run_and_an_empty_one_read_as_no_replay() -> None:
    hp = load_preset("tiny-gpt2")
    for spec in (RunSpec.new(hp), RunSpec.of(json.dumps(RunSpec.new(hp).to_dict()))):
        assert spec.replay is None and spec.stored_replay == {} and spec.method == "rome"
        assert spec.edit_hparams(load_preset("tiny-llama")) == hp
    for empty in (None, "", "{}", {}):
        spec = RunSpec.of(empty)
        assert spec.replay is None and spec.hparams == {} and spec.layer() is None


def _snapshot(src: Path, dst: Path) -> Path:
    """A consistent copy of ``src``, read-only on it (a replay may be writing it)."""
    with sqlite3.connect(src.absolute().as_uri() + "?mode=ro", uri=True) as conn:
        with sqlite3.connect(dst) as out:
            conn.backup(out)
    conn.close()
    out.close()
    return dst


@pytest.mark.parametrize(
    "db",
    [
        pytest.param(p, id=p.name, marks=[pytest.mark.slow] if p.stat().st_size > LARGE else [])
        for p in DATABASES
    ],
)
def test_every_stored_run_reads_through_the_spec_and_reports(db: Path, tmp_path: Path) -> None:
    """What RunSpec reads is what the column holds (read here with sqlite and json alone),
    and a report of every run of the database is written."""
    path = _snapshot(db, tmp_path / db.name)
    with sqlite3.connect(path) as conn:
        raw = {i: json.loads(h or "{}") for i, h in conn.execute("SELECT id, hparams FROM runs")}
    conn.close()
    assert raw, f"{db.name} holds no run"
    fallback = load_preset("tiny-gpt2")
    with Store.open(path) as store:
        runs = store.list_runs()
        assert {r.id for r in runs} == set(raw)
        for run in runs:
            spec, stored = RunSpec.of(run), raw[run.id]
            cfg = stored.get("replay") or {}
            assert spec.method == cfg.get("method", "rome")
            replay = spec.replay
            assert replay is not None  # every committed run is a replay
            assert all(getattr(replay, k) == (tuple(v) if k == "glue_tasks" else v)
                       for k, v in cfg.items() if hasattr(replay, k))  # fmt: skip
            hp = spec.edit_hparams(fallback)
            assert hp is not fallback and hp.name == stored["hparams"]["name"]
            assert f"method {spec.method};" in _settings(run)
        page = report_markdown(store, [r.id for r in runs], None)
    assert all(r.label in page for r in runs)


def _picks_the_spec_apart(node: ast.AST) -> bool:
    """``x.get("replay")``, ``x.get("hparams")``, ``x["replay"]`` or ``run.hparams["hparams"]``
    (the ways the stored JSON was read by hand before RunSpec)."""
    keys = ("replay", "hparams")
    if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute):
        first = node.args[0] if node.args else None
        return node.func.attr == "get" and isinstance(first, ast.Constant) and first.value in keys
    if isinstance(node, ast.Subscript) and isinstance(node.slice, ast.Constant):
        key = node.slice.value
        on_run = isinstance(node.value, (ast.Attribute, ast.Call, ast.Subscript, ast.BoolOp))
        typing = isinstance(node.value, ast.Name) and node.value.id == "Literal"
        return (key == "replay" and not typing) or (key == "hparams" and on_run)
    return False


def test_nothing_but_the_spec_picks_the_stored_settings_apart() -> None:
    found = []
    for pkg in ("rome", "evals", "workbench", "scripts"):
        for path in sorted((ROOT / pkg).rglob("*.py")):
            if path == ROOT / "evals" / "spec.py":
                continue
            for node in ast.walk(ast.parse(path.read_text())):
                if _picks_the_spec_apart(node):
                    found.append(f"{path.relative_to(ROOT)}:{node.lineno}")
    assert found == []
    assert _picks_the_spec_apart(ast.parse('(run.hparams or {}).get("replay")').body[0].value)
    assert _picks_the_spec_apart(ast.parse('json.loads(t)["hparams"]').body[0].value)
