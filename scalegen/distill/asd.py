"""Asynchronous Score Distillation (ScaleDreamer):

    g = w(t) (eps_cfg(x_t, t) - eps_c(x_{t+dt}, t+dt)),    x_s = a_s z + s_s eps (the SAME eps)

CFG only on the first branch, w taken at t, and the reference's draw (ScaleDreamer's
``get_t_plus``): ``dt = floor(U(0,1) * min(eta * (t - t_min_now), 999 - t))``, the cap applied
before the uniform factor so t + dt never piles up at 999. ``t_min_now`` is the annealed lower end
of the t range at this step. With view groups (MVDream) one t and one dt per group. The second term
replaces SDS's injected noise by the frozen model's own prediction at a slightly later timestep,
so the noise term cancels in expectation instead of being a high-variance target. One prior call
on [cond @ t, uncond @ t, cond @ t+dt]; only the first two are a CFG pair.
"""
from __future__ import annotations

import math
from typing import Optional

import torch
from torch import Tensor

from scalegen.data.cameras import Cameras
from scalegen.distill.common import Distiller, TimestepSchedule, cfg_combine, grad_logs, predict_branches, target_loss
from scalegen.priors.base import T, Prior


class ASD(Distiller):
    def __init__(self, prior: Prior, schedule: TimestepSchedule, guidance_scale: float = 7.5, eta: float = 0.1,
                 weighting: str = "sds", t_group: int = 1):
        super().__init__(prior, schedule, weighting, t_group)
        self.scale, self.eta = guidance_scale, eta

    def t_plus(self, t: Tensor, t_min: int) -> Tensor:
        """t + dt with dt = floor(U * min(eta (t - t_min), T - 1 - t)); one U per group of ``t_group``."""
        cap = torch.minimum(self.eta * (t - t_min).clamp(min=0).float(), (T - 1 - t).float())
        u = torch.rand(math.ceil(len(t) / self.t_group)).repeat_interleave(self.t_group)[: len(t)]
        return t + torch.floor(u * cap).long()

    def gradient(self, latents: Tensor, text: Tensor, cameras: Cameras, t: Tensor, t2: Tensor, eps: Tensor) -> Tensor:
        """g for given t, t + dt and eps (exposed for tests and `bench guidance`)."""
        z = latents.detach()
        x_t, x_t2 = self.prior.add_noise(z, eps, t), self.prior.add_noise(z, eps, t2)
        eps_c, eps_u, eps_c2 = predict_branches(self.prior, text, cameras,
                                                [(x_t, t, False), (x_t, t, True), (x_t2, t2, False)],
                                                cfg_pairs=[(0, 1)])
        return self.w(t, z) * (cfg_combine(eps_u, eps_c, self.scale) - eps_c2)

    def __call__(self, latents: Tensor, text: Tensor, cameras: Cameras, step: int,
                 pooled: Optional[Tensor] = None) -> tuple[Tensor, dict[str, Tensor]]:
        t = self.sample_t(len(latents), step)
        t_min, _ = self.schedule.range(step)
        t2 = self.t_plus(t, t_min)
        g = self.gradient(latents, text, cameras, t, t2, torch.randn_like(latents))
        return target_loss(latents, g), grad_logs(t, g, dt=(t2 - t).float().mean())
