"""Score Distillation Sampling (DreamFusion):  g = w(t) (eps_cfg(x_t, t) - eps).

One prior call per step on the stacked branches [cond @ t, uncond @ t].

With ``x0_recon`` (MVDream's x0-reconstruction form of SDS, its Sec. 3.2 and threestudio's
``recon_loss``), the same call gives

    x0_hat = (x_t - s_t eps_cfg) / a_t,        g = z - x0_hat'   (no w(t)),

where, with ``x0_rescale = r > 0``, the guided x0's standard deviation is pulled towards the conditional
one's per object (the views of a group; CFG rescale, Lin et al. 2023, as the reference applies it):

    x0_c = (x_t - s_t eps_c) / a_t,   x0_hat' = r * x0_hat * std(x0_c) / std(x0_hat) + (1 - r) * x0_hat.

With r = 0 this is SDS with w(t) = s_t / a_t, since z - x0_hat = (s_t / a_t)(eps_cfg - eps); MVDream
pairs it with CFG 50 and r = 0.5 against over-saturation.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from scalegen.data.cameras import Cameras
from scalegen.distill.common import Distiller, TimestepSchedule, cfg_combine, cond_uncond_eps, grad_logs, target_loss
from scalegen.priors.base import Prior


def rescaled_x0(x0_cfg: Tensor, x0_c: Tensor, rescale: float, views: int) -> Tensor:
    """r * x0_cfg * std(x0_c) / std(x0_cfg) + (1 - r) * x0_cfg, the stds taken over each group of
    ``views`` consecutive images (one object) with the reference's 1e-8 guards."""
    shape = (-1, views, *x0_cfg.shape[1:])
    dims = tuple(range(1, x0_cfg.dim() + 1))
    factor = (x0_c.reshape(shape).std(dims, keepdim=True) + 1e-8) / (x0_cfg.reshape(shape).std(dims, keepdim=True) + 1e-8)
    adjusted = (x0_cfg.reshape(shape) * factor).reshape(x0_cfg.shape)
    return rescale * adjusted + (1 - rescale) * x0_cfg


class SDS(Distiller):
    def __init__(self, prior: Prior, schedule: TimestepSchedule, guidance_scale: float = 100.0,
                 weighting: str = "sds", t_group: int = 1, x0_recon: bool = False, x0_rescale: float = 0.0,
                 views: int = 1):
        super().__init__(prior, schedule, weighting, t_group)
        self.scale = guidance_scale
        self.x0_recon, self.x0_rescale, self.views = x0_recon, x0_rescale, views

    def gradient(self, latents: Tensor, text: Tensor, cameras: Cameras, t: Tensor, eps: Tensor) -> Tensor:
        """g for given t and eps (exposed for tests and `bench guidance`)."""
        z = latents.detach()
        x_t, eps_c, eps_u = cond_uncond_eps(self.prior, z, eps, t, text, cameras)
        eps_cfg = cfg_combine(eps_u, eps_c, self.scale)
        if not self.x0_recon:
            return self.w(t, z) * (eps_cfg - eps)
        ab = self.prior.alphas_cumprod.to(z)[t.to(z.device)].view(-1, *[1] * (z.dim() - 1))
        a_t, s_t = ab.sqrt(), (1 - ab).sqrt()
        x0 = (x_t - s_t * eps_cfg) / a_t
        if self.x0_rescale > 0:
            if len(z) % self.views:
                raise ValueError(f"{len(z)} images do not split into objects of {self.views} views")
            x0 = rescaled_x0(x0, (x_t - s_t * eps_c) / a_t, self.x0_rescale, self.views)
        return z - x0

    def __call__(self, latents: Tensor, text: Tensor, cameras: Cameras, step: int,
                 pooled: Optional[Tensor] = None) -> tuple[Tensor, dict[str, Tensor]]:
        t = self.sample_t(len(latents), step)
        g = self.gradient(latents, text, cameras, t, torch.randn_like(latents))
        return target_loss(latents, g), grad_logs(t, g)
