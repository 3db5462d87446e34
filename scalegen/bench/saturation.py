"""`scalegen bench saturation`: SDS at CFG 100 against ASD at CFG 7.5 on the same oracle budget.

High classifier-free guidance is how SDS gets sharp results from real priors, and it
over-saturates colours; ASD replaces the noise target with the prior's own prediction at a later
timestep and works at ordinary guidance. Reports the signed colour error inside the object
(positive = over-saturated) and PSNR, on seen prompts (and unseen for reference).
"""
from __future__ import annotations

import shutil
import time
from pathlib import Path

from scalegen.config import load_config
from scalegen.eval.oracle import evaluate_oracle
from scalegen.priors import build_world
from scalegen.train.loop import train
from scalegen.train.model import load_run

RUNS = {
    "sds_cfg100": ["distill.name=sds", "distill.guidance_scale=100"],
    "asd_cfg7.5": ["distill.name=asd", "distill.guidance_scale=7.5"],
}


def train_and_evaluate(overrides: list[str], run_dir: Path) -> dict:
    """Fresh run of the default config with ``overrides``; oracle metrics of its last checkpoint."""
    cfg = load_config(None, ["train.logger=none", "train.progress=false", *overrides])
    if run_dir.exists():
        shutil.rmtree(run_dir)
    t0 = time.perf_counter()
    train(cfg, run_dir)
    train_s = time.perf_counter() - t0
    cfg, text_encoder, model, _ = load_run(run_dir)
    res = evaluate_oracle(cfg, model, text_encoder, build_world(cfg))
    return {"train_s": train_s, "steps": cfg.train.max_steps, **res}


def bench_saturation(overrides: list[str], out_root: str) -> dict:
    out = {}
    for name, extra in RUNS.items():
        print(f"[saturation] training {name} ...", flush=True)
        r = train_and_evaluate([*overrides, *extra], Path(out_root) / "saturation" / name)
        out[name] = {"color_error": r["seen"]["color_error"], "psnr": r["seen"]["psnr"], "iou": r["seen"]["iou"],
                     "psnr_fg": r["seen"]["psnr_fg"], "psnr_unseen": r["unseen"]["psnr"],
                     "color_error_unseen": r["unseen"]["color_error"], "train_s": r["train_s"], "steps": r["steps"]}
    print(f"{'run':<12} {'colour err':>10} {'PSNR':>7} {'PSNR fg':>8} {'IoU':>6} {'PSNR unseen':>11}")
    for name, r in out.items():
        print(f"{name:<12} {r['color_error']:>+10.3f} {r['psnr']:>7.2f} {r['psnr_fg']:>8.2f} {r['iou']:>6.3f} "
              f"{r['psnr_unseen']:>11.2f}")
    return out
