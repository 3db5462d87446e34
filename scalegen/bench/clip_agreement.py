"""``scalegen bench clip-agreement``: does a CLIP order oracle runs as the ground truth does?

The oracle world knows every run's true quality (PSNR against the ground truth, ``scalegen eval``); a CLIP
score is only worth reporting on real priors if it ranks runs the same way. For each run (a run folder or a
checkpoint) this bench computes both on the same prompts, the world's seen and unseen ones:

* the oracle evaluation (``evaluate_oracle``: PSNR, mask IoU, R@1 among the ground truths), its ground-truth
  gallery kept in the run's ``eval-cache`` as ``scalegen eval`` keeps it;
* the CLIP evaluation under the ``scalegen`` protocol (``evaluate_clip``: CLIP similarity, R@1 among all the
  world's prompts), written under ``OUT/clip-agreement/<run>``,

then Spearman's rank correlation over runs, per split: rho = Pearson's r of the ranks (ties share their mean
rank), between each CLIP metric and PSNR (and the oracle's own R@1). A CLIP that orders runs as PSNR does
gives rho = 1. With few runs rho is coarse: 5 runs can only give multiples of 0.05.

Options: ``ClipAgreementOptions`` (``bench.model=DIR`` the CLIP, e.g. ``scalegen eval train-clip``'s
folder; ``bench.runs=[RUN,...]`` at least 3 runs of one oracle world; ``bench.resolution`` the
rendered px; ``bench.threads``).
"""
from __future__ import annotations

import hashlib
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Optional

import torch

from scalegen.config import NonNeg, Range
from scalegen.errors import ScalegenError
from scalegen.eval.clip import Pool, evaluate_clip, make_protocol, run_views
from scalegen.eval.clip_models import load_clip
from scalegen.eval.oracle import evaluate_oracle
from scalegen.eval.report import format_table
from scalegen.priors import build_ground_truth
from scalegen.train.checkpoint import run_dir_of
from scalegen.train.model import load_run

CLIP_METRICS = ("clip_similarity", "clip_score", "r_at_1_all")
ORACLE_METRICS = ("psnr", "iou", "r_at_1")


@dataclass
class ClipAgreementOptions:
    model: str = ""  # the CLIP: a transformers or open_clip folder (`scalegen eval train-clip --out DIR`)
    runs: list[str] = field(default_factory=list)  # run folders or checkpoints of one oracle world (>= 3)
    resolution: Annotated[int, Range(ge=8)] = 64  # rendered px per side for CLIP (the protocol's crop/resize follow)
    threads: Annotated[int, NonNeg] = 0  # torch threads; 0 = torch's default


def ranks(xs: list[float]) -> list[float]:
    """1-based ranks, ties sharing the mean of the ranks they span."""
    order = sorted(range(len(xs)), key=lambda i: xs[i])
    r = [0.0] * len(xs)
    i = 0
    while i < len(order):
        j = i
        while j + 1 < len(order) and xs[order[j + 1]] == xs[order[i]]:
            j += 1
        for k in range(i, j + 1):
            r[order[k]] = (i + j) / 2 + 1
        i = j + 1
    return r


def spearman(a: list[float], b: list[float]) -> float:
    """Spearman's rho: Pearson's correlation of the ranks (NaN when either side is constant)."""
    ra, rb = torch.tensor(ranks(a), dtype=torch.float64), torch.tensor(ranks(b), dtype=torch.float64)
    da, db = ra - ra.mean(), rb - rb.mean()
    den = (da.square().sum() * db.square().sum()).sqrt()
    return float("nan") if den == 0 else float((da * db).sum() / den)


