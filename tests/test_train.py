"""The training loop: exact resume, one batched prior call per step, atomic checkpoints."""
import json

import pytest
import torch
from safetensors.torch import load_file

from conftest import TINY, run_cli
from scalegen.config import load_config
from scalegen.errors import CheckpointError
from scalegen.train.loop import train


def _losses(run):
    return {json.loads(x)["step"]: json.loads(x)["loss"] for x in (run / "metrics.jsonl").read_text().splitlines()}


def _interrupted_then_resumed(monkeypatch, overrides, run_dir, crash_at_step: int):
    """Train with ``overrides``, kill the run during step ``crash_at_step`` (1-based), resume it."""
    import scalegen.train.loop as loop

    real, calls = loop.sample_train_cameras, []

    def crash(*a, **k):
        calls.append(1)
        if len(calls) == crash_at_step:
            raise KeyboardInterrupt
        return real(*a, **k)

    monkeypatch.setattr(loop, "sample_train_cameras", crash)
    with pytest.raises(KeyboardInterrupt):
        train(load_config(None, overrides), run_dir)
    monkeypatch.setattr(loop, "sample_train_cameras", real)
    train(load_config(None, overrides), run_dir, resume=True)
    return run_dir


def test_resume_is_exact(tmp_path, monkeypatch):
    extra = ["train.log_every=1", "train.val_every=1000", "train.ckpt_every=2", "train.max_steps=5",
             "optim.lr_schedule=cosine", "optim.warmup_steps=2"]
    full = tmp_path / "full"
    train(load_config(None, TINY + extra), full)
    # Same run, killed during step 4 (after the step-2 checkpoint), then resumed.
    part = _interrupted_then_resumed(monkeypatch, TINY + extra, tmp_path / "part", crash_at_step=4)
    assert _losses(full) == _losses(part)
    a = load_file(str(full / "checkpoints" / "step_0000005" / "model.safetensors"))
    b = load_file(str(part / "checkpoints" / "step_0000005" / "model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_refuses_to_overwrite_and_resume_needs_a_run(tmp_path):
    cfg = load_config(None, TINY + ["train.max_steps=1"])
    train(cfg, tmp_path / "r")
    with pytest.raises(CheckpointError, match="--resume"):
        train(cfg, tmp_path / "r")
    with pytest.raises(CheckpointError, match="does not exist"):
        train(cfg, tmp_path / "nope", resume=True)


def test_one_prior_call_per_step(tmp_path, monkeypatch):
    from scalegen.priors import oracle

    calls = []
    original = oracle.OraclePrior.predict_eps

    def counting(self, *a, **k):
        calls.append(1)
        return original(self, *a, **k)

    monkeypatch.setattr(oracle.OraclePrior, "predict_eps", counting)
    for name in ("sds", "csd", "vsd", "asd", "vdm"):
        calls.clear()
        train(load_config(None, TINY + ["train.max_steps=3", f"distill.name={name}"]), tmp_path / name)
        assert len(calls) == 3, name


def test_checkpoint_is_atomic_and_pruned(tmp_path):
    run = tmp_path / "r"
    train(load_config(None, TINY + ["train.max_steps=3", "train.ckpt_every=1", "train.keep_ckpts=2"]), run)
    names = sorted(p.name for p in (run / "checkpoints").iterdir())
    assert names == ["latest", "step_0000002", "step_0000003"]
    assert (run / "checkpoints" / "latest").read_text() == "step_0000003"
    # A half-written checkpoint (crash during save) is ignored: resume uses the last complete one.
    (run / "checkpoints" / ".tmp-step_0000004-1").mkdir()
    from scalegen.train.checkpoint import latest_checkpoint

    assert latest_checkpoint(run).name == "step_0000003"


def _cli(*args, cwd=None):
    return run_cli(*args, cwd=cwd)


@pytest.mark.parametrize("args,needle", [
    (["train", "train.max_step=3"], "did you mean 'train.max_steps'"),
    (["train", "--config", "missing.yaml"], "does not exist"),
    (["eval", "--ckpt", "no/such/run"], "does not exist"),
    (["generate", "--ckpt", "no/such/run", "--prompt", "a red cube", "--out", "x.glb"], "does not exist"),
    (["train", "--resume", "--out", "no/such/run"], "not a run directory"),
])
def test_bad_input_is_one_line_without_traceback(args, needle, tmp_path):
    r = _cli(*args, cwd=tmp_path)
    assert r.returncode == 2
    assert needle in r.stderr and "Traceback" not in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1


def test_wandb_offline_logging(tmp_path, monkeypatch):
    pytest.importorskip("wandb")
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.delenv("WANDB_MODE", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))  # no ~/.netrc: must fall back to offline mode
    from scalegen.train.logger import wandb_mode

    assert wandb_mode() == "offline"
    run = tmp_path / "r"
    train(load_config(None, TINY + ["train.max_steps=2", "train.logger=wandb", "train.val_every=2"]), run)
    assert list((run / "wandb").glob("offline-run-*")), "an offline wandb run should be written"
    assert (run / "val" / "step_0000002.png").is_file()


def test_wandb_is_an_extra_and_its_absence_says_how_to_install_it(tmp_path, monkeypatch):
    """Without the wandb package the default config logs to metrics.jsonl; asking for wandb is a one-line
    error naming the extra that installs it (not an ImportError traceback)."""
    import sys

    from scalegen.train.logger import MetricLogger

    monkeypatch.setitem(sys.modules, "wandb", None)  # `import wandb` now raises ImportError, as when absent
    default = load_config(None, [o for o in TINY if not o.startswith("train.logger")])
    logger = MetricLogger(tmp_path, default)
    logger.log(1, {"loss": 0.5})
    logger.close()
    assert json.loads((tmp_path / "metrics.jsonl").read_text()) == {"step": 1, "loss": 0.5}
    r = run_cli("train", "--out", tmp_path / "run", *TINY, "train.max_steps=1", "train.logger=wandb")
    assert r.returncode == 2 and 'pip install "scalegen[wandb]"' in r.stderr and "Traceback" not in r.stderr, r.stderr
    assert len(r.stderr.strip().splitlines()) == 1


@pytest.mark.parametrize("name", ["vsd", "vdm"])
def test_stateful_distiller_has_its_own_group_and_resumes_exactly(name, tmp_path, monkeypatch):
    """VSD's phi / VDM's psi: own optimizer group at distill.lr, saved in checkpoints, exact resume."""
    from safetensors.torch import load_file as load

    import scalegen.train.loop as loop

    extra = ["train.log_every=1", "train.val_every=1000", "train.ckpt_every=2", "train.max_steps=4",
             f"distill.name={name}", "distill.lr=0.003", "distill.net_width=8", "distill.net_blocks=1"]
    seen = {}
    real_build = loop.build_distiller_optimizer

    def spy(cfg, distiller):
        opt = real_build(cfg, distiller)
        seen.update({g["name"]: g["lr"] for g in opt.param_groups})
        return opt

    monkeypatch.setattr(loop, "build_distiller_optimizer", spy)
    full = tmp_path / "full"
    train(load_config(None, TINY + extra), full)
    assert seen[f"distill_{name}_{'phi' if name == 'vsd' else 'psi'}"] == 0.003
    w = load(str(full / "checkpoints" / "step_0000004" / "model.safetensors"))
    assert any(k.startswith("distiller.") for k in w)
    part = _interrupted_then_resumed(monkeypatch, TINY + extra, tmp_path / "part", crash_at_step=3)
    assert _losses(full) == _losses(part)


def test_gradient_accumulation_averages_micro_batches(tmp_path, monkeypatch):
    """train.grad_accum=2: one optimizer step per two micro-batches, whose gradient is the mean of the two
    micro-batch gradients. With the optimizer's step recorded and skipped the weights never move, so the
    gradients of steps 1 and 2 of an unaccumulated run (same data order, same random stream, no t anneal)
    are those two micro-batches."""
    import scalegen.train.loop as loop

    real_build = loop.build_optimizer
    grads: list[dict[str, torch.Tensor]] = []

    def recording(cfg, model):
        opt = real_build(cfg, model)
        named = dict(model.named_parameters())
        opt.step = lambda *a, **k: grads.append({n: p.grad.clone() for n, p in named.items() if p.grad is not None})
        return opt

    monkeypatch.setattr(loop, "build_optimizer", recording)
    frozen = ["optim.grad_clip=null", "data.prompts_per_step=1", "train.log_every=1",
              "distill.t_range_end=[0.5, 0.98]"]  # no t anneal
    train(load_config(None, TINY + frozen + ["train.max_steps=2", "train.grad_accum=1"]), tmp_path / "plain")
    g1, g2 = grads
    grads.clear()
    train(load_config(None, TINY + frozen + ["train.max_steps=1", "train.grad_accum=2"]), tmp_path / "accum")
    (g,) = grads
    assert sorted(g) == sorted(g1) and len(g) > 0
    for name in g:
        assert torch.allclose(g[name], (g1[name] + g2[name]) / 2, rtol=1e-4, atol=1e-7), name
    assert any((g1[n] - g2[n]).abs().max() > 1e-4 for n in g)  # the two micro-batches really differ
    plain, accum = _losses(tmp_path / "plain"), _losses(tmp_path / "accum")
    assert accum[1] == pytest.approx((plain[1] + plain[2]) / 2, rel=1e-5)  # the logged loss is their mean


def test_resolution_milestone_changes_size_and_views_and_resumes_exactly(tmp_path, monkeypatch):
    """camera.resolution_milestones=[[2, 24, 4]]: steps 0 and 1 render 16 px x 2 views per prompt, step 2 (the
    third) 24 px x 4 views; a run killed during step 3 (after the step-2 checkpoint, before the milestone) and
    resumed crosses it exactly as the uninterrupted run does."""
    import scalegen.train.loop as loop

    extra = ["train.log_every=1", "train.val_every=1000", "train.ckpt_every=2", "train.max_steps=3",
             "camera.resolution_milestones=[[2, 24, 4]]"]
    seen, real = [], loop.sample_train_cameras

    def spy(cam_cfg, n, *a, **k):
        c = real(cam_cfg, n, *a, **k)
        seen.append((c.height, c.width, c.shape[1]))
        return c

    monkeypatch.setattr(loop, "sample_train_cameras", spy)
    full = tmp_path / "full"
    train(load_config(None, TINY + extra), full)
    assert seen == [(16, 16, 2), (16, 16, 2), (24, 24, 4)]
    monkeypatch.setattr(loop, "sample_train_cameras", real)
    part = _interrupted_then_resumed(monkeypatch, TINY + extra, tmp_path / "part", crash_at_step=3)
    assert _losses(full) == _losses(part) and len(_losses(full)) == 3
    a = load_file(str(full / "checkpoints" / "step_0000003" / "model.safetensors"))
    b = load_file(str(part / "checkpoints" / "step_0000003" / "model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("bad, match", [
    (["camera.resolution_milestones=[[2, 24]]"], "entries must be"),
    (["camera.resolution_milestones=[[2, 24, 3]]", "camera.view_group=2"], "not a multiple of the view group 2"),
    (["camera.resolution_milestones=[[5, 24, 2], [3, 32, 2]]"], "increasing step order"),
    (["camera.views_per_prompt=6", "camera.view_group=4"], "multiple of camera.view_group"),
])
def test_resolution_milestones_are_validated(bad, match):
    from scalegen.errors import ConfigError

    with pytest.raises(ConfigError, match=match):
        load_config(None, bad)


def test_mvdream_view_groups_split_a_prompts_views():
    """views_per_prompt=8 with view_group=4 (MVDream-threestudio's batch 8 of n_view 4): each prompt gets two
    groups, each 90 degrees apart from its own start with its own elevation / fovy / distance."""
    from scalegen.data.cameras import sample_train_cameras

    cfg = load_config(None, ["camera.sampler=mvdream", "camera.views_per_prompt=8", "camera.view_group=4",
                             "camera.share_across_prompts=false"])
    cams = sample_train_cameras(cfg.camera, 3, generator=torch.Generator().manual_seed(0))
    assert cams.shape == (3, 8)
    groups = cams.elevation.view(3, 2, 4)
    assert (groups == groups[..., :1]).all() and (groups[:, 0, 0] != groups[:, 1, 0]).all()
    gaps = cams.azimuth.view(3, 2, 4).diff(dim=-1)
    assert torch.allclose(gaps, torch.full_like(gaps, 90.0), atol=1e-4)
