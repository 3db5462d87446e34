"""Score Distillation Sampling (DreamFusion):  g = w(t) (eps_cfg(x_t, t) - eps).

One prior call per step on the stacked branches [cond @ t, uncond @ t]."""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from scalegen.distill.common import Distiller, TimestepSchedule, cfg_combine, cond_uncond_eps, grad_logs, target_loss
from scalegen.priors.base import Prior


class SDS(Distiller):
    def __init__(self, prior: Prior, schedule: TimestepSchedule, guidance_scale: float = 100.0,
                 weighting: str = "sds", t_group: int = 1):
        super().__init__(prior, schedule, weighting, t_group)
        self.scale = guidance_scale

    def gradient(self, latents: Tensor, text: Tensor, cameras, t: Tensor, eps: Tensor) -> Tensor:
        """g for given t and eps (exposed for tests and `bench guidance`)."""
        z = latents.detach()
        _, eps_c, eps_u = cond_uncond_eps(self.prior, z, eps, t, text, cameras)
        return self.w(t, z) * (cfg_combine(eps_u, eps_c, self.scale) - eps)

    def __call__(self, latents: Tensor, text: Tensor, cameras, step: int,
                 pooled: Optional[Tensor] = None) -> tuple[Tensor, dict[str, Tensor]]:
        t = self.sample_t(len(latents), step)
        g = self.gradient(latents, text, cameras, t, torch.randn_like(latents))
        return target_loss(latents, g), grad_logs(t, g)
