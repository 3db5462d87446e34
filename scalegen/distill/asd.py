"""Asynchronous Score Distillation (ScaleDreamer):

    g = w(t) (eps_cfg(x_t, t) - eps_c(x_{t+dt}, t+dt)),    x_s = a_s z + s_s eps (the SAME eps)

CFG only on the first branch, w taken at t, ``dt = floor(U(0,1) * eta * (t - t_min_now))`` and
t+dt clamped to [1, 999]. The second term replaces SDS's injected noise by the frozen model's own
prediction at a slightly later timestep, so the noise term cancels in expectation instead of
being a high-variance target. One prior call on [cond @ t, uncond @ t, cond @ t+dt].
"""
from __future__ import annotations

import torch
from torch import Tensor

from scalegen.distill.common import TimestepSchedule, cfg_combine, target_loss, weight
from scalegen.distill.sds import _rows
from scalegen.priors.base import T


class ASD:
    def __init__(self, prior, schedule: TimestepSchedule, guidance_scale: float = 7.5, eta: float = 0.1,
                 weighting: str = "sds", t_group: int = 1):
        self.prior, self.schedule, self.scale, self.eta = prior, schedule, guidance_scale, eta
        self.weighting, self.t_group = weighting, t_group

    def parameters(self):
        return []

    def t_plus(self, t: Tensor, t_min: int) -> Tensor:
        dt = torch.floor(torch.rand(len(t)) * self.eta * (t - t_min).clamp(min=0).float()).long()
        return (t + dt).clamp(1, T - 1)

    def gradient(self, latents: Tensor, text: Tensor, cameras, t: Tensor, t2: Tensor, eps: Tensor) -> Tensor:
        z = latents.detach()
        x_t, x_t2 = self.prior.add_noise(z, eps, t), self.prior.add_noise(z, eps, t2)
        n = len(z)
        out = self.prior.predict_eps(torch.cat([x_t, x_t, x_t2]), torch.cat([t, t, t2]),
                                     torch.cat([text, self.prior.uncond_like(text), text]),
                                     _rows(cameras, 3))
        eps_c, eps_u, eps_c2 = out[:n], out[n:2 * n], out[2 * n:]
        eps_cfg = cfg_combine(eps_u, eps_c, self.scale)
        return weight(self.prior.alphas_cumprod, t, self.weighting).to(z) * (eps_cfg - eps_c2)

    def __call__(self, latents: Tensor, text: Tensor, cameras, step: int, pooled=None) -> tuple[Tensor, dict]:
        t = self.schedule.sample(len(latents), step, self.t_group)
        t_min, _ = self.schedule.range(step)
        t2 = self.t_plus(t, t_min)
        if self.t_group > 1:  # one dt per view group too
            t2 = (t + (t2 - t)[:: self.t_group].repeat_interleave(self.t_group)[: len(t)]).clamp(1, T - 1)
        eps = torch.randn_like(latents)
        g = self.gradient(latents, text, cameras, t, t2, eps)
        return target_loss(latents, g), {"t": t.float().mean().item(), "dt": (t2 - t).float().mean().item(),
                                         "grad_norm": g.norm().item()}
