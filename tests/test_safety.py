"""Nothing lost, nothing mixed: folder locks (one writer per output folder, stale locks taken over),
Ctrl-C that keeps the work and says how to go on, and weights checked against their recorded digest."""
from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import TINY

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


def _env(**extra):
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT), "WANDB_MODE": "disabled", **extra}


HOLDER = ("import sys, time\n"
          "from scalegen.locks import FolderLock\n"
          "lock = FolderLock(sys.argv[1], 'scalegen train').acquire()\n"
          "print('held', flush=True)\n"
          "time.sleep(60)\n")


def _holder(folder: Path, **env) -> subprocess.Popen:
    """A live process on this host that holds ``folder``'s lock (until killed)."""
    p = subprocess.Popen([sys.executable, "-c", HOLDER, str(folder)], env=_env(**env), stdout=subprocess.PIPE, text=True)
    assert p.stdout.readline().strip() == "held"
    return p


def _losses(run: Path) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines())}


# ------------------------------------------------------------------------------------------ locks
def test_a_live_holder_refuses_a_second_writer_naming_its_pid_and_host(tmp_path, capsys):
    from scalegen.cli import main
    from scalegen.locks import FolderLock, FolderLocked

    run = tmp_path / "run"
    holder = _holder(run)
    try:
        with pytest.raises(FolderLocked, match=f"pid {holder.pid} on host {socket.gethostname()}"):
            FolderLock(run, "scalegen train").acquire()
        # the real command: one line, exit 2, nothing written into the folder
        assert main(["train", "--out", str(run), *TINY, "train.max_steps=1"]) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and "Traceback" not in err
        assert f"'{run}' is being written by scalegen train (pid {holder.pid} on host" in err and "wait for it" in err
        assert not run.exists()
        # the other writing commands take the same lock
        corpus = tmp_path / "c.json"
        corpus.write_text(json.dumps({"train": ["a red car", "a blue car"]}))
        assert main(["data", "build", "--corpus", str(corpus), "--out", str(run)]) == 2
        assert f"pid {holder.pid}" in capsys.readouterr().err
        assert not run.exists()
    finally:
        holder.kill()
        holder.wait()


def test_a_killed_holders_lock_is_taken_over_with_a_line(tmp_path, capsys):
    from scalegen.cli import main
    from scalegen.locks import lock_path

    run = tmp_path / "run"
    holder = _holder(run)
    holder.kill()  # SIGKILL: no chance to remove its lock
    holder.wait()
    assert lock_path(run).is_file()
    assert main(["train", "--out", str(run), *TINY, "train.max_steps=1"]) == 0
    out = capsys.readouterr().out
    assert f"'{run}': took over the lock of pid {holder.pid} on host {socket.gethostname()}, which is no longer " \
           "running" in out
    assert not lock_path(run).exists()  # released at the end
    assert (run / "checkpoints" / "step_0000001").is_dir()


def test_other_hosts_locks_go_stale_by_heartbeat(tmp_path):
    """On a shared filesystem a pid of another host cannot be checked: its lock stands while its
    heartbeat (the file's mtime) is fresh, and is taken over once it is older than the stale limit."""
    from scalegen.locks import FolderLock, FolderLocked, lock_path

    run = tmp_path / "run"
    lock_path(run).write_text(json.dumps({"host": "node-17", "pid": 4242, "start": time.time(),
                                          "command": "scalegen train", "job": None}))
    with pytest.raises(FolderLocked, match="pid 4242 on host node-17"):
        FolderLock(run, "scalegen train", stale_s=60).acquire()
    old = time.time() - 120
    os.utime(lock_path(run), (old, old))
    said = []
    lock = FolderLock(run, "scalegen train", stale_s=60, log=said.append).acquire()
    assert said and "pid 4242 on host node-17, whose heartbeat stopped" in said[0]
    assert json.loads(lock_path(run).read_text())["pid"] == os.getpid()
    lock.release()
    assert not lock_path(run).exists()


