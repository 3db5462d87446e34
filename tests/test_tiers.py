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


def _marks(node: ast.AST, skip_params: bool = False) -> set[str]:
    """Marker names in ``@pytest.mark.X`` decorators or a ``pytestmark = ...`` value (``skip_params``: not
    those of single ``pytest.param(..., marks=...)`` cases)."""
    out, params = set(), set()
    for sub in ast.walk(node):
        if skip_params and isinstance(sub, ast.Call) and getattr(sub.func, "attr", None) == "param":
            params |= {id(x) for x in ast.walk(sub)}
    for sub in ast.walk(node):
        if isinstance(sub, ast.Attribute) and isinstance(sub.value, ast.Attribute) and sub.value.attr == "mark" \
                and id(sub) not in params:
            out.add(sub.attr)
    return out


def _tests_and_marks() -> dict[str, set[str]]:
    """Every test function in tests/ (and each ``pytest.param`` case with its own marks) with the tier
    markers it carries: its own, its module's and its case's."""
    found = {}
    for path in sorted(TESTS.glob("test_*.py")):
        tree = ast.parse(path.read_text())
        module = set()
        for node in tree.body:
            if isinstance(node, ast.Assign) and any(getattr(t, "id", None) == "pytestmark" for t in node.targets):
                module |= _marks(node.value)
        for node in tree.body:
            if isinstance(node, ast.FunctionDef) and node.name.startswith("test_"):
                own = set().union(set(), *(_marks(d, skip_params=True) for d in node.decorator_list))
                name = f"{path.name}::{node.name}"
                found[name] = (own | module) & {"slow", "distributed"}
                cases = [c for d in node.decorator_list for c in ast.walk(d)
                         if isinstance(c, ast.Call) and getattr(c.func, "attr", None) == "param"]
                for i, case in enumerate(cases):
                    found[f"{name}[param {i}]"] = (own | module | _marks(case)) & {"slow", "distributed"}
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
