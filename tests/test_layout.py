"""The rooms' import order (docs/architecture.md): a module imports only from its own room or from
rooms below it, never upward; rooms on the same floor do not import each other except where the
table of docs/architecture.md says so (``SAME_FLOOR``); and nothing imports the command line."""
from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "scalegen"
# config, errors, atomic -> text -> data -> render -> priors / generators -> distill -> train / eval / export
#   -> refine, bench, cli
FLOOR = {"config": 0, "errors": 0, "atomic": 0, "locks": 0, "text": 1, "data": 2, "render": 3, "priors": 4, "generators": 4,
         "distill": 5, "train": 6, "eval": 6, "export": 6, "refine": 7, "bench": 7, "pipeline": 7, "cli": 7}
# The same-floor imports docs/architecture.md allows: errors are config's and locks' to raise; the bench measures
# refinement; the command line runs refinement, the benches and the pipeline; the TriplaneTurbo protocol scores
# the exported mesh. priors and generators (floor 4) never import each other, nor does train import eval or export.
SAME_FLOOR = {("config", "errors"), ("locks", "errors"), ("locks", "atomic"), ("bench", "refine"), ("cli", "refine"), ("cli", "bench"), ("cli", "pipeline"),
              ("eval", "export")}


def _room(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else ""


def _imports(path: Path) -> set[str]:
    """Every scalegen module a file imports, at the top or inside functions."""
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("scalegen"):
            out.add(node.module)
        elif isinstance(node, ast.Import):
            out |= {a.name for a in node.names if a.name.startswith("scalegen")}
    return out


def test_imports_flow_downward_only():
    rooms = {p.stem if p.parent == PACKAGE else p.relative_to(PACKAGE).parts[0] for p in PACKAGE.rglob("*.py")}
    rooms.discard("__init__")
    assert rooms == set(FLOOR), f"a room is missing from the import order: {sorted(rooms ^ set(FLOOR))}"
    upward = []
    for path in PACKAGE.rglob("*.py"):
        rel = path.relative_to(PACKAGE)
        room = rel.stem if len(rel.parts) == 1 else rel.parts[0]
        if room == "__init__":
            continue
        for mod in _imports(path):
            other = _room(mod)
            if other == "cli" and room != "cli":
                upward.append(f"{rel} imports the command line ({mod})")
            elif other and other != room and FLOOR[other] > FLOOR[room]:
                upward.append(f"{rel} ({room}, floor {FLOOR[room]}) imports {mod} ({other}, floor {FLOOR[other]})")
            elif other and other != room and FLOOR[other] == FLOOR[room] and (room, other) not in SAME_FLOOR:
                upward.append(f"{rel} ({room}) imports {mod} ({other}) on its own floor {FLOOR[room]}")
    assert not upward, "\n".join(upward)


def test_the_same_floor_exceptions_are_the_documented_ones():
    """docs/architecture.md states the same-floor imports it allows; the test's list is that list."""
    text = (PACKAGE.parent / "docs" / "architecture.md").read_text()
    for room, other in SAME_FLOOR:
        assert f"`{room}` → `{other}`" in text, f"architecture.md does not list {room} → {other}"


def _renames(path: Path) -> list[int]:
    """Lines that rename a file: ``os.replace/rename(a, b)`` or ``Path.replace/rename(target)`` (one
    argument, unlike ``str.replace(old, new)``; ``dataclasses.replace`` copies a dataclass)."""
    lines = []
    for node in ast.walk(ast.parse(path.read_text())):
        if not (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
                and node.func.attr in ("replace", "rename")):
            continue
        owner = node.func.value.id if isinstance(node.func.value, ast.Name) else None
        if owner == "os" or (owner not in ("dataclasses", "atomic") and len(node.args) == 1):
            lines.append(node.lineno)
    return lines


def test_only_the_atomic_module_renames_files():
    """Every file or folder scalegen writes whole goes through scalegen/atomic.py (a temporary, then
    one rename): a hand-written rename elsewhere is a second copy of that logic."""
    found = []
    for path in sorted(PACKAGE.rglob("*.py")):
        rel = path.relative_to(PACKAGE).as_posix()
        if rel != "atomic.py":
            found += [f"scalegen/{rel}:{n}" for n in _renames(path)]
    assert not found, "rename through scalegen.atomic (write_*, writing, staged_folder, replace): " + ", ".join(found)
    assert _renames(PACKAGE / "atomic.py")  # the check sees the renames it must refuse