def test_the_holder_refreshes_its_heartbeat(tmp_path):
    from scalegen.locks import FolderLock, lock_path

    lock = FolderLock(tmp_path / "run", "x", heartbeat_s=0.05).acquire()
    try:
        old = time.time() - 1000
        os.utime(lock_path(tmp_path / "run"), (old, old))
        time.sleep(0.3)
        assert time.time() - lock_path(tmp_path / "run").stat().st_mtime < 5
    finally:
        lock.release()


def test_ranks_of_one_job_do_not_refuse_each_other(tmp_path):
    """Only rank 0 takes the lock; rank 1 of the same launch writes beside it. A restarted job (same
    torchrun rendezvous id) takes over its earlier attempt's lock even while that process lives."""
    from scalegen.locks import FolderLock, FolderLocked, lock_path

    run = tmp_path / "run"
    with FolderLock(run, "scalegen train", rank=0):
        FolderLock(run, "scalegen train", rank=1).acquire().release()  # no refusal
        with FolderLock(run, "scalegen refine", rank=0):  # nested in one process
            pass
        assert lock_path(run).is_file()
    assert not lock_path(run).exists()

    holder = _holder(run, TORCHELASTIC_RUN_ID="job-a")
    try:
        os.environ["TORCHELASTIC_RUN_ID"] = "job-b"
        with pytest.raises(FolderLocked):  # another job: refused
            FolderLock(run, "scalegen train").acquire()
        os.environ["TORCHELASTIC_RUN_ID"] = "job-a"
        said = []
        FolderLock(run, "scalegen train", log=said.append).acquire().release()
        assert "an earlier attempt of this job (torchrun-job-a" in said[0]
    finally:
        os.environ.pop("TORCHELASTIC_RUN_ID", None)
        holder.kill()
        holder.wait()


def test_a_run_folder_without_checkpoint_is_not_taken_over(tmp_path, capsys):
    """config.yaml + metrics.jsonl of another run and no checkpoint yet: refused without --resume."""
    from scalegen.cli import main

    run = tmp_path / "run"
    assert main(["train", "--out", str(run), *TINY, "train.max_steps=1"]) == 0
    import shutil

    shutil.rmtree(run / "checkpoints")
    before = (run / "config.yaml").read_text(), (run / "metrics.jsonl").read_text()
    capsys.readouterr()
    assert main(["train", "--out", str(run), *TINY, "train.max_steps=2", "train.seed=7"]) == 2
    err = capsys.readouterr().err
    assert "holds another run (its config.yaml) with no checkpoint yet; pass --resume" in err
    assert ((run / "config.yaml").read_text(), (run / "metrics.jsonl").read_text()) == before


# ------------------------------------------------------------------------------------- interrupts
def _start_training(run: Path, extra: list[str]) -> subprocess.Popen:
    return subprocess.Popen([str(BIN / "scalegen"), "train", "--out", str(run), *TINY, *extra], env=_env(),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=run.parent)


def _wait_for_steps(run: Path, n: int, proc: subprocess.Popen, timeout: float = 120) -> None:
    t0 = time.time()
    while time.time() - t0 < timeout:
        p = run / "metrics.jsonl"
        if p.is_file() and len(p.read_text().splitlines()) >= n:
            return
        assert proc.poll() is None, proc.communicate()
        time.sleep(0.05)
    raise AssertionError(f"training did not reach step {n}")


