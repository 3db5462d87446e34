"""``scalegen bench refine``: per-prompt refinement in the oracle world, measured against the amortized
generator it starts from.

For one seen prompt of an amortized run (``bench.run``), each distiller of ``bench.distillers`` refines
the prompt's scene (``bench.representation``, 3D Gaussians by default) from the run's field for
``bench.steps`` steps through ``refine.refine`` (the `scalegen refine` path: same trainer, exports
included); checkpoints every ``bench.eval_every`` steps are scored afterwards on the evaluation orbit
against ground truth (PSNR, foreground PSNR, mask IoU, R@1), so each run has a PSNR-over-steps curve
and its training seconds, wall and CPU, and the CPU seconds of its start (the fit to the run's renders; the
process's CPU time: on a shared machine the wall time counts other people's jobs, the CPU time with
``train.threads=1`` is what one free core would take). With ``bench.sphere=true`` the first distiller also
refines from a sphere, and the table gives the steps each start needs to reach the amortized generator's PSNR plus
``bench.targets`` dB (the first scored step at or above it; "-" when never reached).

Options: ``RefineBenchOptions``; every other ``key=value`` overrides the refine config (e.g.
``camera.resolution=32``). The load average before and after is in the result: this machine is shared.
"""
from __future__ import annotations

import os
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Literal, Optional

import torch

from scalegen.config import PER_PROMPT
from scalegen.errors import ConfigError, ScalegenError
from scalegen.eval.oracle import eval_cameras, evaluate_prompts, ground_truth_gallery, ground_truth_of
from scalegen.eval.report import format_table
from scalegen.priors import build_world
from scalegen.refine import refine, refine_config
from scalegen.train.checkpoint import resolve_checkpoint, run_dir_of
from scalegen.train.model import load_run


@dataclass
class RefineBenchOptions:
    run: str = "runs/quickstart"  # the amortized run (or one of its checkpoints) every refinement starts from
    prompt: str = ""  # "" = the run world's first seen prompt
    representation: Literal[PER_PROMPT] = "gaussians"
    distillers: list[str] = field(default_factory=lambda: ["sds", "asd", "vdm"])
    steps: int = 400
    eval_every: int = 50
    sphere: bool = True  # also refine from a sphere with the first distiller (steps-to-PSNR comparison)
    targets: list[float] = field(default_factory=lambda: [0.0, 1.0, 2.0, 3.0])  # dB above the amortized PSNR
    threads: int = 1
    mesh_resolution: int = 64


def psnr_curve(out: Path, world, gallery, start_scores: Optional[dict]) -> list[dict]:
    """[{step, psnr, psnr_fg, iou, r_at_1}] of every checkpoint in ``out`` (step 0 = the start, when its
    scores are given)."""
    keys = ("psnr", "psnr_fg", "iou", "r_at_1")
    rows = [] if start_scores is None else [{"step": 0, **{k: start_scores[k] for k in keys}}]
    for ckpt in sorted((out / "checkpoints").glob("step_*")):
        cfg, text_encoder, model, _ = load_run(ckpt)
        s = evaluate_prompts(cfg, model, text_encoder, world, [cfg.data.prompt], gallery=gallery)
        rows.append({"step": int(ckpt.name.split("_")[1]), **{k: s[k] for k in keys}})
    return rows


def steps_to(curve: list[dict], psnr: float) -> Optional[int]:
    """The first scored step whose PSNR is at least ``psnr`` (None: never)."""
    return next((r["step"] for r in curve if r["psnr"] >= psnr), None)


