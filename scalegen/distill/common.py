"""Pieces every distiller shares: the base class, the timestep schedule, w(t), CFG, the target-trick
loss, and the one stacked prior call per step."""
from __future__ import annotations

import math
from typing import Optional, Sequence

import torch
from torch import Tensor, nn

from scalegen.config import step_position
from scalegen.data.cameras import Cameras
from scalegen.errors import CheckpointError
from scalegen.priors.base import T, Guidance, Prior


class TimestepSchedule:
    """Timesteps t ~ U[t_min(step), t_max(step)] (integer DDPM indices). The range anneals linearly
    from ``start`` to ``end`` (fractions of T) over ``anneal_steps`` (a step position, config.py: below
    1.0 a fraction of ``max_steps``, else steps; None: the whole run), as ScaleDreamer anneals
    [0.50, 0.98] -> [0.02, 0.50] over its run."""

    def __init__(self, start: Sequence[float], end: Sequence[float], anneal_steps: Optional[float], max_steps: int):
        self.start, self.end = list(start), list(end)
        self.anneal = float(max_steps) if anneal_steps is None else step_position(anneal_steps, max_steps)

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


def predict_branches(prior: Prior, text: Tensor, cameras: Cameras, branches: Sequence[tuple[Tensor, Tensor, bool]],
                     cfg_pairs: Sequence[tuple[int, int]] = ()) -> list[Tensor]:
    """eps of every branch ``(x_t, t, unconditional)`` of the same N rows in ONE prior call.
    ``cfg_pairs``: (conditional branch, unconditional branch) that the caller combines with CFG
    (a prior's Perp-Neg applies to those conditional rows only)."""
    n = len(text)
    guidance = Guidance.branches(n, [u for _, _, u in branches], cfg_pairs)
    out = prior.predict_eps(torch.cat([x for x, _, _ in branches]), torch.cat([t for _, t, _ in branches]),
                            text.repeat(len(branches)), cameras.repeat_rows(len(branches)), guidance)
    return list(out.split(n))


def cond_uncond_eps(prior: Prior, z: Tensor, eps: Tensor, t: Tensor, text: Tensor, cameras: Cameras):
    """(x_t, eps_c, eps_u): noise ``z`` to t and run the CFG pair [cond @ t, uncond @ t] in one call."""
    x_t = prior.add_noise(z, eps, t)
    eps_c, eps_u = predict_branches(prior, text, cameras, [(x_t, t, False), (x_t, t, True)], cfg_pairs=[(0, 1)])
    return x_t, eps_c, eps_u


class Distiller:
    """Rendered latents + the frozen prior -> a loss whose gradient wrt the latents is g / B.

    ``__call__(latents [N, C, h, w], text [N] prior rows, cameras (rows in order), step, pooled [N, D])``
    returns ``(loss, logs)``; ``logs`` are 0-dim tensors, read by the trainer on logging steps only
    (no host sync per step). ``pooled`` is the generator's prompt embedding (conditions VDM's M_psi).

    Stateless distillers (SDS, CSD, ASD) keep the defaults below; stateful ones (VSD's eps_phi, VDM's
    M_psi) override ``param_groups`` (their own optimizer group and learning rate; trained by the
    same optimizer step as the generator, on a loss whose gradient reaches only them) and the state
    methods (saved in checkpoints as ``distiller.*``).
    """

    def __init__(self, prior: Prior, schedule: TimestepSchedule, weighting: str = "sds", t_group: int = 1):
        self.prior, self.schedule, self.weighting, self.t_group = prior, schedule, weighting, t_group

    def __call__(self, latents: Tensor, text: Tensor, cameras: Cameras, step: int,
                 pooled: Optional[Tensor] = None) -> tuple[Tensor, dict[str, Tensor]]:
        raise NotImplementedError

    def sample_t(self, n: int, step: int) -> Tensor:
        """One t per image, or per ``t_group`` consecutive images (a view group, MVDream)."""
        return self.schedule.sample(n, step, self.t_group)

    def w(self, t: Tensor, like: Tensor) -> Tensor:
        return weight(self.prior.alphas_cumprod, t, self.weighting).to(like)

    # --- the state a stateful distiller owns (defaults: none) ------------------------------------
    def param_groups(self) -> list[tuple[str, list[nn.Parameter], float]]:
        """(name, parameters, learning rate) of each trainable group this distiller owns."""
        return []

    def parameters(self) -> list[nn.Parameter]:
        return [p for _, ps, _ in self.param_groups() for p in ps]

    def state_dict(self) -> dict[str, Tensor]:
        return {}

    def load_state_dict(self, state: dict[str, Tensor]) -> None:
        if state:
            raise CheckpointError(f"the checkpoint holds distiller state ({sorted(state)[:3]}...) that "
                                  f"{type(self).__name__} does not have; resume with the distiller it was trained with")


def grad_logs(t: Tensor, g: Tensor, **more: Tensor) -> dict[str, Tensor]:
    """The logs every distiller returns (detached 0-dim tensors; no host sync)."""
    return {"t": t.float().mean(), "grad_norm": g.detach().norm(), **{k: v.detach() for k, v in more.items()}}