@pytest.mark.slow
def test_ctrl_c_checkpoints_and_resume_equals_an_uninterrupted_run(tmp_path, capsys):
    """A real trainer in a subprocess: a second trainer on its folder is refused; Ctrl-C (SIGINT)
    finishes the step, writes a checkpoint, names the exact resume command and step, exits 130; the
    resumed run's losses equal an uninterrupted run's, step for step."""
    from scalegen.cli import main

    extra = ["train.max_steps=150", "train.log_every=1", "train.ckpt_every=1000", "train.val_every=1000",
             "optim.lr_schedule=cosine"]
    full = tmp_path / "full"
    assert main(["train", "--out", str(full), *TINY, *extra]) == 0
    run = tmp_path / "run"
    proc = _start_training(run, extra)
    try:
        _wait_for_steps(run, 5, proc)
        capsys.readouterr()
        assert main(["train", "--out", str(run), *TINY, *extra]) == 2  # the second trainer
        assert f"is being written by scalegen train (pid {proc.pid} on host" in capsys.readouterr().err
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=60)
    finally:
        proc.kill()
    assert proc.returncode == 130, err
    last = err.strip().splitlines()[-1]
    step = int(last.rsplit("resumes at step ", 1)[1].rstrip(")"))
    assert 5 <= step < 150, "the interrupt came too late to test anything"
    assert last == (f"stopped: interrupted after step {step}; checkpoint {run}/checkpoints/step_{step:07d} is written; "
                    f"continue with `scalegen train --out {run} --resume` (resumes at step {step})")
    assert "interrupt: finishing this step and writing a checkpoint" in err and "Traceback" not in err
    assert "step_0000000" not in err and (run / "checkpoints" / f"step_{step:07d}" / "model.safetensors").is_file()
    assert main(["train", "--out", str(run), "--resume"]) == 0
    a, b = _losses(full), _losses(run)
    assert sorted(b) == list(range(1, 151)) and a == b


def test_a_second_ctrl_c_stops_at_once():
    from scalegen.train.distributed import StopSignal

    said = []
    before = signal.getsignal(signal.SIGINT)  # default_int_handler, or SIG_IGN when started in the background
    with StopSignal(announce=said.append) as stop:
        os.kill(os.getpid(), signal.SIGINT)
        time.sleep(0.05)
        assert stop.interrupted and "Ctrl-C again to quit at once" in said[0]
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(1)
    assert signal.getsignal(signal.SIGINT) is before  # the handler the process had is back