def bench_refine(opts: RefineBenchOptions, overrides: list[str], out_root: str) -> dict:
    if not opts.distillers:
        raise ConfigError("bench.distillers is empty; give e.g. bench.distillers=[sds,asd,vdm]")
    if opts.steps < 1 or opts.eval_every < 1:
        raise ConfigError("bench.steps and bench.eval_every must be at least 1")
    torch.set_num_threads(opts.threads)
    run_ckpt = resolve_checkpoint(opts.run)
    run_cfg, run_te, run_model, _ = load_run(run_ckpt)
    world = build_world(run_cfg)
    prompt = opts.prompt or world.seen[0]
    if world.prompts[world.index(prompt)] not in world.seen:
        raise ConfigError(f"bench.prompt {prompt!r} is not a seen prompt of '{opts.run}'; the claim is about seen prompts")
    root = Path(out_root) / "refine"
    common = [f"train.max_steps={opts.steps}", f"train.ckpt_every={opts.eval_every}", "train.keep_ckpts=100000",
              f"train.val_every={opts.steps}", "train.logger=none", "train.progress=false",
              f"train.threads={opts.threads}", *overrides]
    load_before = os.getloadavg()
    gallery = None
    cases = [(d, str(run_ckpt)) for d in opts.distillers] + ([(opts.distillers[0], None)] if opts.sphere else [])
    results = []
    for distill, init in cases:
        name = f"{distill}-{'run' if init else 'sphere'}"
        cfg = refine_config(prompt, opts.representation, distill, init, None, common, base_run=str(run_ckpt))
        if gallery is None:
            gallery = ground_truth_gallery(ground_truth_of(cfg, world), eval_cameras(cfg))
        out = root / name
        if out.exists():
            shutil.rmtree(out)
        t0 = time.perf_counter()
        try:
            rep = refine(cfg, out, init_from=init, mesh_resolution=opts.mesh_resolution, gallery=gallery)
        except ScalegenError as e:  # a case that fails (e.g. a scene that collapses) is a result: the others go on
            print(f"[bench refine] {name} failed: {e}", flush=True)
            results.append({"case": name, "distill": distill, "start": "run" if init else "sphere", "failed": str(e),
                            "curve": psnr_curve(out, world, gallery, None)})
            continue
        total_s = time.perf_counter() - t0
        curve = psnr_curve(out, world, gallery, rep["metrics"]["start"])
        results.append({"case": name, "distill": distill, "start": "run" if init else "sphere",
                        "train_s": rep["train_s"], "train_cpu_s": rep["train_cpu_s"], "total_s": total_s,
                        "start_cpu_s": rep.get("start_cpu_s", 0.0),
                        "gaussians": rep.get("gaussians"),
                        "metrics": rep["metrics"], "curve": curve})
    amortized = next((r["metrics"]["amortized"] for r in results if "amortized" in r.get("metrics", {})), None)
    if amortized is None:  # every case from the run failed
        amortized = evaluate_prompts(run_cfg, run_model, run_te, world, [prompt])
    res = {"prompt": prompt, "run": str(run_ckpt), "run_dir": str(run_dir_of(run_ckpt)), "steps": opts.steps,
           "options": asdict(opts), "overrides": overrides, "amortized": amortized, "cases": results,
           "load_average_before": list(load_before), "load_average_after": list(os.getloadavg())}
    rows = [["amortized generator", "-", "-", amortized["psnr"], amortized["psnr_fg"], amortized["iou"],
             amortized["r_at_1"], "-", "-", "-", "-"]]
    for r in results:
        if "failed" in r:
            last = r["curve"][-1] if r["curve"] else None
            rows.append([r["case"], "-", "-", "failed" if last is None else f"failed; step {last['step']}: "
                         f"{last['psnr']:.2f}", "-", "-", "-", "-", "-", "-", "-"])
            continue
        m = r["metrics"]["refined"]
        rows.append([r["case"], r["curve"][0]["psnr"], r["gaussians"] or "-", m["psnr"], m["psnr_fg"], m["iou"],
                     m["r_at_1"], m["psnr"] - amortized["psnr"], r["train_s"], r["start_cpu_s"], r["train_cpu_s"]])
    print(f"prompt {prompt!r}, {opts.steps} steps, start run {run_ckpt}")
    print(format_table(rows, ["case", "start PSNR", "Gaussians", "PSNR (dB)", "PSNR fg", "mask IoU", "R@1",
                              "vs amortized (dB)", "train s", "start CPU s", "train CPU s"]))
    if opts.sphere:
        first = opts.distillers[0]
        by = {r["case"]: r["curve"] for r in results}
        trows, res["steps_to_psnr"] = [], []
        for dt in opts.targets:
            target = amortized["psnr"] + dt
            a, b = steps_to(by[f"{first}-run"], target), steps_to(by[f"{first}-sphere"], target)
            res["steps_to_psnr"].append({"psnr": target, "above_amortized": dt, "from_run": a, "from_sphere": b})
            trows.append([f"{target:.2f} (amortized {dt:+g})", "-" if a is None else a, "-" if b is None else b])
        print(format_table(trows, ["PSNR target (dB)", f"steps from run ({first})", f"steps from sphere ({first})"]))
    print(f"load average before {load_before[0]:.1f}, after {os.getloadavg()[0]:.1f} (shared machine)")
    return res
