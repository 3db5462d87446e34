"""The VAE path shared by the latent-diffusion priors (Stable Diffusion, MVDream): the reference
encode of ScaleDreamer/threestudio (bilinear resize of the render to the VAE's input size,
``2 rgb - 1``, a posterior sample WITH grad, times the VAE's scaling factor) and the decode for
pictures."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}


def weights_dtype(dtype: str, device: torch.device) -> torch.dtype:
    """The dtype a latent-diffusion prior's UNet and VAE load in: ``prior.dtype`` on an accelerator, fp32 on
    the CPU (half precision there is slow or unsupported for some kernels). ``fp32`` is the references' MVDream
    precision (docs/reference-fidelity.md)."""
    return DTYPES[dtype] if torch.device(device).type != "cpu" else torch.float32


def vae_encode(vae, rgb: Tensor, resolution: int, latent_resolution: int, scaling: float, dtype: torch.dtype) -> Tensor:
    """rgb [N, 3, h, w] in [0, 1] -> latents [N, C, latent_resolution, latent_resolution] in fp32, with
    gradient to ``rgb`` through the frozen encoder; latents of another size are resized (bilinear)."""
    with torch.autocast(rgb.device.type, enabled=False):
        x = rgb.float()
        if x.shape[-2:] != (resolution, resolution):
            x = F.interpolate(x, (resolution, resolution), mode="bilinear", align_corners=False)
        z = vae.encode((x * 2.0 - 1.0).to(dtype)).latent_dist.sample() * scaling
        z = z.float()
        if z.shape[-2:] != (latent_resolution,) * 2:
            z = F.interpolate(z, (latent_resolution,) * 2, mode="bilinear", align_corners=False)
    return z


@torch.no_grad()
def vae_decode(vae, latents: Tensor, scaling: float, dtype: torch.dtype) -> Tensor:
    img = vae.decode((latents / scaling).to(dtype)).sample.float()
    return (img * 0.5 + 0.5).clamp(0, 1)
