"""Fake priors shared by the tests and the benchmarks. They subclass ``Prior`` like the real ones, so
every distiller runs through exactly the code path it runs in training.

* ``LinearPrior``: eps is an explicit function of (x_t, t, condition), so each distiller's formula can
  be checked by hand: ``eps = 0.5 x_t + 0.1 t / 1000 + offset * [row is conditional]``.
* ``ReducedUNetPrior``: a bare diffusers UNet (no VAE, no text tower) with random token embeddings per
  prompt id and the real DDPM schedule; it exposes its UNet as ``denoiser_net()``, so VSD puts its LoRA
  on it as it does on Stable Diffusion. ``reduced_sd21_unet(width)`` builds SD 2.1-base's UNet
  architecture at a fraction of its width (benchmarks of step cost without the weights).
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from scalegen.data.cameras import Cameras
from scalegen.priors.base import DenoiserNet, Guidance, Prior, ddpm_alphas_cumprod


class LinearPrior(Prior):
    latent_channels = 1

    def __init__(self, cond_offset: float = 0.3):
        self.alphas_cumprod = ddpm_alphas_cumprod()
        self.off = cond_offset
        self.calls: list[int] = []  # rows of each predict_eps call
        self.guidance: list[Guidance] = []  # what each call was told

    def encode(self, rgb: Tensor) -> Tensor:
        return rgb

    def decode(self, latents: Tensor) -> Tensor:
        return latents

    def text_embeddings(self, prompts: list[str], tokens: Optional[Tensor] = None) -> Tensor:
        return torch.arange(len(prompts))

    def predict_eps(self, x_t: Tensor, t: Tensor, text: Tensor, cameras: Cameras,
                    guidance: Optional[Guidance] = None) -> Tensor:
        guidance = guidance or Guidance.all_conditional(len(x_t))
        self.calls.append(len(x_t))
        self.guidance.append(guidance)
        cond = (~guidance.uncond).float().view(-1, 1, 1, 1)
        return 0.5 * x_t + 0.1 * t.view(-1, 1, 1, 1) / 1000 + cond * self.off


class ReducedUNetPrior(Prior):
    latent_channels = 4

    def __init__(self, unet, n_prompts: int = 4, tokens: int = 77, seed: int = 0):
        g = torch.Generator().manual_seed(seed)
        self.unet = unet.eval().requires_grad_(False)
        dim = unet.config.cross_attention_dim
        self.emb = torch.randn(n_prompts, tokens, dim, generator=g)
        self.uncond = torch.randn(tokens, dim, generator=g)
        self.alphas_cumprod = ddpm_alphas_cumprod()
        self.unet_rows = 0  # rows the frozen UNet has denoised (VSD's LoRA calls not counted)

    def encode(self, rgb: Tensor) -> Tensor:
        return rgb

    def decode(self, latents: Tensor) -> Tensor:
        return latents

    def text_embeddings(self, prompts: list[str], tokens: Optional[Tensor] = None) -> Tensor:
        return torch.arange(len(prompts)) % len(self.emb)

    def embed(self, text: Tensor) -> Tensor:
        return self.emb[text]

    @torch.no_grad()
    def predict_eps(self, x_t: Tensor, t: Tensor, text: Tensor, cameras: Cameras,
                    guidance: Optional[Guidance] = None) -> Tensor:
        guidance = guidance or Guidance.all_conditional(len(x_t))
        self.unet_rows += len(x_t)
        emb = torch.where(guidance.uncond.view(-1, 1, 1), self.uncond, self.embed(text))
        return self.unet(x_t, t, encoder_hidden_states=emb).sample

    def denoiser_net(self) -> DenoiserNet:
        return DenoiserNet(self.unet, embed=self.embed, to_eps=lambda out, x, t: out, device=self.device)


def reduced_sd21_unet(width: int = 80, seed: int = 0):
    """SD 2.1-base's UNet (layers, attention layout, cross-attention 1024) with block channels
    (w, 2w, 4w, 4w) and 16 GroupNorm groups (80 channels do not split into 32), random weights."""
    from diffusers import UNet2DConditionModel  # noqa: PLC0415

    from scalegen.priors.stable_diffusion import SD21_BASE_UNET  # noqa: PLC0415

    torch.manual_seed(seed)
    cfg = dict(SD21_BASE_UNET)
    cfg["block_out_channels"] = (width, 2 * width, 4 * width, 4 * width)
    cfg["norm_num_groups"] = 16
    return UNet2DConditionModel(**cfg)
