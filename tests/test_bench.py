"""Benchmarks run end to end on a tiny budget and report what their JSON promises."""
import json
import subprocess
import sys

import pytest

from conftest import TINY


@pytest.mark.slow
def test_saturation_bench_json(tmp_path):
    out = tmp_path / "sat.json"
    r = subprocess.run([sys.executable, "-m", "scalegen.cli", "bench", "saturation", "--out", str(tmp_path),
                        "--json", str(out), *TINY, "train.max_steps=3"], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-2000:]
    data = json.loads(out.read_text())
    assert set(data) == {"sds_cfg100", "asd_cfg7.5"}
    for v in data.values():
        assert {"color_error", "psnr"} <= set(v) and v["steps"] == 3


def test_unknown_bench_is_a_clear_error():
    r = subprocess.run([sys.executable, "-m", "scalegen.cli", "bench", "nope"], capture_output=True, text=True)
    assert r.returncode == 2 and "choose from" in r.stderr and "Traceback" not in r.stderr
