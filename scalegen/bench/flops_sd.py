"""FLOPs of one training step on the real-size Stable Diffusion 2.1-base path, counted without
weights: UNet, VAE and CLIP text tower are built from SD 2.1-base's published configs on the
``meta`` device (shapes only, no memory, no download) and run under
``torch.utils.flop_counter.FlopCounterMode``; the generator and renderer of the config run on
CPU at the config's real size (their parameters are small).

Counted: matrix multiplies, convolutions and attention (forward, and backward where a step
backpropagates: VAE encoder w.r.t. its input, renderer and generator). Not counted: elementwise
work (norms, activations, the hash-grid gathers), so these are lower bounds on arithmetic and the
implied times are floors. ``scalegen bench flops-sd [--json FILE] [key=value ...]``.
"""
from __future__ import annotations

import time
from dataclasses import dataclass

import torch

from scalegen.priors.stable_diffusion import SD21_BASE_UNET

# Published configs of stabilityai/stable-diffusion-2-1-base (vae/, text_encoder/ config.json).
SD21_BASE_VAE = dict(
    in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(128, 256, 512, 512), layers_per_block=2,
    down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4, norm_num_groups=32,
    act_fn="silu", sample_size=512, scaling_factor=0.18215,
)
SD21_TEXT = dict(vocab_size=49408, hidden_size=1024, intermediate_size=4096, num_hidden_layers=23,
                 num_attention_heads=16, max_position_embeddings=77, hidden_act="gelu", projection_dim=512)


def _count(fn) -> int:
    from torch.utils.flop_counter import FlopCounterMode  # noqa: PLC0415

    with FlopCounterMode(display=False) as fc:
        fn()
    return int(fc.get_total_flops())


def _params(module) -> int:
    return sum(p.numel() for p in module.parameters())


def unet_flops(rows: int, latent: int = 64) -> tuple[int, int]:
    """(forward FLOPs for ``rows`` stacked branches at ``latent``^2, parameters)."""
    from diffusers import UNet2DConditionModel  # noqa: PLC0415
    from diffusers.models.attention_processor import AttnProcessor  # noqa: PLC0415

    with torch.device("meta"):
        unet = UNet2DConditionModel(**SD21_BASE_UNET).eval().requires_grad_(False)
    unet.set_attn_processor(AttnProcessor())  # explicit matmuls: every attention FLOP is seen
    x = torch.empty(rows, 4, latent, latent, device="meta")
    t = torch.zeros(rows, dtype=torch.long, device="meta")
    ehs = torch.empty(rows, 77, 1024, device="meta")
    with torch.no_grad():
        return _count(lambda: unet(x, t, encoder_hidden_states=ehs)), _params(unet)


def vae_encode_flops(images: int, resolution: int = 512) -> tuple[int, int, int]:
    """(forward, backward-to-input FLOPs of the VAE encoder at ``resolution``^2, parameters)."""
    from diffusers import AutoencoderKL  # noqa: PLC0415
    from diffusers.models.attention_processor import AttnProcessor  # noqa: PLC0415

    with torch.device("meta"):
        vae = AutoencoderKL(**SD21_BASE_VAE).eval().requires_grad_(False)
    vae.set_attn_processor(AttnProcessor())
    rgb = torch.empty(images, 3, resolution, resolution, device="meta", requires_grad=True)
    state = {}

    def fwd():
        state["z"] = vae.encode(rgb * 2 - 1).latent_dist.mean * 0.18215

    f = _count(fwd)
    b = _count(lambda: state["z"].sum().backward())
    return f, b, _params(vae.encoder) + _params(vae.quant_conv)


def text_flops(sequences: int) -> tuple[int, int]:
    from transformers import CLIPTextConfig, CLIPTextModel  # noqa: PLC0415

    with torch.device("meta"):
        model = CLIPTextModel(CLIPTextConfig(**SD21_TEXT)).eval()
    ids = torch.zeros(sequences, 77, dtype=torch.long, device="meta")
    with torch.no_grad():
        return _count(lambda: model(ids)), _params(model)