def test_an_interrupted_training_without_checkpoint_says_so(tmp_path, capsys, monkeypatch):
    """The second Ctrl-C (or one before the loop): the CLI names the last checkpoint and its step, or says
    there is none, in one line."""
    from scalegen.cli import main
    from scalegen.train import loop

    run = tmp_path / "run"
    assert main(["train", "--out", str(run), *TINY, "train.max_steps=2"]) == 0

    def interrupted(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(loop, "train", interrupted)
    capsys.readouterr()
    assert main(["train", "--out", str(run), "--resume", "train.max_steps=4"]) == 130
    err = capsys.readouterr().err.strip()
    assert err == (f"interrupted: stopped at once (the steps after the last checkpoint are lost); continue with "
                   f"`scalegen train --out {run} --resume` (resumes at step 2)")


def test_interrupted_data_build_says_what_is_kept(tmp_path, capsys, monkeypatch):
    from scalegen.cli import main
    from scalegen.data import shards

    corpus = tmp_path / "c.json"
    corpus.write_text(json.dumps({"train": [f"a red car number {i}" for i in range(30)]}))

    def stop(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(shards, "write_manifest", stop)  # every shard written, then Ctrl-C
    out = tmp_path / "sh"
    assert main(["data", "build", "--corpus", str(corpus), "--out", str(out), "--shard-size", "10"]) == 130
    err = capsys.readouterr().err.strip()
    assert err == (f"interrupted: 3 finished shard(s) in '{out}' are kept; rerun the same scalegen data build command "
                   "to build the rest (finished shards are checked and skipped)")
    monkeypatch.undo()
    capsys.readouterr()
    assert main(["data", "build", "--corpus", str(corpus), "--out", str(out), "--shard-size", "10"]) == 0
    assert "wrote 0 shard(s), 3 already finished (resumed)" in capsys.readouterr().out  # what it said was kept is kept


# ---------------------------------------------------------------------------------- verified loading
@pytest.fixture
def trained(tmp_path):
    from scalegen.cli import main

    run = tmp_path / "run"
    assert main(["train", "--out", str(run), *TINY, "train.max_steps=2"]) == 0
    return run


def _flip(path: Path, offset: int, n: int = 1) -> None:
    data = bytearray(path.read_bytes())
    for i in range(offset, offset + n):
        data[i % len(data)] ^= 0xFF
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("where", ["tensor data", "header"])
def test_a_changed_weights_file_is_named_by_generate_eval_and_resume(trained, tmp_path, capsys, where):
    from scalegen.cli import main

    weights = trained / "checkpoints" / "step_0000002" / "model.safetensors"
    size = weights.stat().st_size
    # one byte in the middle of the tensor data (still parses), or the first 4 KB (header and beyond)
    _flip(weights, size // 2) if where == "tensor data" else _flip(weights, 0, min(4096, size))
    capsys.readouterr()
    commands = {"generate": ["generate", "--ckpt", str(trained), "--prompt", "a large red cube", "--out",
                             str(tmp_path / "a.glb"), "--resolution", "16"],
                "eval": ["eval", "--ckpt", str(trained), "--max-prompts", "1"],
                "train --resume": ["train", "--out", str(trained), "--resume", "train.max_steps=3"]}
    for name, argv in commands.items():
        assert main(argv) == 2, name
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and "Traceback" not in err, (name, err)
        assert f"checkpoint file '{weights}' does not match the sha256 recorded in its state.json" in err, (name, err)
    assert not (tmp_path / "a.glb").exists()
    assert not (trained / "checkpoints" / "step_0000003").exists()


def test_a_checkpoint_records_the_digest_of_each_file(trained):
    from scalegen.train.checkpoint import CHECKED_FILES, file_sha256

    ckpt = trained / "checkpoints" / "step_0000002"
    files = json.loads((ckpt / "state.json").read_text())["files"]
    assert set(files) == set(CHECKED_FILES) and all(files[f] == file_sha256(ckpt / f) for f in CHECKED_FILES)


def test_resume_with_an_override_that_changes_a_shape_names_the_key(trained, capsys):
    from scalegen.cli import main

    capsys.readouterr()
    assert main(["train", "--out", str(trained), "--resume", "generator.mlp_hidden=24", "train.max_steps=3"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "generator.mlp_hidden=24 (the run has 16) changes the shape of model." in err
    assert not (trained / "checkpoints" / "step_0000003").exists()
    assert "mlp_hidden: 16" in (trained / "config.yaml").read_text()  # the run's config is left as it was


def test_interrupted_generate_says_nothing_was_written(trained, tmp_path, capsys, monkeypatch):
    from scalegen.cli import main
    from scalegen.export import pipeline

    def stop(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(pipeline, "generate_assets", stop)
    out = tmp_path / "a.glb"
    capsys.readouterr()
    assert main(["generate", "--ckpt", str(trained), "--prompt", "a large red cube", "--out", str(out),
                 "--resolution", "16"]) == 130
    err = capsys.readouterr().err.strip()
    assert err == (f"interrupted: no asset was written to '{out}' (assets are moved into place only when all "
                   "are generated); rerun the same scalegen generate command")
    assert not out.exists() and not (tmp_path / ".a.glb.lock").exists()  # the lock is released too


def test_a_folder_whose_parent_cannot_be_written_is_one_line(tmp_path, capsys, monkeypatch):
    """A lock file that cannot be created (a read-only parent; simulated, as root writes anywhere)."""
    from scalegen import locks
    from scalegen.cli import main

    real_open = os.open

    def read_only(path, *a, **k):
        if str(path).endswith(".lock"):
            raise PermissionError(13, "Permission denied")
        return real_open(path, *a, **k)

    monkeypatch.setattr(locks.os, "open", read_only)
    assert main(["train", "--out", str(tmp_path / "run"), *TINY, "train.max_steps=1"]) == 2
    err = capsys.readouterr().err.strip()
    assert err == (f"error: cannot create the lock file {tmp_path / '.run.lock'} of '{tmp_path / 'run'}' (Permission "
                   "denied); choose an output folder whose parent folder you can write to")
    assert not (tmp_path / "run").exists()


def test_a_benchmark_interrupted_in_its_training_says_how_to_rerun_it(tmp_path, capsys, monkeypatch):
    """The first Ctrl-C inside a benchmark's training checkpoints that run; the line is the benchmark's."""
    from scalegen import bench
    from scalegen.cli import main
    from scalegen.errors import Interrupted

    def interrupted(*a, **k):
        raise Interrupted("interrupted after step 3; ...")

    monkeypatch.setattr(bench, "run_bench", interrupted)
    out = tmp_path / "b"
    assert main(["bench", "toy2d", "--json", str(tmp_path / "t.json"), "--out", str(out)]) == 130
    assert capsys.readouterr().err.strip() == (f"interrupted: no figures were written to {tmp_path / 't.json'}; the "
                                               f"benchmark's runs so far stay in '{out}'; rerun the same scalegen bench "
                                               "command")


@pytest.mark.slow
@pytest.mark.distributed
def test_every_rank_of_a_launch_stops_when_rank_0_is_refused(tmp_path):
    """Two ranks under torchrun on a folder another process writes: rank 0 is refused and rank 1 learns
    it at once (no rank waits at a barrier until the collective timeout); one line names the holder."""
    run = tmp_path / "run"
    holder = _holder(run)
    try:
        t0 = time.time()
        r = subprocess.run([str(BIN / "torchrun"), "--nproc_per_node", "2", "--master_port", "29643",
                            str(ROOT / "train.py"), "--out", str(run), *TINY, "train.max_steps=2",
                            "train.collective_timeout_s=600"], check=False, cwd=tmp_path, env=_env(), capture_output=True,
                           text=True, timeout=300)
        took = time.time() - t0
    finally:
        holder.kill()
        holder.wait()
    assert r.returncode != 0 and took < 240, (r.returncode, took)
    assert f"error: '{run}' is being written by scalegen train (pid {holder.pid} on host" in r.stderr
    assert "is locked by another process (process 0 of this job says who)" in r.stderr  # rank 1's line
    assert str(ROOT / "scalegen") not in r.stderr  # no traceback of ours (torchrun reports the exit code with its own)
    assert not run.exists()


def test_eval_clip_is_locked_and_keeps_its_scores_on_ctrl_c(tmp_path, capsys, monkeypatch):
    pytest.importorskip("transformers")
    import torch
    from PIL import Image

    from scalegen.cli import main
    from scalegen.eval import clip as clip_mod
    from scalegen.eval.clip_models import make_tiny_clip_model

    model = make_tiny_clip_model(tmp_path / "clip", backend="transformers")
    prompts = [f"a {c} {s}" for c in ("red", "green", "blue") for s in ("cube", "cone", "torus")]
    g = torch.Generator().manual_seed(0)
    for p in prompts:
        d = tmp_path / "views" / clip_mod.folder_name(p)
        d.mkdir(parents=True)
        for j in range(2):
            Image.fromarray(torch.randint(0, 256, (24, 24, 3), generator=g, dtype=torch.uint8).numpy()).save(d / f"{j}.png")
    (tmp_path / "c.txt").write_text("\n".join(prompts) + "\n")
    out = tmp_path / "out"
    argv = ["eval", "clip", "--images", str(tmp_path / "views"), "--corpus", str(tmp_path / "c.txt"), "--model",
            str(model), "--cache", str(tmp_path / "cache"), "--out", str(out), "--no-progress", "--batch", "16"]
    holder = _holder(out)
    try:
        assert main(argv) == 2
        assert f"is being written by scalegen train (pid {holder.pid} on host" in capsys.readouterr().err
    finally:
        holder.kill()
        holder.wait()
    real, served = clip_mod.FolderViews.views, []

    def views(self, ps):  # Ctrl-C after 4 prompts were scored (2 per group)
        if len(served) >= 4:
            raise KeyboardInterrupt
        served.extend(ps)
        return real(self, ps)

    monkeypatch.setattr(clip_mod.FolderViews, "views", views)
    capsys.readouterr()
    assert main(argv) == 130
    last = capsys.readouterr().err.strip().splitlines()[-1]  # (transformers' own loading bar comes before)
    assert last == (f"interrupted: the prompts scored so far are kept in '{out}' (progress/); rerun the same scalegen "
                    "eval clip command to score the rest")
    assert len((out / "progress" / "part-0.jsonl").read_text().splitlines()) == 4
    monkeypatch.setattr(clip_mod.FolderViews, "views", real)
    assert main(argv) == 0
    assert len((out / "per_prompt.csv").read_text().splitlines()) == 1 + len(prompts)
