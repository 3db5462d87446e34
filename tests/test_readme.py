"""The README's CPU smoke sequences run exactly as printed, in order, in a fresh folder (only the
repository's configs/ copied in, as in a fresh clone): the blocks marked `<!-- smoke -->`."""
from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def smoke_blocks(readme: str) -> list[str]:
    return re.findall(r"<!-- smoke -->\n```bash\n(.*?)```", readme, flags=re.S)


def test_readme_has_the_smoke_blocks():
    blocks = smoke_blocks((ROOT / "README.md").read_text())
    assert len(blocks) == 3 and "prior make-tiny" in blocks[0] and "data build" in blocks[1]
    assert "prior convert-mvdream" in blocks[2]


@pytest.mark.slow
def test_readme_smoke_sequences_run_as_printed(tmp_path):
    pytest.importorskip("diffusers")
    shutil.copytree(ROOT / "configs", tmp_path / "configs")
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
           "OMP_NUM_THREADS": "1", "WANDB_MODE": "disabled"}
    for block in smoke_blocks((ROOT / "README.md").read_text()):
        r = subprocess.run(["bash", "-e", "-c", block], cwd=tmp_path, env=env, capture_output=True, text=True)
        assert r.returncode == 0, f"README block failed:\n{block}\n{r.stderr[-3000:]}"
    for run in ("runs/tiny-sd", "runs/tiny-sd-shards", "runs/tiny-mv"):
        assert (tmp_path / run / "checkpoints" / "step_0000020" / "model.safetensors").is_file()
