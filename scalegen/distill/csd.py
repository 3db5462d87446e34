"""Classifier Score Distillation (Yu et al. 2023):  g = w(t) (eps_c(x_t, t) - eps_u(x_t, t)).

Only the classifier direction of CFG, without the injected-noise target; one prior call on
[cond @ t, uncond @ t]. With identical branches the gradient is exactly zero (tested)."""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from scalegen.data.cameras import Cameras
from scalegen.distill.common import Distiller, cond_uncond_eps, grad_logs, target_loss


class CSD(Distiller):
    def gradient(self, latents: Tensor, text: Tensor, cameras: Cameras, t: Tensor, eps: Tensor) -> Tensor:
        z = latents.detach()
        _, eps_c, eps_u = cond_uncond_eps(self.prior, z, eps, t, text, cameras)
        return self.w(t, z) * (eps_c - eps_u)

    def __call__(self, latents: Tensor, text: Tensor, cameras: Cameras, step: int,
                 pooled: Optional[Tensor] = None) -> tuple[Tensor, dict[str, Tensor]]:
        t = self.sample_t(len(latents), step)
        g = self.gradient(latents, text, cameras, t, torch.randn_like(latents))
        return target_loss(latents, g), grad_logs(t, g)
