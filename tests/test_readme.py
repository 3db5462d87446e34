"""README.md is the front page: it opens with the two set-up commands, stays short, and every link in it resolves.
The CPU smoke sequences of the Stable Diffusion and MVDream page (blocks marked `<!-- smoke -->`) run exactly as
printed, in order, in a fresh folder (only the repository's configs/ copied in, as in a fresh clone)."""
from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SMOKE_PAGE = ROOT / "docs" / "sd-mvdream.md"


def smoke_blocks(page: str) -> list[str]:
    return re.findall(r"<!-- smoke -->\n```bash\n(.*?)```", page, flags=re.S)


def test_readme_opens_with_the_two_setup_commands_and_stays_short():
    readme = (ROOT / "README.md").read_text()
    assert len(readme.splitlines()) <= 250
    first = re.search(r"```bash\n(.*?)```", readme, flags=re.S).group(1)
    a, b = (re.search(rf"^# \({x}\)[^\n]*\n(.+)$", first, flags=re.M).group(1) for x in "ab")
    assert "scalegen train --out runs/quickstart" in a and "scalegen eval" in a and "scalegen generate" in a
    # the README's test command is the one CI runs
    assert b.split("&&")[-1].strip() in (ROOT / ".ci" / "run").read_text()


def _hooks():
    import importlib.util

    spec = importlib.util.spec_from_file_location("docs_hooks", ROOT / "tools" / "docs_hooks.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_readme_links_resolve():
    readme = (ROOT / "README.md").read_text()
    links = [l.split("#")[0] for l in re.findall(r"\]\(([^)\s]+)\)", readme) if not re.match(r"[a-z]+:", l)]
    assert links, "the README links to the documentation pages"
    generated = {f"docs/{page}" for page in _hooks().generated_pages()}  # built by mkdocs, not committed
    missing = [l for l in links if l and not (ROOT / l).exists() and l not in generated]
    assert not missing, f"README links to files that do not exist: {missing}"


def test_the_sd_page_has_the_smoke_blocks():
    blocks = smoke_blocks(SMOKE_PAGE.read_text())
    assert len(blocks) == 3 and "prior make-tiny" in blocks[0] and "data build" in blocks[1]
    assert "prior convert-mvdream" in blocks[2]


@pytest.mark.slow
def test_smoke_sequences_run_as_printed(tmp_path):
    pytest.importorskip("diffusers")
    shutil.copytree(ROOT / "configs", tmp_path / "configs")
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
           "OMP_NUM_THREADS": "1", "WANDB_MODE": "disabled"}
    for block in smoke_blocks(SMOKE_PAGE.read_text()):
        r = subprocess.run(["bash", "-e", "-c", block], cwd=tmp_path, env=env, capture_output=True, text=True)
        assert r.returncode == 0, f"docs/sd-mvdream.md block failed:\n{block}\n{r.stderr[-3000:]}"
    for run in ("runs/tiny-sd", "runs/tiny-sd-shards", "runs/tiny-mv"):
        assert (tmp_path / run / "checkpoints" / "step_0000020" / "model.safetensors").is_file()


def _md_table(text: str, header_start: str) -> tuple[list[str], list[list[str]]]:
    lines = text.splitlines()
    i = next(k for k, ln in enumerate(lines) if ln.startswith(header_start))
    rows = []
    for ln in lines[i:]:
        if not ln.startswith("|"):
            break
        rows.append([c.strip() for c in ln.strip().strip("|").split("|")])
    return rows[0], rows[2:]


def test_readme_figures_are_the_committed_results():
    """The README's figures are copies of docs/results/*.json: a re-measured figure must be changed in both."""
    import json

    readme = (ROOT / "README.md").read_text()
    cols, rows = _md_table(readme, "| generator | config | steps | PSNR seen")
    table = json.loads((ROOT / "docs/results/generators-oracle.json").read_text())["tables"][0]
    truth = {r[0]: dict(zip(table["columns"], r)) for r in table["rows"]}
    assert {r[0] for r in rows} == set(truth)
    for r in rows:
        for c, v in zip(cols, r):
            assert truth[r[0]][c] == v, (r[0], c, v, truth[r[0]][c])
    out = re.search(r"```\nsplit +PSNR.*?```", readme, flags=re.S).group(0).splitlines()
    quick = json.loads((ROOT / "docs/results/quickstart.json").read_text())["tables"][0]
    printed = {ln.split()[0]: ln.split()[1:] for ln in out[3:5]}
    assert printed == {r[0]: r[1:] for r in quick["rows"]}
