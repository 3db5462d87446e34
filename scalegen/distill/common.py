"""Pieces every distiller shares: the timestep schedule, w(t), CFG and the target-trick loss."""
from __future__ import annotations

import math

import torch
from torch import Tensor

from scalegen.priors.base import T


class TimestepSchedule:
    """Timesteps t ~ U[t_min(step), t_max(step)] (integer DDPM indices). The range anneals linearly
    from ``start`` to ``end`` (fractions of T) over ``anneal_steps`` (below 1: fraction of
    ``max_steps``), as ScaleDreamer anneals [0.50, 0.98] -> [0.02, 0.50]."""

    def __init__(self, start: list[float], end: list[float], anneal_steps: float, max_steps: int):
        self.start, self.end = start, end
        self.anneal = anneal_steps * max_steps if anneal_steps <= 1.0 else anneal_steps

    def range(self, step: int) -> tuple[int, int]:
        f = min(step / max(self.anneal, 1e-9), 1.0)
        lo = self.start[0] + (self.end[0] - self.start[0]) * f
        hi = self.start[1] + (self.end[1] - self.start[1]) * f
        return int(T * lo), int(T * hi)

    def sample(self, n: int, step: int, group: int = 1) -> Tensor:
        """``n`` timesteps; with ``group > 1`` consecutive groups of that size share one t."""
        lo, hi = self.range(step)
        t = torch.randint(max(lo, 1), max(hi, lo, 1) + 1, (math.ceil(n / group),))
        return t.repeat_interleave(group)[:n].clamp(1, T - 1)


def weight(alphas_cumprod: Tensor, t: Tensor, kind: str) -> Tensor:
    """w(t): ``sds`` = 1 - alphabar_t (DreamFusion), ``uniform`` = 1. Shape [N, 1, 1, 1]."""
    if kind == "uniform":
        return torch.ones(len(t), 1, 1, 1)
    return (1.0 - alphas_cumprod[t]).view(-1, 1, 1, 1)


def cfg_combine(eps_u: Tensor, eps_c: Tensor, scale: float) -> Tensor:
    """Classifier-free guidance, diffusers convention: eps_u + s (eps_c - eps_u)."""
    return eps_u + scale * (eps_c - eps_u)


def target_loss(latents: Tensor, grad: Tensor) -> Tensor:
    """0.5 ||z - sg(z - g)||^2 / B, whose gradient wrt z is exactly g / B (B = images)."""
    grad = torch.nan_to_num(grad.to(latents.dtype))
    target = (latents - grad).detach()
    return 0.5 * (latents - target).pow(2).sum() / latents.shape[0]
