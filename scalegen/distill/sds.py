"""Score Distillation Sampling (DreamFusion):  g = w(t) (eps_cfg(x_t, t) - eps).

One prior call per step on the stacked branches [cond @ t, uncond @ t]."""
from __future__ import annotations

import torch
from torch import Tensor

from scalegen.distill.common import TimestepSchedule, cfg_combine, target_loss, weight


class SDS:
    def __init__(self, prior, schedule: TimestepSchedule, guidance_scale: float = 100.0,
                 weighting: str = "sds", t_group: int = 1):
        self.prior, self.schedule, self.scale = prior, schedule, guidance_scale
        self.weighting, self.t_group = weighting, t_group

    def parameters(self):
        return []

    def gradient(self, latents: Tensor, text: Tensor, cameras, t: Tensor, eps: Tensor) -> Tensor:
        """g for given t and eps (exposed for tests)."""
        z = latents.detach()
        _, eps_c, eps_u = cond_uncond_eps(self.prior, z, eps, t, text, cameras)
        eps_cfg = cfg_combine(eps_u, eps_c, self.scale)
        return weight(self.prior.alphas_cumprod, t, self.weighting).to(z) * (eps_cfg - eps)

    def __call__(self, latents: Tensor, text: Tensor, cameras, step: int, pooled=None) -> tuple[Tensor, dict]:
        t = self.schedule.sample(len(latents), step, self.t_group)
        eps = torch.randn_like(latents)
        g = self.gradient(latents, text, cameras, t, eps)
        return target_loss(latents, g), {"t": t.float().mean().item(), "grad_norm": g.norm().item()}


def cond_uncond_eps(prior, z: Tensor, eps: Tensor, t: Tensor, text: Tensor, cameras):
    """(x_t, eps_c, eps_u): noise ``z`` to t and run [cond @ t, uncond @ t] in ONE prior call."""
    x_t = prior.add_noise(z, eps, t)
    n = len(z)
    out = prior.predict_eps(torch.cat([x_t, x_t]), torch.cat([t, t]), torch.cat([text, prior.uncond_like(text)]),
                            _rows(cameras, 2))
    return x_t, out[:n], out[n:]


def _rows(cameras, repeats: int):
    """The per-row cameras of ``repeats`` stacked branches."""
    from scalegen.data.cameras import Cameras  # noqa: PLC0415 - local to keep this module light

    r = cameras.rows()
    cat = lambda x: torch.cat([x] * repeats, 1)  # noqa: E731
    return Cameras(cat(r.c2w), cat(r.fovy), cat(r.elevation), cat(r.azimuth), cat(r.distance),
                   r.height, r.width)
