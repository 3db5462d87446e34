"""The frozen-prior interface and the DDPM noise schedule shared by every prior.

A ``Prior`` exposes:
  ``alphas_cumprod`` [T]                      the noise schedule (x_t = a_t z + s_t eps)
  ``encode(rgb [N,3,H,W] in [0,1]) -> z``     into the space the prior denoises (with grad)
  ``text_embeddings(prompts) -> text``        per-row conditions, concatenable with torch.cat
  ``uncond_like(text) -> text``               the unconditional rows matching ``text``
  ``predict_eps(x_t, t, text, cameras) -> eps``  for a whole stacked batch of branches at once
Distillers stack every branch of a step (cond/uncond, t/t+dt, ...) into ONE ``predict_eps`` call.
A prior may add branches of its own inside that call: Stable Diffusion with Perp-Neg returns, for a
conditional row whose unconditional partner (same prompt, t and x_t) is in the same call, a corrected
``eps_c'`` such that ``eps_u + s (eps_c' - eps_u)`` is its guided prediction (stable_diffusion.py).
"""
from __future__ import annotations

import torch
from torch import Tensor

T = 1000


def ddpm_alphas_cumprod(beta_start: float = 0.00085, beta_end: float = 0.012, n: int = T) -> Tensor:
    """Stable Diffusion 2.1's DDPM schedule: ``scaled_linear`` betas, alphabar_t = prod (1 - beta)."""
    betas = torch.linspace(beta_start**0.5, beta_end**0.5, n, dtype=torch.float64) ** 2
    return torch.cumprod(1.0 - betas, 0).float()


class Prior:
    """Base class documenting the interface; priors override every method."""

    alphas_cumprod: Tensor
    latent_channels: int

    def encode(self, rgb: Tensor) -> Tensor:  # pragma: no cover - interface
        raise NotImplementedError

    def decode(self, latents: Tensor) -> Tensor:  # pragma: no cover - interface
        raise NotImplementedError

    def text_embeddings(self, prompts: list[str]) -> Tensor:  # pragma: no cover - interface
        raise NotImplementedError

    def uncond_like(self, text: Tensor) -> Tensor:  # pragma: no cover - interface
        raise NotImplementedError

    def predict_eps(self, x_t: Tensor, t: Tensor, text: Tensor, cameras) -> Tensor:  # pragma: no cover
        raise NotImplementedError

    def add_noise(self, z: Tensor, eps: Tensor, t: Tensor) -> Tensor:
        """x_t = a_t z + s_t eps with a_t = sqrt(alphabar_t), s_t = sqrt(1 - alphabar_t)."""
        ab = self.alphas_cumprod.to(z.device)[t].view(-1, *[1] * (z.dim() - 1))
        return ab.sqrt() * z + (1 - ab).sqrt() * eps
