"""Classifier Score Distillation (Yu et al. 2023):  g = w(t) (eps_c(x_t, t) - eps_u(x_t, t)).

Only the classifier direction of CFG, without the injected-noise target; one prior call on
[cond @ t, uncond @ t]. With identical branches the gradient is exactly zero (tested)."""
from __future__ import annotations

import torch
from torch import Tensor

from scalegen.distill.common import TimestepSchedule, target_loss, weight
from scalegen.distill.sds import cond_uncond_eps


class CSD:
    def __init__(self, prior, schedule: TimestepSchedule, weighting: str = "sds", t_group: int = 1):
        self.prior, self.schedule, self.weighting, self.t_group = prior, schedule, weighting, t_group

    def parameters(self):
        return []

    def gradient(self, latents: Tensor, text: Tensor, cameras, t: Tensor, eps: Tensor) -> Tensor:
        z = latents.detach()
        _, eps_c, eps_u = cond_uncond_eps(self.prior, z, eps, t, text, cameras)
        return weight(self.prior.alphas_cumprod, t, self.weighting).to(z) * (eps_c - eps_u)

    def __call__(self, latents: Tensor, text: Tensor, cameras, step: int, pooled=None) -> tuple[Tensor, dict]:
        t = self.schedule.sample(len(latents), step, self.t_group)
        g = self.gradient(latents, text, cameras, t, torch.randn_like(latents))
        return target_loss(latents, g), {"t": t.float().mean().item(), "grad_norm": g.norm().item()}
