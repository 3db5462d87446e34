"""FLOPs of one MVDream training step at real size, counted without weights: the MVDream UNet
(sd-v2.1-base-4view's config) and SD 2.1's VAE and text tower are built on the ``meta`` device and run
under ``torch.utils.flop_counter.FlopCounterMode``; the generator and renderer of the config run on
CPU at their real size (``flops_sd.field_flops``).

One micro-batch of the config (``scalegen/configs/mvdream/triplane_asd_dl17k.yaml``: 1 prompt x 4 views
per GPU) is ONE UNet call on every branch's rows (ASD: cond@t, uncond@t, cond@t+dt = 3 x 4 rows at
32x32 latents), the VAE encoder at 256^2 forward and backward to its input, and the generator +
renderer forward and backward; an optimizer step is ``train.grad_accum`` micro-batches. The same UNet
rows through Stable Diffusion's UNet (per-view self-attention, no camera) give the cost of the
multi-view attention. Counted: matrix multiplies, convolutions, attention; not elementwise work, so
these are lower bounds. ``scalegen bench flops-mvdream [--json FILE] [bench.config=FILE] [key=value ...]``.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from scalegen.bench.flops_sd import _count, _params, field_flops, text_flops, unet_flops, vae_encode_flops


def mvdream_unet_flops(rows: int, latent: int = 32, num_frames: int = 4) -> tuple[int, int]:
    """(forward FLOPs of the real-size MVDream UNet on ``rows`` = objects x ``num_frames`` rows, parameters)."""
    from diffusers.models.attention_processor import AttnProcessor  # noqa: PLC0415

    from scalegen.priors.mvdream_unet import MultiViewUNet, mvdream_unet_config  # noqa: PLC0415

    with torch.device("meta"):
        unet = MultiViewUNet(**mvdream_unet_config()).eval().requires_grad_(False)
    unet.use_multiview_attention(AttnProcessor())  # explicit matmuls: every attention FLOP is seen
    x = torch.empty(rows, 4, latent, latent, device="meta")
    t = torch.zeros(rows, dtype=torch.long, device="meta")
    ehs = torch.empty(rows, 77, 1024, device="meta")
    cam = torch.empty(rows, 16, device="meta")
    with torch.no_grad():
        return _count(lambda: unet(x, t, ehs, cam, num_frames=num_frames)), _params(unet)


@dataclass
class FlopsMVDreamOptions:
    config: str = "configs/mvdream/triplane_asd_dl17k.yaml"  # the run whose step is counted
    peak_tflops: float = 800.0  # the accelerator's dense bf16 peak for the time floor (H100 SXM ~ 990, 800 sustained)
    device: str = "cpu"  # where the generator + renderer part is counted (bench gpu counts it on cuda)


def bench_flops_mvdream(opts: FlopsMVDreamOptions, overrides: list[str], out_root: str = "") -> dict:
    from scalegen.config import load_config  # noqa: PLC0415
    from scalegen.errors import ConfigError  # noqa: PLC0415
    from scalegen.eval.report import format_table  # noqa: PLC0415

    cfg = load_config(opts.config, overrides)
    if cfg.prior.name != "mvdream":
        raise ConfigError(f"bench flops-mvdream counts an MVDream step; '{opts.config}' uses prior "
                          f"{cfg.prior.name} (use `scalegen bench flops-sd`)")
    v = cfg.camera.views_per_prompt
    n = cfg.data.prompts_per_step * v  # images per GPU per micro-batch
    branches = {"sds": 2, "asd": 3}.get(cfg.distill.name, 2)
    enc, lat = cfg.prior.resolutions()
    accum = cfg.train.grad_accum
    u, u_params = mvdream_unet_flops(branches * n, lat, v)
    u_sd, _ = unet_flops(branches * n, lat)  # the same rows through SD 2.1's UNet: per-view attention
    vf, vb, v_params = vae_encode_flops(n, enc)
    tf, t_params = text_flops(1)  # MVDream embeds the prompt alone (no view-dependent variants)
    rows = {"unet (no grad)": u, "vae encode forward": vf, "vae encode backward (to input)": vb}
    res: dict = {"config": opts.config, "images_per_micro_batch": n, "views_per_prompt": v, "unet_branches": branches,
                 "distill": cfg.distill.name, "encode_resolution": enc, "latent_resolution": lat,
                 "grad_accum": accum, "peak_tflops": opts.peak_tflops}
    try:
        fl = field_flops(cfg, opts.device)
        rows["generator + renderer forward"] = fl["forward"]
        rows["generator + renderer backward"] = fl["backward"]
        res["field"] = fl
    except ConfigError as e:
        res["field"] = {"skipped": str(e)}
    micro = sum(rows.values())
    floor_ms = accum * micro / (opts.peak_tflops * 1e12) * 1e3
    res.update({"flops": rows, "micro_batch_flops": micro, "step_flops": accum * micro, "floor_ms": floor_ms,
                "unet_multiview_attention_overhead_flops": u - u_sd, "unet_sd21_same_rows_flops": u_sd,
                "params": {"unet": u_params, "vae_encoder": v_params, "text": t_params},
                "text_flops_per_new_prompt": tf})
    print(f"one micro-batch: {n} image(s) ({cfg.data.prompts_per_step} prompt(s) x {v} views) x {branches} UNet "
          f"branches ({cfg.distill.name}), render -> {enc}^2 -> VAE -> {lat}^2 latents; {accum} micro-batch(es) "
          "per optimizer step")
    table = [[name, f"{f / 1e9:.1f}", f"{100.0 * f / micro:.1f}%"] for name, f in rows.items()]
    table.append(["micro-batch total", f"{micro / 1e9:.1f}", "100.0%"])
    print(format_table(table, ["part", "GFLOPs", "share"]))
    print(f"multi-view self-attention: the UNet costs {u / 1e9:.1f} GFLOPs vs {u_sd / 1e9:.1f} for the same rows with "
          f"per-view attention (+{100.0 * (u - u_sd) / u_sd:.1f}%)")
    print(f"optimizer step ({accum} micro-batches): {accum * micro / 1e9:.1f} GFLOPs, floor on an H100 at "
          f"{opts.peak_tflops:.0f} TFLOP/s: {floor_ms:.2f} ms per GPU")
    print(f"text tower per new prompt (cached afterwards): {tf / 1e9:.1f} GFLOPs")
    return res
