"""The documentation cannot drift from what it documents: the configuration reference is generated from the schema
and lists every key; every committed figure carries its command and provenance; `scalegen bench --json` records
the command line, date and commit; the site builds with --strict; code comments state no measured figures."""
from __future__ import annotations

import importlib.util
import io
import json
import re
import shutil
import subprocess
import sys
import tokenize
from datetime import datetime
from pathlib import Path

import pytest

from scalegen import config as config_mod

ROOT = Path(__file__).resolve().parents[1]


def _hooks():
    spec = importlib.util.spec_from_file_location("docs_hooks", ROOT / "tools" / "docs_hooks.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _rows(page: str) -> dict[str, list[str]]:
    """key -> the cells of its row in the reference's tables."""
    out = {}
    for ln in page.splitlines():
        m = re.match(r"^\| `([a-z0-9_.]+)` \|", ln)
        if m:
            out[m.group(1)] = [c.strip() for c in re.split(r"(?<!\\)\|", ln.strip())[1:-1]]
    return out


def test_configuration_reference_lists_every_key_of_the_schema():
    rows = _rows(_hooks().config_reference())
    keys = config_mod._keys(config_mod.Config)
    assert len(keys) > 100  # the schema as a whole, nested sections (prior.oracle.*, generator.gaussians.*) included
    missing = [k for k in keys if k not in rows]
    assert not missing, f"keys of scalegen/config.py missing from the configuration reference: {missing}"
    assert set(rows) == set(keys)  # and nothing that is not a key


def test_configuration_reference_shows_type_default_range_and_comment():
    rows = _rows(_hooks().config_reference())
    cfg = config_mod.Config()
    for key, (_, tp, default, rng, doc) in rows.items():
        value = cfg
        for part in key.split("."):
            value = getattr(value, part)
        assert default == "`" + json.dumps(value, ensure_ascii=False) + "`", key  # the schema's own default
        assert tp, key
    assert rows["data.prompts_per_step"][1:4] == ["int", "`8`", "≥ 1"]
    assert rows["data.prompts_per_step"][4] == "per process"  # the comment beside the field
    assert rows["camera.sphere_uniform_fraction"][3] == "≥ 0, ≤ 1"
    assert rows["data.on_corrupt"][1] == "one of `fail`, `skip`"
    assert rows["data.shards"][1] == "str or null"
    # a comment written above a field is its description too
    assert "every prompt starts as this sphere" in rows["generator.sdf_radius"][4]


def _results() -> dict[str, dict]:
    return {p.stem: json.loads(p.read_text()) for p in sorted((ROOT / "docs" / "results").glob("*.json"))}


def test_every_committed_figure_carries_its_command_and_provenance():
    results = _results()
    assert results
    notes = ROOT / "docs" / "notes"
    for name, data in results.items():
        assert "meta" in data, f"docs/results/{name}.json has no meta: rerun its bench with --json (or add its command)"
        meta = data["meta"]
        assert meta.get("command"), name
        assert meta.get("date"), name
        if "source" not in meta:  # written by a command (`scalegen bench --json`, or its command recorded at merge)
            assert meta["commit"], name
        else:  # transcribed from the old performance.md: the source names the dated note, which exists
            m = re.fullmatch(r"transcribed from docs/performance\.md, entry of (\d{4}-\d\d-\d\d) "
                             r"\(now docs/notes/(\S+\.md)\)", meta["source"])
            assert m and (notes / m.group(2)).is_file() and m.group(2).startswith(m.group(1)), (name, meta["source"])
        for note in data.get("see", []):
            assert (notes / note).is_file(), (name, note)


def test_results_pages_show_every_figure_beside_its_command():
    hooks = _hooks()
    pages = hooks.generated_pages()
    for name, data in _results().items():
        page = pages[f"results/{name}.md"]
        cmds = data["meta"]["command"]
        for cmd in cmds if isinstance(cmds, list) else [cmds]:
            assert cmd in page
        for table in data.get("tables", []):
            for row in table["rows"]:
                assert "| " + " | ".join(hooks._cell(c) for c in row) + " |" in page, (name, row)
        assert f"results/{name}.md" in pages["results/index.md"].replace("](", "](results/")


def test_generic_results_page_renders_what_a_bench_wrote():
    """A bench's own JSON (no transcribed tables) is rendered whatever its shape: flat figures, a table of rows."""
    hooks = _hooks()
    page = hooks.results_page("x", {"meta": {"argv": ["bench", "x"], "command": "scalegen bench x", "date": "d",
                                             "commit": "abc"},
                                    "sds": {"psnr": 31.74, "iou": 0.903}, "asd": {"psnr": 21.72, "iou": 0.759},
                                    "steps": 150})
    assert "scalegen bench x" in page and "| commit | abc |" in page
    assert "| sds | 31.74 | 0.903 |" in page and "| asd | 21.72 | 0.759 |" in page and "| steps | 150 |" in page
    bare = hooks.results_page("y", [{"psnr": 1.5}])  # no meta, not a dict: rendered, and flagged
    assert "No command recorded" in bare and "| 0 | 1.5 |" in bare


def test_claims_page_lists_every_claim_with_its_verdict():
    claims = json.loads((ROOT / "docs" / "claims.json").read_text())["claims"]
    page = _hooks().generated_pages()["results/claims.md"]
    for c in claims:
        assert f"**{c['verdict']}**" in page and c["claim"].split()[0] in page


def test_bench_json_records_the_command_date_and_commit(tmp_path, monkeypatch):
    import scalegen.bench
    from scalegen.cli import main

    seen = {}

    def fake_run_bench(name, items, out_root):
        seen.update(name=name, items=items)
        return {"psnr": 1.0}

    monkeypatch.setattr(scalegen.bench, "run_bench", fake_run_bench)
    out = tmp_path / "b.json"
    argv = ["bench", "saturation", "--json", str(out), "bench.steps=3", "train.max_steps=5"]
    assert main(argv) == 0
    data = json.loads(out.read_text())
    assert data["psnr"] == 1.0 and seen == {"name": "saturation", "items": ["bench.steps=3", "train.max_steps=5"]}
    meta = data["meta"]
    assert meta["argv"] == argv and meta["command"] == "scalegen " + " ".join(argv)
    assert datetime.fromisoformat(meta["date"]).tzinfo is not None
    if shutil.which("git") and (ROOT / ".git").exists():
        head = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "HEAD"], capture_output=True, text=True)
        assert meta["commit"] == head.stdout.strip() and isinstance(meta["dirty"], bool)


