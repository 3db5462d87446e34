"""Two nodes on one machine: two torchrun agents (each its own process, one rank each) meet through a
c10d rendezvous on localhost, as two machines of a cluster would. They train, checkpoint and resume
with world size 2; a killed node ends the other within train.collective_timeout_s; with
--max-restarts 1 the job restarts after a killed rank and continues from the last checkpoint with no
step repeated or skipped."""
from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import TINY

pytestmark = [pytest.mark.distributed, pytest.mark.slow]
ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
TRAIN = str(ROOT / "train.py")
SMALL = [*TINY, "train.log_every=1", "train.val_every=1000", "train.collective_timeout_s=30"]


def _env():
    # LOGLEVEL=INFO: the agents log their rendezvous (group_rank = the node rank each was given)
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT), "WANDB_MODE": "disabled",
            "LOGLEVEL": "INFO"}


def _nodes(run: Path, port: int, job: str, args: list[str], restarts: int = 0) -> list[subprocess.Popen]:
    """Two torchrun agents, one rank each, rendezvousing over c10d on localhost:``port``."""
    cmd = [str(BIN / "torchrun"), "--nnodes", "2", "--nproc_per_node", "1", "--rdzv-backend", "c10d",
           "--rdzv-endpoint", f"localhost:{port}", "--rdzv-id", job, "--max-restarts", str(restarts),
           "--monitor-interval", "1", TRAIN, "--out", str(run), *SMALL, *args]
    return [subprocess.Popen(cmd, cwd=run.parent, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                             text=True, start_new_session=True) for _ in range(2)]


def _finish(nodes: list[subprocess.Popen], timeout: float = 240) -> list[tuple[int, str, str]]:
    out = []
    try:
        for p in nodes:
            o, e = p.communicate(timeout=timeout)
            out.append((p.returncode, o, e))
    finally:
        for p in nodes:
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGKILL)
                p.wait()
    return out


def _ok(results) -> str:
    for rc, o, e in results:
        assert rc == 0, f"node failed ({rc}):\n{o[-2000:]}\n{e[-3000:]}"
    return "".join(o for _, o, _ in results)


def _metrics(run: Path) -> list[dict]:
    return [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]


def _state(run: Path, step: int) -> dict:
    return json.loads((run / "checkpoints" / f"step_{step:07d}" / "state.json").read_text())


def _wait_steps(run: Path, n: int, nodes, timeout: float = 240) -> None:
    t0 = time.time()
    while time.time() - t0 < timeout:
        p = run / "metrics.jsonl"
        if p.is_file() and len(p.read_text().splitlines()) >= n:
            return
        assert all(x.poll() is None for x in nodes), "a node exited early"
        time.sleep(0.2)
    raise AssertionError(f"training did not reach step {n}")


def _worker_of(agent: subprocess.Popen) -> int:
    """The pid of the one rank an agent started (its child process)."""
    for _ in range(100):
        kids = subprocess.run(["pgrep", "-P", str(agent.pid)], capture_output=True, text=True, check=False).stdout.split()
        if kids:
            return int(kids[0])
        time.sleep(0.1)
    raise AssertionError("the agent started no worker")


def test_two_nodes_train_checkpoint_and_resume(tmp_path):
    run = tmp_path / "run"
    results = _finish(_nodes(run, 29631, "mn-train", ["train.max_steps=3", "train.ckpt_every=2"]))
    out = _ok(results)
    assert "x 2 process(es)" in out and "trained steps 1-3" in out
    ranks = sorted(int(m) for _, _, e in results for m in re.findall(r"group_rank=(\d)", e)[:1])
    assert ranks == [0, 1], "the two agents were not given distinct node ranks"
    st = _state(run, 3)
    assert st["world_size"] == 2 and sorted(st["data"]) == ["0", "1"] and len(set(st["replica_digests"])) == 1
    out = _ok(_finish(_nodes(run, 29632, "mn-resume", ["--resume", "train.max_steps=5", "train.ckpt_every=2"])))
    assert "trained steps 4-5" in out and "resuming a" not in out  # same world size: no remapping
    assert _state(run, 5)["world_size"] == 2 and [m["step"] for m in _metrics(run)] == [1, 2, 3, 4, 5]


def test_killing_one_node_ends_the_other_within_the_collective_timeout(tmp_path):
    run = tmp_path / "run"
    nodes = _nodes(run, 29633, "mn-kill", ["train.max_steps=100000", "train.ckpt_every=100000"])
    try:
        _wait_steps(run, 2, nodes)
        os.kill(_worker_of(nodes[1]), signal.SIGKILL)
        t0 = time.time()
        results = _finish(nodes, timeout=120)
        took = time.time() - t0
    finally:
        for p in nodes:
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGKILL)
    assert all(rc != 0 for rc, _, _ in results), [rc for rc, _, _ in results]
    assert took < 30 + 15, f"the surviving node took {took:.0f} s to stop (train.collective_timeout_s=30)"


@pytest.mark.skipif(os.environ.get("CI") == "true",
                    reason="flaky on a loaded 2-core machine (torchrun's store host exiting first, a restarted rank's "
                           "gloo mesh timing out); run it with `pytest tests/test_multinode.py -m distributed`")
def test_a_restart_after_a_killed_rank_resumes_without_repeating_or_skipping_a_step(tmp_path):
    """torchrun --max-restarts 1 with `--resume auto`: a rank killed after the step-4 checkpoint; both
    nodes restart their ranks, which continue from that checkpoint; every step appears once in the
    metrics and the losses equal an uninterrupted two-node run's."""
    args = ["--resume", "auto", "train.max_steps=10", "train.ckpt_every=4"]
    ref = tmp_path / "ref"
    _ok(_finish(_nodes(ref, 29634, "mn-ref", args)))
    run = tmp_path / "run"
    nodes = _nodes(run, 29635, "mn-restart", args, restarts=1)
    _wait_steps(run, 6, nodes)
    os.kill(_worker_of(nodes[1]), signal.SIGKILL)
    out = _ok(_finish(nodes))
    assert "trained steps 5-10" in out or "trained steps 9-10" in out, out[-2000:]
    steps = [m["step"] for m in _metrics(run)]
    assert steps == list(range(1, 11)), steps
    assert {m["step"]: m["loss"] for m in _metrics(run)} == {m["step"]: m["loss"] for m in _metrics(ref)}
    assert _state(run, 10)["world_size"] == 2
