"""Variational Distribution Mapping with Distribution Coefficient Annealing (DreamMapping, 2024).

This is OUR READING of the paper (it publishes no code): the variational denoiser is the prior's
own denoiser followed by a learned degradation ``M_psi`` that maps the prior's clean estimate to
the distribution of the current renders, so it trains without back-propagating through the UNet.

    x0_p   = (x_t - s_t eps_cfg) / a_t                    (the prior's estimate; no grad)
    x0_q   = M_psi(sg(x0_p), t, camera, pooled prompt)     (identity at init)
    psi    minimises ||M_psi(sg(x0_p), ...) - sg(z)||^2    (no UNet Jacobian anywhere)
    eps_q  = (x_t - a_t x0_q) / s_t
    DCA:   eps_target = lambda(t) eps_q + (1 - lambda(t)) eps
    g      = w(t) (eps_cfg - eps_target)

lambda = 0 is SDS exactly (tested); lambda = 1 is pure VDM (and g = 0 while M_psi is the identity,
as VSD's g is ~0 while its LoRA equals the prior). ``lambda(t)`` is annealed by timestep:
``linear`` or ``cosine`` in t/T from ``lambda_ends[0]`` at t = 0 to ``lambda_ends[1]`` at t = T, or
``constant`` (= ``lambda_ends[0]``). One prior call per step, on [cond @ t, uncond @ t], exactly SDS's.
"""
from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from scalegen.data.cameras import Cameras
from scalegen.distill.common import Distiller, TimestepSchedule, cfg_combine, cond_uncond_eps, grad_logs, target_loss
from scalegen.distill.nets import camera_vector
from scalegen.priors.base import T, Prior


def dca_lambda(t: Tensor, schedule: str = "linear", ends: tuple[float, float] = (1.0, 0.0)) -> Tensor:
    """lambda(t) [N, 1, 1, 1]: from ``ends[0]`` at t = 0 to ``ends[1]`` at t = T."""
    lo, hi = ends
    u = t.float() / T
    if schedule == "constant":
        lam = torch.full_like(u, lo)
    elif schedule == "linear":
        lam = lo + (hi - lo) * u
    elif schedule == "cosine":
        lam = hi + (lo - hi) * 0.5 * (1.0 + torch.cos(math.pi * u))
    else:
        raise ValueError(f"unknown DCA schedule {schedule!r}")
    return lam.view(-1, 1, 1, 1)


class VDM(Distiller):
    def __init__(self, prior: Prior, schedule: TimestepSchedule, mapper: torch.nn.Module, guidance_scale: float = 7.5,
                 weighting: str = "sds", t_group: int = 1, lr: float = 1e-3, dca_schedule: str = "linear",
                 dca_ends: tuple[float, float] = (1.0, 0.0)):
        super().__init__(prior, schedule, weighting, t_group)
        self.mapper, self.scale, self.lr = mapper, guidance_scale, lr
        self.dca_schedule, self.dca_ends = dca_schedule, tuple(dca_ends)

    # --- the state VDM owns: M_psi -----------------------------------------------------------------
    def param_groups(self):
        return [("vdm_psi", list(self.mapper.parameters()), self.lr)]

    def state_dict(self) -> dict[str, Tensor]:
        return dict(self.mapper.state_dict())

    def load_state_dict(self, state: dict[str, Tensor]) -> None:
        self.mapper.load_state_dict(state)

    def gradient_and_loss(self, latents: Tensor, text: Tensor, cameras: Cameras, t: Tensor, eps: Tensor,
                          pooled: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """(g, psi's loss) for given t and eps (exposed for tests)."""
        z = latents.detach()
        n = len(z)
        x_t, eps_c, eps_u = cond_uncond_eps(self.prior, z, eps, t, text, cameras)
        eps_cfg = cfg_combine(eps_u, eps_c, self.scale).to(z)
        ab = self.prior.alphas_cumprod.to(z.device)[t].view(-1, 1, 1, 1).to(z)
        a, s_t = ab.sqrt(), (1 - ab).sqrt()
        x0_p = ((x_t - s_t * eps_cfg) / a).detach()
        x0_q = self.mapper(x0_p, t.to(z.device), camera_vector(cameras, n).to(z), pooled)
        loss_psi = F.mse_loss(x0_q, z)
        eps_q = (x_t - a * x0_q.detach()) / s_t
        lam = dca_lambda(t, self.dca_schedule, self.dca_ends).to(z)
        eps_target = lam * eps_q + (1 - lam) * eps
        g = self.w(t, z) * (eps_cfg - eps_target)
        return g, loss_psi

    def __call__(self, latents: Tensor, text: Tensor, cameras: Cameras, step: int,
                 pooled: Optional[Tensor] = None) -> tuple[Tensor, dict[str, Tensor]]:
        t = self.sample_t(len(latents), step)
        g, loss_psi = self.gradient_and_loss(latents, text, cameras, t, torch.randn_like(latents), pooled)
        return target_loss(latents, g) + loss_psi.to(latents.dtype), grad_logs(t, g, loss_psi=loss_psi)
