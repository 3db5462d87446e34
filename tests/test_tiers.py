"""The test tiers are what the docs and .ci/run say: `pytest` alone runs the fast tier (pyproject's
addopts), `-m slow` and `-m distributed` the others, each marker registered and each tier non-empty."""
from __future__ import annotations

import ast
import re
from pathlib import Path

TESTS = Path(__file__).resolve().parent
ROOT = TESTS.parent
# The selections .ci/run makes, in its order (a slow multi-process test runs once, with the distributed ones).
CI_TIERS = ["not slow and not distributed", "slow and not distributed", "distributed"]


def _marks(node: ast.AST) -> set[str]:
    """Marker names in ``@pytest.mark.X`` decorators or a ``pytestmark = ...`` value."""
    out = set()
    for sub in ast.walk(node):
        if isinstance(sub, ast.Attribute) and isinstance(sub.value, ast.Attribute) and sub.value.attr == "mark":
            out.add(sub.attr)
    return out


def _tests_and_marks() -> dict[str, set[str]]:
    """Every test function in tests/ with the tier markers it carries (its own and its module's)."""
    found = {}
    for path in sorted(TESTS.glob("test_*.py")):
        tree = ast.parse(path.read_text())
        module = set()
        for node in tree.body:
            if isinstance(node, ast.Assign) and any(getattr(t, "id", None) == "pytestmark" for t in node.targets):
                module |= _marks(node.value)
        for node in tree.body:
            if isinstance(node, ast.FunctionDef) and node.name.startswith("test_"):
                own = set().union(*(_marks(d) for d in node.decorator_list)) if node.decorator_list else set()
                found[f"{path.name}::{node.name}"] = (own | module) & {"slow", "distributed"}
    return found


def _selects(expr: str, marks: set[str]) -> bool:
    """pytest's -m expression (and / or / not over marker names) for a test carrying ``marks``."""
    return bool(eval(expr, {"__builtins__": {}}, {"slow": "slow" in marks, "distributed": "distributed" in marks}))


def test_tier_markers_are_registered_and_strict(pytestconfig):
    registered = {line.split(":")[0].strip() for line in pytestconfig.getini("markers")}
    assert {"slow", "distributed"} <= registered
    assert "--strict-markers" in pytestconfig.getini("addopts")  # a misspelt marker is an error, not a new tier


def test_plain_pytest_runs_the_fast_tier(pytestconfig):
    addopts = pytestconfig.getini("addopts")
    expr = addopts[addopts.index("-m") + 1]
    assert expr == CI_TIERS[0]
    ci = (ROOT / ".ci" / "run").read_text()
    assert ".venv/bin/python -m pytest  #" in ci or ".venv/bin/python -m pytest\n" in ci  # the fast tier, no -m
    for tier in CI_TIERS[1:]:
        assert re.search(rf'^tier "?{tier}"?', ci, flags=re.M), f".ci/run does not run the tier -m '{tier}'"


def test_each_tier_selects_tests_and_together_they_cover_all_once():
    tests = _tests_and_marks()
    assert len(tests) > 100
    for expr in CI_TIERS:
        assert any(_selects(expr, m) for m in tests.values()), f"tier -m '{expr}' selects no test"
    for name, marks in tests.items():
        assert sum(_selects(expr, marks) for expr in CI_TIERS) == 1, f"{name} ({marks}) is in several tiers"
