"""Bad input and interruptions: one-line errors before anything starts, nothing left behind by a
failed start, nothing lost by a crash (docs/reliability.md lists every case and the test covering it)."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest

from conftest import TINY


def _cli(*args, cwd):
    return subprocess.run([sys.executable, "-m", "scalegen.cli", *args], capture_output=True, text=True, cwd=cwd)


@pytest.mark.parametrize("item, needle", [
    ("train.ckpt_every=0", "config key 'train.ckpt_every' must be >= 1, got 0"),
    ("train.val_every=0", "config key 'train.val_every' must be >= 1, got 0"),
    ("train.log_every=0", "config key 'train.log_every' must be >= 1, got 0"),
    ("train.log_every=-5", "config key 'train.log_every' must be >= 1, got -5"),
    ("optim.lr=-1", "config key 'optim.lr' must be > 0, got -1.0"),
    ("optim.group_lr={grid: 0}", "config key 'optim.group_lr.grid' must be > 0"),
    ("optim.betas=[0.9, 1.0]", "config key 'optim.betas' must be < 1"),
    ("data.prompts_per_step=0", "config key 'data.prompts_per_step' must be >= 1"),
    ("render.bg_random_prob=1.5", "config key 'render.bg_random_prob' must be <= 1"),
    ("loss.eikonal=-0.1", "config key 'loss.eikonal' must be >= 0"),
    ("distill.guidance_scale=-7.5", "config key 'distill.guidance_scale' must be >= 0"),
    ("generator.sdf_radius=0.9", "generator.sdf_radius must be smaller than render.bound"),
])
def test_out_of_range_config_stops_before_anything_starts(item, needle, tmp_path, capsys):
    """Every interval, count and rate is range-checked by the schema: exit 2, one line, no run folder."""
    from scalegen.cli import main

    assert main(["train", "--out", str(tmp_path / "run"), item]) == 2
    err = capsys.readouterr().err
    assert needle in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "run").exists()


def test_out_of_range_config_through_the_real_command(tmp_path):
    r = _cli("train", "--out", "run", "train.ckpt_every=0", cwd=tmp_path)
    assert r.returncode == 2 and r.stderr.strip() == "error: config key 'train.ckpt_every' must be >= 1, got 0"
    assert not (tmp_path / "run").exists()


def test_a_failed_start_leaves_nothing_behind(tmp_path, monkeypatch, capsys):
    """A free-text corpus in the oracle world fails before the run folder exists, naming the prior that
    takes free text, so the next attempt with the default out_dir is not redirected by a stale folder."""
    from scalegen.cli import main

    monkeypatch.chdir(tmp_path)
    corpus = tmp_path / "free.txt"
    corpus.write_text("a DSLR photo of a corgi\n")
    assert main(["train", f"data.prompts={corpus}", *TINY]) == 2
    assert "prior.name=stable_diffusion" in capsys.readouterr().err
    assert not (tmp_path / "runs").exists()


def test_a_redirected_run_is_named_at_the_start(tmp_path, monkeypatch, capsys):
    from scalegen.cli import main

    monkeypatch.chdir(tmp_path)
    (tmp_path / "runs" / "default").mkdir(parents=True)
    assert main(["train", *TINY, "train.max_steps=1"]) == 0
    first = capsys.readouterr().out.splitlines()[0]
    assert first.startswith("'runs/default' exists (train.out_dir): this run goes to 'runs/oracle-default-")
    target = first.split("goes to '")[1].split("'")[0]
    assert (tmp_path / target / "checkpoints").is_dir()


def test_resume_tolerates_a_partial_metrics_line_and_says_where_the_run_stands(tmp_path, monkeypatch, capsys):
    from scalegen.cli import main

    monkeypatch.chdir(tmp_path)
    assert main(["train", "--out", "run", *TINY, "train.max_steps=2", "train.log_every=1"]) == 0
    out = capsys.readouterr().out
    assert "trained steps 1-2 (2 in this run" in out and "is at step 2 of 2" in out
    metrics = tmp_path / "run" / "metrics.jsonl"
    with metrics.open("a") as f:
        f.write('{"step": 3, "loss": 0.1')  # a crash in the middle of writing a line
    assert main(["train", "--out", "run", "--resume", "train.max_steps=4"]) == 0
    out = capsys.readouterr().out
    assert "dropped 1 unreadable line(s)" in out
    assert "trained steps 3-4 (2 in this run" in out and "is at step 4 of 4" in out
    steps = [json.loads(x)["step"] for x in metrics.read_text().splitlines()]
    assert steps == [1, 2, 3, 4]
    assert main(["train", "--out", "run", "--resume"]) == 0  # already finished
    assert "nothing to train: the run in run is already at step 4 of 4" in capsys.readouterr().out


def test_data_build_refuses_another_corpus_unless_overwrite(tmp_path):
    from scalegen.cli import main
    from scalegen.data.shards import load_manifest

    a, b = tmp_path / "a.txt", tmp_path / "b.txt"
    a.write_text("\n".join(f"prompt a{i}" for i in range(20)))
    b.write_text("\n".join(f"prompt b{i}" for i in range(6)))
    out = tmp_path / "sh"
    assert main(["data", "build", "--corpus", str(a), "--out", str(out), "--shard-size", "4"]) == 0
    assert main(["data", "build", "--corpus", str(a), "--out", str(out), "--shard-size", "4"]) == 0  # rerun: resumes
    assert main(["data", "build", "--corpus", str(b), "--out", str(out), "--shard-size", "4"]) == 2
    assert len(list((out / "train").glob("*.tar"))) == 5  # untouched
    assert main(["data", "build", "--corpus", str(b), "--out", str(out), "--shard-size", "4", "--overwrite"]) == 0
    assert len(list((out / "train").glob("*.tar"))) == 2  # no stale shards left behind
    assert load_manifest(out)[0]["splits"]["train"]["count"] == 6
    assert main(["data", "check", str(out)]) == 0


def test_data_build_names_the_problem_for_an_empty_mapping(tmp_path, capsys):
    from scalegen.cli import main

    corpus = tmp_path / "empty.json"
    corpus.write_text("{}")
    assert main(["data", "build", "--corpus", str(corpus), "--out", str(tmp_path / "sh")]) == 2
    assert "is an empty mapping" in capsys.readouterr().err
    assert not (tmp_path / "sh").exists()


def _poison(monkeypatch, bad_steps):
    """Make the loss NaN at the given 0-based steps."""
    import scalegen.train.loop as loop

    real = loop.regularisers

    def poisoned(cfg, out, step):
        total, logs = real(cfg, out, step)
        return (total * float("nan") if step in bad_steps else total), logs

    monkeypatch.setattr(loop, "regularisers", poisoned)
    return loop


def test_a_non_finite_step_is_skipped_counted_and_the_run_goes_on(tmp_path, monkeypatch):
    """train.skip_nonfinite (default): the step whose loss is NaN is skipped (weights untouched, finite),
    counted in the logs, and training continues; max_bad_steps in a row stop the run."""
    import torch
    from safetensors.torch import load_file

    from scalegen.config import load_config
    from scalegen.errors import TrainingError

    loop = _poison(monkeypatch, {2})
    cfg = load_config(None, [*TINY, "train.max_steps=5", "train.log_every=1"])
    loop.train(cfg, tmp_path / "run")
    lines = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [x["skipped_steps"] for x in lines] == [0, 0, 1, 1, 1]
    weights = load_file(str(tmp_path / "run" / "checkpoints" / "step_0000005" / "model.safetensors"))
    assert all(torch.isfinite(t).all() for t in weights.values())
    loop = _poison(monkeypatch, set(range(1, 10)))
    cfg = load_config(None, [*TINY, "train.max_steps=9", "train.max_bad_steps=3"])
    with pytest.raises(TrainingError, match="3 steps in a row had a non-finite loss or gradient \\(up to step 4\\)"):
        loop.train(cfg, tmp_path / "run2")


def test_without_skipping_a_non_finite_loss_stops_before_any_checkpoint_holds_it(tmp_path, monkeypatch):
    """train.skip_nonfinite=false (no per-step flag read): the loss is checked on the device every step
    and read on logging and checkpoint steps; the run stops naming the step, and the last checkpoint is
    the one before the divergence."""
    import torch
    from safetensors.torch import load_file

    from scalegen.config import load_config
    from scalegen.errors import TrainingError

    loop = _poison(monkeypatch, {2})  # the third step
    cfg = load_config(None, [*TINY, "train.max_steps=6", "train.ckpt_every=2", "train.log_every=4",
                             "train.skip_nonfinite=false"])
    with pytest.raises(TrainingError, match="the loss was not finite at step 3"):
        loop.train(cfg, tmp_path / "run")
    ckpts = sorted(p.name for p in (tmp_path / "run" / "checkpoints").glob("step_*"))
    assert ckpts == ["step_0000002"]  # step 4's checkpoint was never written
    assert all(torch.isfinite(t).all() for t in load_file(str(tmp_path / "run" / "checkpoints" / ckpts[0] /
                                                             "model.safetensors")).values())


def test_a_damaged_checkpoint_is_named_on_resume(tmp_path, capsys):
    from scalegen.cli import main

    run = tmp_path / "run"
    assert main(["train", "--out", str(run), *TINY, "train.max_steps=2"]) == 0
    (run / "checkpoints" / "step_0000002" / "optimizer.pt").write_bytes(b"not a checkpoint")
    capsys.readouterr()
    assert main(["train", "--out", str(run), "--resume", "train.max_steps=3"]) == 2
    err = capsys.readouterr().err
    # the file's sha256 no longer matches the one state.json recorded: named before it is parsed
    assert "step_0000002/optimizer.pt' does not match the sha256 recorded in its state.json" in err
    assert "to resume from the one before" in err and len(err.strip().splitlines()) == 1


def test_data_check_of_a_folder_without_shards_is_one_line(tmp_path, capsys):
    from scalegen.cli import main

    assert main(["data", "check", str(tmp_path / "nowhere")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: no shard manifest at") and "scalegen data build" in err and len(err.splitlines()) == 1


@pytest.mark.parametrize("text, needle", [
    ('{"train": "a red car"}', "split 'train' must be a list of prompt strings, not str"),
    ('{"train": ["a red car", 5]}', r"c.json:1:25 \(item 2 of 'train'\): not a string: 5"),  # line and column
    ('"a red car"', "must be a JSON list of prompts or a mapping of splits to lists, not str"),
])
def test_wrong_json_shapes_are_named_not_read_character_by_character(text, needle, tmp_path):
    from scalegen.data.prompts import read_corpus_lines
    from scalegen.errors import DataError

    p = tmp_path / "c.json"
    p.write_text(text)
    with pytest.raises(DataError, match=needle):
        read_corpus_lines(p)
