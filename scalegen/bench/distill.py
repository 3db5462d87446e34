"""`scalegen bench distill`: every distiller (SDS, CSD, VSD, ASD, VDM) compared two ways.

1. ``oracle``: the default oracle-world run (Hyper-iNGP, same budget, seed and guidance 7.5) per
   distiller; seen/unseen PSNR, signed colour error inside the mask, seconds per step (training
   wall time / steps, validation and checkpoints included equally), peak resident memory of the
   run (each run in a fresh process: ``ru_maxrss``, Python + torch included), and prior evaluations per step (calls, and denoised rows per
   rendered image, counted on one step of a small batch).
2. ``sd_reduced``: seconds per distillation step on a Stable Diffusion UNet of realistic
   proportions: the SD 2.1-base architecture (layers, attention layout, cross-attention width 1024,
   77 tokens) at a quarter of its width, block channels (80, 160, 320, 320) (GroupNorm 16 groups,
   as 80 channels do not split into 32), random weights, 64x64 latents, the same batch for every
   distiller. A step = the distiller's call, backward of its loss into the latents (and into
   VSD's LoRA / VDM's M_psi) and one Adam step of the distiller's own parameters; the generator,
   renderer and VAE are left out for every method alike. Timed round-robin (one step of each
   method in turn, ``sd_steps`` rounds after one warm-up round), median reported, so load from
   other jobs hits all methods alike.

Options: ``DistillOptions`` (``bench.part=sd``, ``bench.names=[sds,vdm]``, ...).
"""
from __future__ import annotations

import multiprocessing
import statistics
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import torch

from scalegen.bench.common import train_and_evaluate

NAMES = ("sds", "csd", "vsd", "asd", "vdm")
SD_NAMES = ("sds", "asd", "vsd", "vdm")
Name = Literal["sds", "csd", "vsd", "asd", "vdm"]


@dataclass
class DistillOptions:
    part: Literal["all", "oracle", "sd"] = "all"
    names: list[Name] = field(default_factory=lambda: list(NAMES))
    sd_batch: int = 1  # latents per step on the reduced UNet
    sd_steps: int = 3  # timed rounds (after one warm-up round)
    sd_width: int = 80  # the reduced UNet's first block width (SD 2.1-base: 320)


