"""``scalegen bench gpu [--json FILE] [bench.configs=[...]] [bench.scale=true|reduced] [key=value ...]``:
one command that measures a lent GPU (one H100, a run of a few minutes) the first time one is at hand.

Per paper config (``paper_step.PAPER_CONFIGS``; priors with random weights at the published sizes,
corpora as ``bench paper-step`` finds or stands in for them): the real training loop takes
``bench.warmup`` + ``bench.steps`` steps with the prior in bf16 (``prior.dtype=bf16``; the generator and
renderer at the config's own ``train.mixed_precision``), and the bench reports

* the median step time of the steps after warm-up (the loop's ``step_s``; the loop reads a host flag
  every step, so each step's time includes its device work);
* achieved TFLOP/s: ``bench flops-sd`` / ``bench flops-mvdream``'s count of one step (matmuls,
  convolutions, attention; VSD's LoRA pass is not in that count, so its figure is a lower bound)
  over the median step time, and its fraction of ``bench.peak_tflops`` (989: H100 SXM dense bf16);
* peak CUDA memory (``max_memory_allocated``, and reserved) beside what ``scalegen plan`` predicts per rank for
  the same run (``--no-table --no-growth``, in its own CPU process before the timed run; ``bench.predict``):
  ``predicted_step_bytes`` (the plan's total less the text caches counted full, which a few steps do not fill)
  and ``predicted_peak_bytes`` (the plan's total);
* ``generate``'s seconds per asset at each of ``bench.generate_resolutions`` (marching cubes at 128^3 and
  256^3) for the first config of each generator, from the checkpoint its timed run wrote;
* torch vs gsplat rasterizer agreement on random Gaussians where gsplat can run (installed + CUDA).

``bench.scale=reduced`` runs the same path end to end on CPU (tiny priors, small generators, fewer
steps): the test suite runs it. Its import path stays within torch, accelerate, transformers, peft,
safetensors, scikit-image, einops and the few wheels docs/paper-scale.md lists (no wandb).
"""
from __future__ import annotations

import contextlib
import gc
import io
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import torch

from scalegen.bench.paper_step import PAPER_CONFIGS, PaperStepOptions, plan_config, predict_peak, resolve_configs

H100_BF16_DENSE_TFLOPS = 989.0


@dataclass
class GpuOptions:
    configs: list[str] = field(default_factory=list)  # config stems or paths (empty: all eight paper configs)
    scale: Literal["true", "reduced"] = "true"  # reduced: tiny priors and generators, runs on CPU (tests)
    warmup: int = 2  # steps before timing (allocator, cuDNN autotuning, text embeddings)
    steps: int = 5  # timed steps; the median is reported
    peak_tflops: float = H100_BF16_DENSE_TFLOPS  # the accelerator's dense bf16 peak
    prior_dtype: Literal["bf16", "fp16", "fp32"] = "bf16"  # the prior's precision in the timed steps
    generate_resolutions: list[int] = field(default_factory=lambda: [128, 256])  # marching-cubes grids
    generate_prompts: int = 2  # assets per generate timing (after one warm-up asset)
    weights: str = "runs/bench/paper_step/weights"  # random-weight prior folders (written once, reused)
    corpora: str = "../shared/corpora"  # real corpora where present, else stand-ins of their size
    predict: bool = True  # scalegen plan's prediction per config (one measured CPU step each, before the timed run)


def predicted_peak(config: str, items: list[str], work: Path, opts: GpuOptions) -> dict:
    """What ``scalegen plan`` predicts per rank for this run (``paper_step.predict_peak``: its own CPU process, the
    published UNet on ``meta``, the prior at ``bench.prior_dtype``); {} with ``bench.predict=false``."""
    if not opts.predict:
        return {}
    from scalegen.bench.paper_step import machine_memory_bytes  # noqa: PLC0415

    return predict_peak(config, items, work, opts.scale, opts.prior_dtype, 1800, machine_memory_bytes())


def _flops_per_step(config: str, overrides: list[str], peak: float, device: str) -> dict:
    """``bench flops-sd`` / ``flops-mvdream``'s count of one optimizer step (their tables are not printed)."""
    from scalegen.config import load_config  # noqa: PLC0415

    cfg = load_config(config, overrides)
    with contextlib.redirect_stdout(io.StringIO()):
        if cfg.prior.name == "mvdream":
            from scalegen.bench.flops_mvdream import FlopsMVDreamOptions, bench_flops_mvdream  # noqa: PLC0415

            r = bench_flops_mvdream(FlopsMVDreamOptions(config=config, peak_tflops=peak, device=device), overrides)
            return {"step_flops": r["step_flops"], "source": "bench flops-mvdream", "rows": r["flops"]}
        from scalegen.bench.flops_sd import FlopsOptions, bench_flops_sd  # noqa: PLC0415

        r = bench_flops_sd(FlopsOptions(config=config, peak_tflops=peak, device=device), overrides)
        return {"step_flops": r["total_flops"], "source": "bench flops-sd", "rows": r["flops"]}