def _score_run(path: str, clip, protocol, out: Path, first: Optional[dict]) -> dict:
    """One run's oracle and CLIP metrics; refused before any scoring when its world's prompts differ from those
    of ``first`` (the first run's row): runs of different worlds have nothing to rank against each other."""
    cfg, text_encoder, model, ckpt = load_run(path)
    truth = build_ground_truth(cfg)
    if truth is None:
        raise ScalegenError(f"'{path}' was trained with prior {cfg.prior.name}, whose world has no ground truth; "
                            "bench.runs takes oracle-world runs (prior.name=oracle or learned)")
    world = truth.world
    splits = world.splits()
    if set(splits) != {"seen", "unseen"}:
        raise ScalegenError(f"'{path}' is a run of a world with the splits {', '.join(splits)}; clip-agreement "
                            "scores the default world's seen and unseen prompts")
    pool = Pool(list(splits["seen"]) + list(splits["unseen"]),
                [True] * len(splits["seen"]) + [False] * len(splits["unseen"]), ["seen", "unseen"])
    if first is not None and pool.digest() != first["pool"]:
        raise ScalegenError(f"'{path}' is a run of another world than '{first['run']}' (other prompts); "
                            "bench.runs ranks runs of one world")
    t0 = time.perf_counter()
    oracle = evaluate_oracle(cfg, model, text_encoder, world, cache_dir=run_dir_of(Path(ckpt)) / "eval-cache")
    oracle_s = time.perf_counter() - t0
    name = hashlib.sha1(str(Path(ckpt).resolve()).encode()).hexdigest()[:10]
    source = run_views(cfg, text_encoder, model, ckpt, protocol, torch.device("cpu"))
    summary = evaluate_clip(source, pool, protocol, clip, out / name, out / "text-cache", progress=False)
    return {"run": str(path), "label": f"{run_dir_of(Path(ckpt)).name}/{Path(ckpt).name}", "checkpoint": str(ckpt),
            "world": cfg.world.kind, "pool": pool.digest(), "prior": cfg.prior.name,
            "distill": cfg.distill.name, "oracle_s": oracle_s, "clip_s": summary["eval_s"],
            **{s: {**{m: float(oracle[s][m]) for m in ORACLE_METRICS},
                   **{f"clip_{m}" if not m.startswith("clip") else m: float(summary[s][m]) for m in CLIP_METRICS}}
               for s in ("seen", "unseen")}}


def bench_clip_agreement(opts: ClipAgreementOptions, overrides: list[str], out_root: str) -> dict:
    if overrides:
        raise ScalegenError(f"clip-agreement scores runs as they were trained; it takes no config overrides "
                            f"(got {overrides[0]})")
    if not opts.model:
        raise ScalegenError("give the CLIP to test: bench.model=DIR (e.g. `scalegen eval train-clip --out DIR`)")
    if len(opts.runs) < 3:
        raise ScalegenError(f"bench.runs needs at least 3 runs to rank (got {len(opts.runs)}): "
                            "bench.runs=[RUN_A,RUN_B,RUN_C,...]")
    if opts.threads:
        torch.set_num_threads(opts.threads)
    protocol = make_protocol("scalegen", model=opts.model, resolution=opts.resolution, splits=["seen", "unseen"])
    clip = load_clip(protocol.model, torch.device("cpu"))
    out = Path(out_root) / "clip-agreement"
    rows = []
    for path in opts.runs:
        print(f"[clip-agreement] scoring {path} ...", flush=True)
        rows.append(_score_run(path, clip, protocol, out, rows[0] if rows else None))

    def rho_of(a: list[float], b: list[float]):
        r = spearman(a, b)
        return None if r != r else round(r, 4)  # None: one side constant over the runs (no order to compare)

    rho = {s: {f"{c}_vs_{o}": rho_of([r[s][c] for r in rows], [r[s][o] for r in rows])
               for c in ("clip_similarity", "clip_score", "clip_r_at_1_all") for o in ("psnr", "r_at_1")}
           for s in ("seen", "unseen")}
    table = [[r["label"], r["distill"], r["prior"],
              r["seen"]["psnr"], r["seen"]["clip_similarity"], r["seen"]["clip_r_at_1_all"],
              r["unseen"]["psnr"], r["unseen"]["clip_similarity"], r["unseen"]["clip_r_at_1_all"]] for r in rows]
    print(format_table(table, ["run", "distill", "prior", "seen PSNR", "seen CLIP sim", "seen CLIP R@1",
                               "unseen PSNR", "unseen CLIP sim", "unseen CLIP R@1"]))
    for s in ("seen", "unseen"):
        print(f"Spearman over {len(rows)} runs, {s}: " + ", ".join(
            f"{k} {'n/a' if v is None else f'{v:+.3f}'}" for k, v in rho[s].items()))
    return {"model": opts.model, "resolution": opts.resolution, "protocol": "scalegen", "n_runs": len(rows),
            "runs": rows, "spearman": rho}


__all__ = ["ClipAgreementOptions", "bench_clip_agreement", "ranks", "spearman"]