def _one_oracle_run(name: str, overrides: list[str], run_dir: str) -> dict:
    """One training + evaluation, run in a fresh process so its peak memory is its own."""
    import resource  # noqa: PLC0415

    r = train_and_evaluate([*overrides, f"distill.name={name}"], Path(run_dir))
    r["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0
    return r


def prior_evals(name: str, overrides: list[str]) -> dict:
    """Prior calls and denoised rows per rendered image in one step (oracle, 2 prompts x 2 views, 8x8)."""
    from scalegen.config import load_config  # noqa: PLC0415
    from scalegen.data.cameras import sample_train_cameras  # noqa: PLC0415
    from scalegen.distill import build_distiller  # noqa: PLC0415
    from scalegen.priors import build_prior, build_world  # noqa: PLC0415

    cfg = load_config(None, [*overrides, f"distill.name={name}", "camera.views_per_prompt=2", "camera.resolution=8"])
    world = build_world(cfg)
    prior = build_prior(cfg, world)
    d = build_distiller(cfg, prior)
    cams = sample_train_cameras(cfg.camera, 2)
    z = torch.randn(4, 3, 8, 8, requires_grad=True)
    text = prior.text_embeddings(world.seen[:2]).repeat_interleave(2)
    d(z, text, cams.expand(2), 0)
    return {"prior_calls": prior.n_calls, "prior_rows_per_image": prior.n_rows / 4}


def bench_oracle(overrides: list[str], out_root: str, names=NAMES) -> dict:
    out = {}
    for name in names:
        print(f"[distill] training {name} in the oracle world ...", flush=True)
        with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as ex:
            r = ex.submit(_one_oracle_run, name, overrides, str(Path(out_root) / "distill" / name)).result()
        ev = prior_evals(name, overrides)
        out[name] = {"psnr_seen": r["seen"]["psnr"], "psnr_unseen": r["unseen"]["psnr"],
                     "color_error": r["seen"]["color_error"], "iou_seen": r["seen"]["iou"],
                     "step_s": r["train_s"] / r["steps"], "steps": r["steps"], "peak_rss_mb": r["peak_rss_mb"], **ev}
        print(f"[distill] {name}: {out[name]}", flush=True)
    print(f"{'distiller':<9} {'PSNR seen':>9} {'unseen':>7} {'IoU':>6} {'colour err':>10} {'s/step':>7} "
          f"{'peak MB':>8} {'prior calls':>11} {'rows/img':>8}")
    for name, r in out.items():
        print(f"{name:<9} {r['psnr_seen']:>9.2f} {r['psnr_unseen']:>7.2f} {r['iou_seen']:>6.3f} "
              f"{r['color_error']:>+10.3f} {r['step_s']:>7.2f} {r['peak_rss_mb']:>8.0f} {r['prior_calls']:>11d} "
              f"{r['prior_rows_per_image']:>8.1f}")
    return out


# ---------------------------------------------------------------------------------------------
# Step time on a reduced-width SD 2.1-base UNet


def _tensor_bytes(tensors, exclude: set[int]) -> int:
    seen, total = set(exclude), 0
    for t in tensors:
        if t.data_ptr() not in seen:
            seen.add(t.data_ptr())
            total += t.numel() * t.element_size()
    return total


def _vm_mb(field: str) -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    return float("nan")


def vsd_memory(width: int = 80) -> dict:
    """What VSD adds on top of the frozen prior on the reduced UNet: bytes of the tensors its eps_phi
    holds that are not the prior's (LoRA adapters + camera MLP; a UNet copy if there were one), and
    resident memory after building it and after two training steps (run in a fresh process)."""
    from scalegen.config import load_config  # noqa: PLC0415
    from scalegen.data.cameras import sample_train_cameras  # noqa: PLC0415
    from scalegen.distill import build_distiller  # noqa: PLC0415
    from scalegen.priors.fakes import ReducedUNetPrior, reduced_sd21_unet  # noqa: PLC0415

    torch.set_num_threads(1)
    prior = ReducedUNetPrior(reduced_sd21_unet(width))
    frozen = {t.data_ptr() for t in [*prior.unet.parameters(), *prior.unet.buffers()]}
    unet_mb = _tensor_bytes([*prior.unet.parameters(), *prior.unet.buffers()], set()) / 2**20
    rss0 = _vm_mb("VmRSS")
    cfg = load_config(None, ["distill.name=vsd", "camera.views_per_prompt=1"])
    vsd = build_distiller(cfg, prior)
    model = vsd.model
    owned = [*model.parameters(), *model.buffers(), *model.trainable().values()]
    rss1 = _vm_mb("VmRSS")
    opt = torch.optim.Adam(vsd.parameters(), lr=1e-4)
    cams = sample_train_cameras(cfg.camera, 1).expand(1)
    for step in range(2):
        z = torch.randn(1, 4, 64, 64, requires_grad=True)
        loss, _ = vsd(z, torch.zeros(1, dtype=torch.long), cams, step)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return {"unet_mb": unet_mb, "vsd_extra_tensor_mb": _tensor_bytes(owned, frozen) / 2**20,
            "vsd_trainable_params": sum(p.numel() for p in vsd.parameters()),
            "rss_build_vsd_mb": rss1 - rss0, "peak_rss_mb": _vm_mb("VmHWM")}


def bench_sd_reduced(batch: int = 1, steps: int = 3, width: int = 80, names=SD_NAMES) -> dict:
    from scalegen.config import load_config  # noqa: PLC0415
    from scalegen.data.cameras import sample_train_cameras  # noqa: PLC0415
    from scalegen.distill import build_distiller  # noqa: PLC0415
    from scalegen.priors.fakes import ReducedUNetPrior, reduced_sd21_unet  # noqa: PLC0415

    prior = ReducedUNetPrior(reduced_sd21_unet(width))
    n_par = sum(p.numel() for p in prior.unet.parameters())
    print(f"[distill] reduced SD 2.1-base UNet: blocks {(width, 2 * width, 4 * width, 4 * width)}, "
          f"{n_par / 1e6:.1f}M parameters, latents {batch}x4x64x64", flush=True)
    cfg = load_config(None, ["camera.views_per_prompt=1"])
    cams = sample_train_cameras(cfg.camera, batch).expand(batch)
    text = torch.arange(batch) % len(prior.emb)
    dists, opts = {}, {}
    for name in names:
        d = build_distiller(load_config(None, [f"distill.name={name}", "camera.views_per_prompt=1"]), prior)
        dists[name] = d
        ps = list(d.parameters())
        opts[name] = torch.optim.Adam(ps, lr=1e-4) if ps else None
    times = {n: [] for n in names}
    rows = {}
    torch.manual_seed(0)
    for r in range(steps + 1):
        for name in names:
            d, opt = dists[name], opts[name]
            z = torch.randn(batch, 4, 64, 64, requires_grad=True)
            rows0 = prior.unet_rows
            t0 = time.perf_counter()
            loss, _ = d(z, text, cams, step=100)
            if opt is not None:
                opt.zero_grad(set_to_none=True)
            loss.backward()
            if opt is not None:
                opt.step()
            dt = time.perf_counter() - t0
            rows[name] = (prior.unet_rows - rows0) / batch
            if r > 0:  # round 0 warms up allocators and kernels
                times[name].append(dt)
        print(f"[distill] round {r}: " + ", ".join(f"{n} {times[n][-1]:.2f}s" for n in names if times[n]), flush=True)
    out = {n: {"step_s": statistics.median(times[n]), "times": times[n], "frozen_unet_rows_per_image": rows[n]}
           for n in names}
    ref = {k: out[k]["step_s"] for k in ("sds", "vsd") if k in out}
    print(f"{'distiller':<9} {'s/step':>8} {'x SDS':>7} {'x VSD':>7} {'frozen UNet rows/img':>21}")
    for n, r in out.items():
        xs = r["step_s"] / ref["sds"] if "sds" in ref else float("nan")
        xv = r["step_s"] / ref["vsd"] if "vsd" in ref else float("nan")
        print(f"{n:<9} {r['step_s']:>8.2f} {xs:>7.2f} {xv:>7.2f} {r['frozen_unet_rows_per_image']:>21.1f}")
    return out


def bench_distill(opts: DistillOptions, overrides: list[str], out_root: str) -> dict:
    out = {}
    if opts.part in ("all", "oracle"):
        out["oracle"] = bench_oracle(overrides, out_root, opts.names)
    if opts.part in ("all", "sd"):
        out["sd_reduced"] = bench_sd_reduced(opts.sd_batch, opts.sd_steps, opts.sd_width,
                                             [n for n in SD_NAMES if n in opts.names])
        if "vsd" in opts.names:
            with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as ex:
                m = ex.submit(vsd_memory, opts.sd_width).result()
            out["vsd_memory"] = m
            print(f"[distill] VSD on the reduced UNet ({m['unet_mb']:.0f} MB of frozen weights): its eps_phi holds "
                  f"{m['vsd_extra_tensor_mb']:.1f} MB of its own tensors ({m['vsd_trainable_params']:,} trainable), "
                  f"+{m['rss_build_vsd_mb']:.0f} MB resident to build, peak {m['peak_rss_mb']:.0f} MB after 2 steps",
                  flush=True)
    return out
