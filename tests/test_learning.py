"""The loop learns: a short oracle-world run beats the untrained generator by a wide margin, for
both SDS and ASD, and its renders get the prompt's colour."""
import pytest
import torch

from conftest import TINY
from scalegen.config import load_config
from scalegen.eval.oracle import evaluate_oracle
from scalegen.priors import build_world
from scalegen.train.loop import train
from scalegen.train.model import build_model, load_run


@pytest.mark.slow
@pytest.mark.parametrize("distiller", ["sds", "asd"])
def test_short_run_learns(tmp_path, distiller):
    over = TINY + ["train.max_steps=120", f"distill.name={distiller}", "data.prompts_per_step=4",
                   "camera.views_per_prompt=2", "train.val_every=1000", "train.ckpt_every=1000"]
    cfg = load_config(None, over)
    world = build_world(cfg)
    torch.manual_seed(cfg.train.seed)
    _, untrained = build_model(cfg)
    te = build_model(cfg)[0]
    before = evaluate_oracle(cfg, untrained.eval(), te, world)
    train(cfg, tmp_path / "run")
    cfg, te, model, _ = load_run(tmp_path / "run")
    after = evaluate_oracle(cfg, model, te, world)
    # Measured once (seed 0): SDS 11.4 -> 31.5 dB / IoU 0.95, ASD 11.4 -> 20.7 dB / IoU 0.74 on this
    # tiny budget (ASD's pull is a difference of two scores, so it needs more steps; see
    # docs/notes/2026-11-29-distill-oracle-world.md). Margins sit well below the measured gains.
    gain, iou = {"sds": (15.0, 0.85), "asd": (6.0, 0.6)}[distiller]
    assert after["seen"]["psnr"] > before["seen"]["psnr"] + gain, (before, after)
    assert after["seen"]["iou"] > iou
    assert abs(after["seen"]["color_error"]) < 0.5 * abs(before["seen"]["color_error"])
    assert after["unseen"]["psnr"] > before["unseen"]["psnr"] + 0.6 * gain
