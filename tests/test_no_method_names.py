"""No code outside ``rome/methods/`` branches on an editing method's name.

The AST of every module of ``rome``, ``evals`` and ``workbench`` (the method
files themselves aside; ``benchmarks/parity.py``, which maps each method to its
published repository, is outside these packages) is walked for a comparison
against a registered name (``method == "rome"``, ``m in ("memit", "emmet")``,
``match`` cases) and for hard-coded lists or tables of two or more of them. What
a caller needs to know is a method's capabilities, settings or summary.
"""

from __future__ import annotations

import ast
from pathlib import Path

from rome.methods import METHODS

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("rome", "evals", "workbench")
EXEMPT = ("rome/methods/",)


def _names(node: ast.AST | None, registered: set[str]) -> list[str]:
    """The registered names ``node`` is, or holds (a tuple, list or set literal)."""
    if isinstance(node, ast.Constant) and isinstance(node.value, str):
        return [node.value] if node.value in registered else []
    if isinstance(node, (ast.Tuple, ast.List, ast.Set)):
        return [n for elt in node.elts for n in _names(elt, registered)]
    return []


def offences(source: str, registered: set[str]) -> list[tuple[int, str]]:
    """(line, what) for each comparison against a registered name and each literal list
    or table naming two or more of them."""
    found: list[tuple[int, str]] = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Compare):
            hit = [n for part in (node.left, *node.comparators) for n in _names(part, registered)]
            if hit:
                found.append((node.lineno, f"compares with {', '.join(hit)}"))
        elif isinstance(node, ast.MatchValue):
            hit = _names(node.value, registered)
            if hit:
                found.append((node.lineno, f"matches {', '.join(hit)}"))
        elif isinstance(node, (ast.Tuple, ast.List, ast.Set)):
            hit = _names(node, registered)
            if len(hit) >= 2:
                found.append((node.lineno, f"lists {', '.join(hit)}"))
        elif isinstance(node, ast.Dict):
            hit = [n for k in node.keys for n in _names(k, registered)]
            if len(hit) >= 2:
                found.append((node.lineno, f"a table keyed by {', '.join(hit)}"))
    return found


def test_the_walker_sees_each_kind_of_branch():
    reg = {"rome", "memit"}
    src = (
        'a = m == "rome"\n'
        'b = m in ("memit", "x")\n'
        'L = ("rome", "memit")\n'
        'D = {"rome": 1, "memit": 2}\n'
        'match m:\n    case "memit":\n        pass\n'
        'ok = f(method="rome")\n'
    )
    lines = [line for line, _ in offences(src, reg)]
    assert sorted(set(lines)) == [1, 2, 3, 4, 6]


def test_no_module_outside_the_methods_branches_on_a_method_name():
    registered = set(METHODS)
    bad = []
    for pkg in PACKAGES:
        for path in sorted((ROOT / pkg).rglob("*.py")):
            rel = path.relative_to(ROOT).as_posix()
            if rel.startswith(EXEMPT):
                continue
            for line, what in offences(path.read_text(encoding="utf-8"), registered):
                bad.append(f"{rel}:{line}: {what}")
    assert bad == [], "\n".join(bad)