def _free(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def time_config(config: str, opts: GpuOptions, overrides: list[str], work: Path, device: torch.device) -> dict:
    """Warm-up + timed steps of one config through the real loop; its run folder stays for ``generate``."""
    import shutil  # noqa: PLC0415

    from scalegen.config import load_config  # noqa: PLC0415
    from scalegen.train.logger import read_metrics  # noqa: PLC0415
    from scalegen.train.loop import train  # noqa: PLC0415

    ps = PaperStepOptions(scale=opts.scale, weights=opts.weights, corpora=opts.corpora)
    plan = plan_config(config, ps, overrides, work)
    items = [*overrides, *plan["overrides"], f"prior.dtype={opts.prior_dtype}"]
    cfg = load_config(config, [*items, "train.logger=none", "train.progress=false", "train.log_every=1",
                               f"train.ckpt_every={10**9}", "train.keep_ckpts=1"])
    predicted = predicted_peak(config, items, work, opts)
    run = work / "run"
    shutil.rmtree(run, ignore_errors=True)
    _free(device)
    t0 = time.perf_counter()
    train(cfg, run, stop_after=opts.warmup + opts.steps)
    wall = time.perf_counter() - t0
    steps = [m for m in read_metrics(run) if "step_s" in m]
    timed = [m["step_s"] for m in steps[opts.warmup:]]
    notes = [n for n in plan["notes"] if not n.startswith("prior in fp32")]  # paper-step's CPU note
    row = {"config": config, "notes": notes, "overrides": items,
           "prior_dtype": opts.prior_dtype, "mixed_precision": cfg.train.mixed_precision,
           "step_s_all": [m["step_s"] for m in steps], "step_s_median": statistics.median(timed) if timed else None,
           "losses": [m["loss"] for m in steps], "run_wall_s": wall, "run": str(run),
           "predicted_peak_bytes": predicted.get("predicted_peak_bytes"),
           "predicted_step_bytes": predicted.get("predicted_step_bytes"),
           "plan": {k: v for k, v in predicted.items() if k not in ("predicted_peak_bytes", "predicted_step_bytes")}}
    if device.type == "cuda":
        row["peak_allocated_bytes"] = torch.cuda.max_memory_allocated(device)
        row["peak_reserved_bytes"] = torch.cuda.max_memory_reserved(device)
    fl = _flops_per_step(config, items, opts.peak_tflops, device.type)
    row["flops"] = fl
    if row["step_s_median"]:
        tflops = fl["step_flops"] / row["step_s_median"] / 1e12
        row["achieved_tflops"] = tflops
        row["fraction_of_peak"] = tflops / opts.peak_tflops
    return row


def time_generate(run: str, resolutions: list[int], n: int, work: Path, device: torch.device) -> dict:
    """Seconds per asset of ``generate``'s pipeline (``bench generate``'s runner) from a timed run's checkpoint."""
    from scalegen.bench.generate import _run  # noqa: PLC0415
    from scalegen.train.model import load_run  # noqa: PLC0415

    cfg, text_encoder, model, _ = load_run(run)
    model.to(device)
    text_encoder.model.to(device)
    text_encoder.device = device
    prompts = [f"a photo of object number {i}" for i in range(n + 1)]
    out = {}
    for res in resolutions:
        _run(cfg, text_encoder, model, prompts[:1], res, 1, False, work / "generate-scratch")  # warm-up
        if device.type == "cuda":
            torch.cuda.synchronize()
        r = _run(cfg, text_encoder, model, prompts[1:], res, 1, False, work / "generate-scratch")
        out[str(res)] = {"seconds_per_asset": r["seconds_per_asset"], "assets": len(r["assets"]),
                         "stages": {k: v / max(len(r["assets"]), 1) for k, v in r["seconds"].items()}}
    return out


def gsplat_agreement(device: torch.device, n: int = 2000, size: int = 128) -> dict:
    """Max and mean absolute difference (and PSNR) between the torch and gsplat rasterizers' renders of
    the same random Gaussians from 4 views; skipped (with the reason) where gsplat cannot run."""
    from scalegen.data.cameras import orbit_cameras  # noqa: PLC0415
    from scalegen.render.gaussians import GaussianField, GaussianRasterizer, gsplat_available  # noqa: PLC0415

    if not gsplat_available():
        why = "no CUDA device" if not torch.cuda.is_available() else "gsplat is not installed"
        return {"skipped": why}
    g = torch.Generator(device="cpu").manual_seed(0)
    field_ = GaussianField(
        (torch.rand(n, 3, generator=g) - 0.5).to(device), (torch.rand(n, 3, generator=g) * 2 - 5).to(device),
        torch.randn(n, 4, generator=g).to(device), torch.randn(n, generator=g).to(device),
        (torch.randn(n, 1, 3, generator=g) * 0.5).to(device))
    cams = orbit_cameras(4, 15.0, 2.5, 40.0, size).to(device)
    with torch.no_grad():
        a = GaussianRasterizer(backend="torch")(field_, cams)
        b = GaussianRasterizer(backend="gsplat")(field_, cams)
    out = {}
    for name in ("rgb", "opacity"):
        d = (getattr(a, name).float() - getattr(b, name).float()).abs()
        mse = float(d.pow(2).mean())
        out[name] = {"max_abs": float(d.max()), "mean_abs": float(d.mean()),
                     "psnr_db": float("inf") if mse == 0 else float(-10 * torch.log10(torch.tensor(mse)))}
    import gsplat  # noqa: PLC0415

    out["gsplat_version"] = gsplat.__version__
    return out


def markdown_table(res: dict) -> str:
    """The results as the Markdown table docs/paper-scale.md shows."""
    gib = 2**30
    lines = ["| config | step s (median) | TFLOP/s | of peak | peak alloc GiB | plan predicted GiB (step) |",
             "|---|---|---|---|---|---|"]
    for r in res["rows"]:
        pred = r.get("predicted_step_bytes")
        alloc = r.get("peak_allocated_bytes")
        lines.append(f"| {Path(r['config']).stem} | {r['step_s_median']:.3f} | {r.get('achieved_tflops', 0):.1f} | "
                     f"{100 * r.get('fraction_of_peak', 0):.1f}% | {'-' if alloc is None else f'{alloc / gib:.1f}'} | "
                     f"{'n/a' if pred is None else f'{pred / gib:.1f}'} |")
    for gen, g in res["generate"].items():
        for resol, v in g.items():
            lines.append(f"\n`generate` {gen} at {resol}^3: {v['seconds_per_asset']:.2f} s/asset")
    lines.append(f"\nrasterizer agreement (torch vs gsplat): {res['gsplat']}")
    return "\n".join(lines)


def bench_gpu(opts: GpuOptions, overrides: list[str], out_root: str = "runs/bench") -> dict:
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if opts.scale == "reduced":  # the code path in seconds on a CPU (FLOPs: true-size priors at reduced resolutions)
        opts.warmup, opts.steps = min(opts.warmup, 1), min(opts.steps, 2)
        opts.generate_resolutions, opts.generate_prompts = [min(r, 32) for r in opts.generate_resolutions[:1]], 1
    configs = resolve_configs(opts.configs)
    t_start = time.perf_counter()
    rows, runs_by_generator = [], {}
    for config in configs:
        work = Path(out_root) / "gpu" / opts.scale / Path(config).stem
        work.mkdir(parents=True, exist_ok=True)
        print(f"{Path(config).stem}: {opts.warmup} + {opts.steps} steps on {device}", flush=True)
        row = time_config(config, opts, overrides, work, device)
        rows.append(row)
        runs_by_generator.setdefault(_generator_of(config, row["overrides"]), row["run"])
        _free(device)
    generate = {}
    for gen, run in runs_by_generator.items():
        generate[gen] = time_generate(run, opts.generate_resolutions, opts.generate_prompts,
                                      Path(out_root) / "gpu" / opts.scale, device)
        _free(device)
    res = {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
           "scale": opts.scale, "torch": torch.__version__, "peak_tflops": opts.peak_tflops,
           "rows": rows, "generate": generate, "gsplat": gsplat_agreement(device),
           "wall_s": time.perf_counter() - t_start,
           "plan_available": opts.predict, "paper_configs": list(PAPER_CONFIGS)}
    res["markdown"] = markdown_table(res)
    print(res["markdown"])
    return res


def _generator_of(config: str, overrides: list[str]) -> str:
    from scalegen.config import load_config  # noqa: PLC0415

    return load_config(config, overrides).generator.name
