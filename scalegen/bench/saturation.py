"""`scalegen bench saturation`: SDS at CFG 100 against ASD at CFG 7.5 on the same oracle budget.

High classifier-free guidance is how SDS gets sharp results from real priors, and it
over-saturates colours; ASD replaces the noise target with the prior's own prediction at a later
timestep and works at ordinary guidance. Reports the signed colour error inside the object
(positive = over-saturated) and PSNR, on seen prompts (and unseen for reference).
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from scalegen.bench.common import train_and_evaluate


@dataclass
class SaturationOptions:
    """No options of its own: ``key=value`` overrides (e.g. train.max_steps) apply to both runs."""

RUNS = {
    "sds_cfg100": ["distill.name=sds", "distill.guidance_scale=100"],
    "asd_cfg7.5": ["distill.name=asd", "distill.guidance_scale=7.5"],
}


def bench_saturation(opts: SaturationOptions, overrides: list[str], out_root: str) -> dict:
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
