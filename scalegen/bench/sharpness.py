"""`scalegen bench sharpness`: how the oracle prior's sharpness s shapes SDS and ASD.

The oracle's components are N(mu_k, s^2 I). Small s makes eps_c - eps an almost exact regression
pull toward the ground-truth render (too easy a teacher); large s makes the noise term dominate
and the conditional barely informative, like a broad real prior. This sweep trains the default
budget at several s for each distiller and reports the oracle metrics, which is how the default
s was chosen (docs/notes/2026-11-29-sharpness-and-default-distiller.md).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from scalegen.bench.common import train_and_evaluate


@dataclass
class SharpnessOptions:
    values: list[float] = field(default_factory=lambda: [0.03, 0.1, 0.3, 1.0])  # the s of each run
    distillers: list[Literal["sds", "csd", "vsd", "asd", "vdm"]] = field(default_factory=lambda: ["sds", "asd"])


def bench_sharpness(opts: SharpnessOptions, overrides: list[str], out_root: str) -> dict:
    extra = overrides
    out: dict = {}
    for name in opts.distillers:
        for s in opts.values:
            key = f"{name}_s{s:g}"
            print(f"[sharpness] training {key} ...", flush=True)
            r = train_and_evaluate([*extra, f"distill.name={name}", f"prior.oracle.sharpness={s}"],
                                   Path(out_root) / "sharpness" / key)
            out[key] = {"distill": name, "sharpness": s, "psnr_seen": r["seen"]["psnr"],
                        "psnr_fg_seen": r["seen"]["psnr_fg"], "iou_seen": r["seen"]["iou"],
                        "color_error_seen": r["seen"]["color_error"], "psnr_unseen": r["unseen"]["psnr"],
                        "iou_unseen": r["unseen"]["iou"], "train_s": r["train_s"]}
    print(f"{'run':<12} {'PSNR seen':>9} {'PSNR fg':>8} {'IoU':>6} {'colour err':>10} {'PSNR unseen':>11}")
    for key, r in out.items():
        print(f"{key:<12} {r['psnr_seen']:>9.2f} {r['psnr_fg_seen']:>8.2f} {r['iou_seen']:>6.3f} "
              f"{r['color_error_seen']:>+10.3f} {r['psnr_unseen']:>11.2f}")
    return out
