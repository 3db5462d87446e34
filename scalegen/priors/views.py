"""View buckets and Perp-Neg weights: pure functions of the camera angles, shared by every prior
that conditions on the view through its prompt (Stable Diffusion's view-dependent prompts, the
view-agnostic oracle conditioned on the view bucket).

Buckets are threestudio's: front if ``|azimuth| < front``, back if ``|azimuth| > 180 - back``,
overhead if ``elevation > overhead``, else side (azimuth 0 is +x, counter-clockwise from above).
"""
from __future__ import annotations

import torch
from torch import Tensor

from scalegen.text.base import VIEWS

FRONT, SIDE, BACK, OVERHEAD = (VIEWS.index(v) for v in ("front", "side", "back", "overhead"))
# Perp-Neg weighting functions a * exp(-b r) + c (threestudio's defaults; f_fs(1) = f_sf(1) = 0).
PERP_NEG_F = {"fs": (4.0, 0.5, -2.426), "sf": (4.0, 0.5, -2.426), "sb": (1.0, 0.5, -0.606), "fsb": (1.0, 0.5, 0.967)}


def shift_azimuth(azimuth: Tensor) -> Tensor:
    """Degrees to [-180, 180)."""
    return (azimuth + 180.0) % 360.0 - 180.0


def view_index(azimuth: Tensor, elevation: Tensor, front: float = 30.0, back: float = 30.0,
               overhead: float = 60.0) -> Tensor:
    """Index into ``VIEWS`` per camera (threestudio's rule; later rules win: side < front < back < overhead)."""
    az = shift_azimuth(azimuth.float())
    idx = torch.full(az.shape, SIDE, dtype=torch.long, device=az.device)
    idx[(az > -front) & (az < front)] = FRONT
    idx[(az > 180.0 - back) | (az < -180.0 + back)] = BACK
    idx[elevation.float() > overhead] = OVERHEAD
    return idx


def exp_decay(abc, r: Tensor) -> Tensor:
    a, b, c = abc
    return a * torch.exp(-b * r) + c


def perp_neg_plan(azimuth: Tensor, elevation: Tensor, overhead: float = 60.0, scale: float = 1.0,
                  f: dict | None = None) -> tuple[Tensor, Tensor, Tensor]:
    """Per camera: ``mix`` [N, 4] weights of the positive embedding over ``VIEWS``, ``neg_views``
    [N, 2] indices into ``VIEWS`` and ``neg_w`` [N, 2] = -scale * f(r) (0 for overhead views)."""
    f = {**PERP_NEG_F, **(f or {})}
    az = shift_azimuth(azimuth.float()).abs()
    n = az.shape[0]
    mix = torch.zeros(n, len(VIEWS))
    neg_views = torch.zeros(n, 2, dtype=torch.long)
    neg_w = torch.zeros(n, 2)
    fs = az < 90.0
    r = torch.where(fs, 1.0 - az / 90.0, 2.0 - az / 90.0)
    # front-side: r = 1 is fully front, 0 fully side; side-back: r = 1 is fully side, 0 fully back.
    mix[:, FRONT] = torch.where(fs, r, 0.0)
    mix[:, SIDE] = torch.where(fs, 1.0 - r, r)
    mix[:, BACK] = torch.where(fs, 0.0, 1.0 - r)
    neg_views[:, 0] = torch.where(fs, FRONT, SIDE)
    neg_views[:, 1] = torch.where(fs, SIDE, FRONT)
    neg_w[:, 0] = torch.where(fs, exp_decay(f["fs"], r), exp_decay(f["sb"], r))
    neg_w[:, 1] = torch.where(fs, exp_decay(f["sf"], 1.0 - r), exp_decay(f["fsb"], r))
    top = elevation.float() > overhead
    mix[top] = 0.0
    mix[top, OVERHEAD] = 1.0
    neg_w[top] = 0.0
    return mix, neg_views, -scale * neg_w


def perpendicular(x: Tensor, y: Tensor) -> Tensor:
    """Component of ``x`` perpendicular to ``y``, per image: x - (<x,y> / max(<y,y>, 1e-6)) y."""
    dims = tuple(range(1, x.dim()))
    coef = (x * y).sum(dims, keepdim=True) / (y * y).sum(dims, keepdim=True).clamp(min=1e-6)
    return x - coef * y
