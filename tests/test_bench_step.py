"""`scalegen bench step`: it profiles the real training step and its stages account for the step."""
import json

import pytest

from conftest import TINY
from scalegen.cli import main
from scalegen.config import load_config
from scalegen.train.loop import train


def test_step_bench_stages_sum_to_the_step_and_losses_are_the_training_loops(tmp_path, capsys):
    out = tmp_path / "step.json"
    assert main(["bench", "step", "--json", str(out), *TINY, "bench.steps=3", "bench.warmup=1",
                 "train.max_steps=4"]) == 0
    printed = capsys.readouterr().out
    assert "renderer" in printed and "backward by autograd node" in printed
    data = json.loads(out.read_text())
    stages = {s["stage"]: s for s in data["stages"]}
    for name in ("text encode", "generator forward", "camera sampling", "renderer", "renderer/field queries",
                 "prior encode", "distiller", "distiller/prior predict_eps", "regularisers", "backward",
                 "optimizer step"):
        assert stages[name]["cpu_s"] >= 0.0 and stages[name]["wall_s"] > 0.0, name
    top = [s for s in data["stages"] if s["depth"] == 0 and s["stage"] != "unaccounted"]
    # The stages are the step: in process-CPU seconds tightly, in wall seconds (which count the waits of
    # a busy machine between stages) loosely.
    for key, share in (("cpu_s", 0.9), ("wall_s", 0.7)):
        total = data[f"step_{key}"]
        assert sum(s[key] for s in top) <= total + 1e-6
        assert sum(s[key] for s in top) >= share * total - 0.002, key
    assert stages["renderer/field queries"]["wall_s"] <= stages["renderer"]["wall_s"]
    assert any(b["node"] == "_HashEncodeBackward" for b in data["backward_nodes"])
    # The bench runs the loop's own step: the same losses as `scalegen train` from the same seed.
    run = tmp_path / "run"
    train(load_config(None, [*TINY, "train.max_steps=4", "train.log_every=1"]), run)
    logged = [json.loads(x)["loss"] for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert data["losses"] == pytest.approx(logged[1:], rel=1e-5)  # after the warm-up step


def test_step_bench_rejects_a_zero_step_count(capsys):
    assert main(["bench", "step", *TINY, "bench.steps=0"]) == 2
    assert "bench.steps must be >= 1" in capsys.readouterr().err
