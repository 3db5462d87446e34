"""The cluster files: accelerate configs that accelerate itself can load, SLURM scripts that bash can
parse and that launch train.py, a Dockerfile whose COPY sources exist and whose entry point parses."""
from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("name, kind, processes", [
    ("accelerate_1gpu.yaml", "NO", 1), ("accelerate_8gpu_ddp.yaml", "MULTI_GPU", 8),
    ("accelerate_2node_16gpu.yaml", "MULTI_GPU", 16), ("deepspeed_zero2.yaml", "DEEPSPEED", 8),
])
def test_accelerate_configs_load(name, kind, processes):
    from accelerate.commands.config.config_args import load_config_from_file

    cfg = load_config_from_file(str(ROOT / "launch" / name))
    assert cfg.distributed_type.value == kind and cfg.num_processes == processes and cfg.mixed_precision == "bf16"
    if kind == "DEEPSPEED":
        assert cfg.deepspeed_config["zero_stage"] == 2


@pytest.mark.parametrize("script", ["slurm_train.sbatch", "slurm_torchrun.sbatch"])
def test_slurm_scripts_parse_and_requeue_on_the_preemption_code(script):
    text = (ROOT / "launch" / script).read_text()
    assert subprocess.run(["bash", "-n", str(ROOT / "launch" / script)]).returncode == 0
    assert "train.py" in text and "--resume auto" in text and "scontrol requeue" in text
    assert '"$status" -eq 75' in text and "#SBATCH --signal=TERM@" in text
    from scalegen.train.distributed import PREEMPTED_EXIT

    assert PREEMPTED_EXIT == 75


def test_dockerfile_copies_what_exists_and_its_entry_point_parses(tmp_path):
    text = (ROOT / "Dockerfile").read_text()
    for src in re.findall(r"^COPY (.+) \S+$", text, flags=re.M):
        for path in src.split():
            assert (ROOT / path).exists(), f"Dockerfile copies {path}, which is not in the repository"
    entry = json.loads(re.search(r"^ENTRYPOINT (\[.*\])$", text, flags=re.M).group(1))
    cmd = json.loads(re.search(r"^CMD (\[.*\])$", text, flags=re.M).group(1))
    assert entry == ["accelerate", "launch", "train.py"]
    r = subprocess.run([sys.executable, str(ROOT / "train.py"), *cmd], capture_output=True, text=True, cwd=tmp_path)
    assert r.returncode == 0 and "--config" in r.stdout and "--resume" in r.stdout
