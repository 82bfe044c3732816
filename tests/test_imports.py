"""The import graph has no cycles, and the modules that once formed one import alone.

The graph is read from the source (``ast``): an edge for every ``import`` that
runs, at module level or inside a function. ``if TYPE_CHECKING:`` imports never
run; they are counted too where a cycle through them would still tie two modules
together for a reader (everywhere).
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("rome", "evals", "workbench")


def _modules() -> dict[str, Path]:
    mods = {}
    for pkg in PACKAGES:
        for f in (ROOT / pkg).rglob("*.py"):
            parts = list(f.relative_to(ROOT).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            mods[".".join(parts)] = f
    return mods


def _is_type_checking(node: ast.If) -> bool:
    return "TYPE_CHECKING" in ast.unparse(node.test)


def _imports(name: str, path: Path, mods: dict[str, Path], typing: bool) -> set[str]:
    """The project modules ``name`` imports (with ``typing``, TYPE_CHECKING ones too)."""
    package = name.split(".") if path.name == "__init__.py" else name.split(".")[:-1]
    out: set[str] = set()

    def add(target: str) -> None:
        while target and target not in mods:
            target = target.rpartition(".")[0]
        if target and target != name:
            out.add(target)

    def visit(node: ast.AST) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.If) and _is_type_checking(child) and not typing:
                for stmt in child.orelse:
                    visit(stmt)
                continue
            if isinstance(child, ast.Import):
                for alias in child.names:
                    add(alias.name)
            elif isinstance(child, ast.ImportFrom):
                if child.level:
                    base = package[: len(package) - (child.level - 1)]
                    module = ".".join(base + ([child.module] if child.module else []))
                else:
                    module = child.module or ""
                for alias in child.names:
                    sub = f"{module}.{alias.name}"
                    add(sub if sub in mods else module)
            visit(child)

    visit(ast.parse(path.read_text()))
    return out


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def connect(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph[v]:
            if w not in index:
                connect(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                found.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            connect(v)
    return found


def _graph(typing: bool) -> dict[str, set[str]]:
    mods = _modules()
    return {m: _imports(m, p, mods, typing) for m, p in mods.items()}


def test_the_cycle_finder_finds_a_cycle():
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert _cycles({"a": {"b"}, "b": set()}) == []


def test_the_graph_sees_lazy_and_relative_imports():
    graph = _graph(typing=True)
    assert "workbench.store.errors" in graph["workbench.store.codec"]
    assert "workbench.tui.job_kinds" in graph["workbench.tui.messages"]  # TYPE_CHECKING
    assert "rome.batching" in graph["rome.keys"]


def test_no_import_cycles_among_imports_that_run():
    assert _cycles(_graph(typing=False)) == []


def test_no_import_cycles_anywhere_even_through_type_hints():
    """rome, evals and workbench together, TYPE_CHECKING imports counted: the methods
    never name the Editor (they get an EditContext), the replay's steps name its
    RunState (evals.run_state), not the replay."""
    assert _cycles(_graph(typing=True)) == []


@pytest.mark.parametrize(
    "module",
    [
        "workbench.store.codec",
        "workbench.store.errors",
        "workbench.store.records",
        "workbench.tui.jobs",
        "workbench.tui.messages",
    ],
)
def test_module_imports_alone(module: str):
    """Each module of the two former cycles imports first, in a fresh interpreter."""
    done = subprocess.run(
        [sys.executable, "-c", f"import {module}"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr


def test_evals_names_no_workbench_module_even_in_type_hints():
    """``evals`` reaches its store only through ``evals.sink``'s protocols."""
    graph = _graph(typing=True)
    reach = {m: sorted(w for w in ws if w.startswith("workbench")) for m, ws in graph.items()}
    assert {m: ws for m, ws in reach.items() if m.startswith("evals") and ws} == {}


def test_importing_the_replay_imports_no_store():
    code = (
        "import sys, evals.replay, evals.figures, evals.retention; "
        "print(sorted(m for m in sys.modules if m.startswith('workbench')))"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]"


def test_the_store_has_every_call_of_the_replay_sink():
    """mypy checks the signatures (``workbench.core.replay.replay_sink``); this, the names."""
    from evals.protocols import FLUENCY_TASK
    from evals.sink import ReplayReader, ReplaySink
    from workbench.store import FLUENCY_TASK as STORE_FLUENCY_TASK
    from workbench.store import Store

    calls = {
        name
        for proto in (ReplayReader, ReplaySink)
        for name, value in vars(proto).items()
        if callable(value) and not name.startswith("_")
    }
    assert calls and all(callable(getattr(Store, name, None)) for name in calls), calls
    assert FLUENCY_TASK == STORE_FLUENCY_TASK