def test_notes_are_dated_and_indexed():
    notes = ROOT / "docs" / "notes"
    index = (notes / "index.md").read_text()
    files = sorted(p.name for p in notes.glob("*.md") if p.name != "index.md")
    assert files
    for name in files:
        assert re.fullmatch(r"\d{4}-\d\d-\d\d-[a-z0-9-]+\.md", name), name
        assert f"]({name})" in index, name


def test_site_builds_strict(tmp_path):
    pytest.importorskip("mkdocs")
    pytest.importorskip("material")
    mkdocs = Path(sys.executable).parent / "mkdocs"
    cmd = [str(mkdocs)] if mkdocs.exists() else [sys.executable, "-m", "mkdocs"]
    r = subprocess.run([*cmd, "build", "--strict", "-d", str(tmp_path / "site")], cwd=ROOT, capture_output=True,
                       text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    html = (tmp_path / "site" / "configuration" / "index.html").read_text()
    assert "data.prompts_per_step" in html


MEASURED = re.compile(r"\d+(\.\d+)? ?dB\b|\d+(\.\d+)? ?s/step|\d+(\.\d+)? ?% (faster|slower)|~?\d+(\.\d+)?x (faster|slower)")
# bench/claims.py states its verdict rules' minimum effects (MIN_PSNR, ...): thresholds fixed before measuring.
THRESHOLDS = {"scalegen/bench/claims.py"}


def _comments_and_docstrings(source: str):
    prev = tokenize.NEWLINE
    for tok in tokenize.generate_tokens(io.StringIO(source).readline):
        if tok.type == tokenize.COMMENT:
            yield tok.start[0], tok.string
        elif tok.type == tokenize.STRING and prev in (tokenize.NEWLINE, tokenize.INDENT, tokenize.DEDENT, tokenize.NL):
            yield tok.start[0], tok.string
        if tok.type not in (tokenize.COMMENT, tokenize.NL):
            prev = tok.type


def test_code_comments_state_no_measured_figures():
    found = []
    for path in sorted((ROOT / "scalegen").rglob("*.py")):
        rel = path.relative_to(ROOT).as_posix()
        if rel in THRESHOLDS:
            continue
        for line, text in _comments_and_docstrings(path.read_text()):
            if MEASURED.search(text):
                found.append(f"{rel}:{line}: {MEASURED.search(text).group(0)}")
    for path in sorted((ROOT / "configs").rglob("*.yaml")):
        for i, ln in enumerate(path.read_text().splitlines(), 1):
            if "#" in ln and MEASURED.search(ln[ln.index("#"):]):
                found.append(f"{path.relative_to(ROOT)}:{i}")
    assert not found, f"measured figures in comments (put them in docs/results and point there): {found}"
