"""Reports for people and machines: the plain-text table every ``eval`` and ``bench`` command
prints, and the JSON file ``--json FILE`` writes with the same figures."""
from __future__ import annotations

from pathlib import Path

from scalegen import atomic
from scalegen.errors import ScalegenError


def format_table(rows: list[list], header: list[str]) -> str:
    """Left-aligned first column, right-aligned others; floats with 3 decimals."""
    cells = [header] + [[f"{c:.3f}" if isinstance(c, float) else str(c) for c in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]

    def line(r: list[str]) -> str:
        return "  ".join(c.rjust(w) if i else c.ljust(w) for i, (c, w) in enumerate(zip(r, widths)))

    return "\n".join([line(cells[0]), line(["-" * w for w in widths])] + [line(r) for r in cells[1:]])


def write_json(path: str | Path | None, data: dict) -> None:
    """Write ``data`` to ``path`` (nothing when ``path`` is None) atomically (scalegen.atomic); the
    folder must exist."""
    if path:
        p = Path(path)
        if not p.parent.is_dir():
            raise ScalegenError(f"cannot write '{path}': folder '{p.parent}' does not exist")
        atomic.write_json(p, data)