def field_flops(cfg, device: str = "cpu") -> dict:
    """Generator + background + renderer forward and backward at the config's real size (on ``device``)."""
    from scalegen.data.cameras import sample_train_cameras  # noqa: PLC0415
    from scalegen.generators import build_generator  # noqa: PLC0415
    from scalegen.render import build_background, build_renderer  # noqa: PLC0415
    from scalegen.text.base import TextCond  # noqa: PLC0415

    b = cfg.data.prompts_per_step
    gen, bg = build_generator(cfg, 1024).to(device), build_background(cfg, 1024).to(device)
    renderer = build_renderer(cfg).train().to(device)
    cond = TextCond(torch.randn(b, 1024) / 32, torch.zeros(b, 77, 1024), torch.ones(b, 77, dtype=torch.bool)).to(device)
    cams = sample_train_cameras(cfg.camera, b).to(device)
    state = {}
    t0 = time.perf_counter()

    def fwd():
        field = gen(cond)
        state["out"] = renderer(field, cams, background=bg.bind(cond), with_eikonal=True)

    f = _count(fwd)
    out = state["out"]
    bwd = _count(lambda: (out.rgb.sum() + out.eikonal).backward())
    return {"forward": f, "backward": bwd, "params": _params(gen) + _params(bg), "cpu_s": time.perf_counter() - t0}


@dataclass
class FlopsOptions:
    config: str = "configs/sd/hyper_ingp_asd_mg15.yaml"  # the run whose step is counted
    peak_tflops: float = 800.0  # the accelerator's dense bf16 peak for the time floor (H100 SXM ~ 990, 800 sustained)
    device: str = "cpu"  # where the generator + renderer part is counted (bench gpu counts it on cuda)


def bench_flops_sd(opts: FlopsOptions, overrides: list[str], out_root: str = "") -> dict:
    from scalegen.config import load_config  # noqa: PLC0415
    from scalegen.errors import ConfigError  # noqa: PLC0415

    config, peak_tflops = opts.config, opts.peak_tflops
    cfg = load_config(config, overrides)
    n = cfg.data.prompts_per_step * cfg.camera.views_per_prompt  # images per GPU per step
    branches = {"sds": 2, "asd": 3}.get(cfg.distill.name, 2)
    perp = cfg.prior.perp_neg > 0
    k = branches + (2 if perp else 0)
    enc, lat = cfg.prior.resolutions()
    res: dict = {"config": config, "images_per_step": n,
                 "unet_branches": k, "distill": cfg.distill.name, "perp_neg": perp,
                 "encode_resolution": enc, "latent_resolution": lat, "peak_tflops": peak_tflops}
    u, u_params = unet_flops(k * n, lat)
    u1, _ = unet_flops(1, lat)
    vf, vb, v_params = vae_encode_flops(n, enc)
    vf256, vb256, _ = vae_encode_flops(n, 256)
    tf, t_params = text_flops(4)
    rows = {"unet (no grad)": u, "vae encode forward": vf, "vae encode backward (to input)": vb}
    try:
        fl = field_flops(cfg, opts.device)
        rows["generator + renderer forward"] = fl["forward"]
        rows["generator + renderer backward"] = fl["backward"]
        res["field"] = fl
    except ConfigError as e:
        res["field"] = {"skipped": str(e)}
    total = sum(rows.values())
    res.update({
        "flops": rows, "total_flops": total, "floor_ms": total / (peak_tflops * 1e12) * 1e3,
        "unet_flops_per_branch_image": u1, "params": {"unet": u_params, "vae_encoder": v_params, "text": t_params},
        "vae_256": {"forward": vf256, "backward": vb256},
        "text_flops_per_new_prompt": tf,  # 4 view-dependent prompts, once per prompt (cached)
    })
    share = {name: 100.0 * v / total for name, v in rows.items()}
    print(f"one training step, {n} image(s) x {k} UNet branches ({cfg.distill.name}"
          f"{' + Perp-Neg' if perp else ''}), render -> {enc}^2 -> VAE -> {lat}^2 latents")
    width = max(len(r) for r in rows) + 2
    print(f"{'part':<{width}}{'GFLOPs':>12}{'share':>9}")
    for name, v in rows.items():
        print(f"{name:<{width}}{v / 1e9:>12.1f}{share[name]:>8.1f}%")
    print(f"{'total':<{width}}{total / 1e9:>12.1f}")
    print(f"floor on an H100 at {peak_tflops:.0f} TFLOP/s (bf16 dense): {res['floor_ms']:.2f} ms per step "
          f"per GPU = {1e3 / res['floor_ms']:.0f} steps/s at best")
    cheap = total - vf - vb + vf256 + vb256
    print(f"encode at 256 instead: VAE {(vf256 + vb256) / 1e9:.1f} GFLOPs, step {cheap / 1e9:.1f} GFLOPs "
          f"({cheap / (peak_tflops * 1e12) * 1e3:.2f} ms floor)")
    print(f"text tower per new prompt (4 view prompts, cached afterwards): {tf / 1e9:.1f} GFLOPs")
    res["encode_256_total_flops"] = cheap
    return res
