"""The frozen-prior interface and the DDPM noise schedule shared by every prior.

A ``Prior`` is a frozen 2D diffusion model seen through two attributes and four required methods:

  ``alphas_cumprod`` [T], ``latent_channels``    the noise schedule (x_t = a_t z + s_t eps), what ``encode`` gives
  ``encode(rgb [N,3,H,W] in [0,1]) -> z``        into the space the prior denoises (with grad)
  ``decode(z) -> rgb``                           back, for pictures
  ``text_embeddings(prompts) -> text``           per-row condition handles, concatenable with torch.cat
  ``predict_eps(x_t, t, text, cameras, guidance) -> eps``   for a whole stacked batch of branches at once

Distillers stack every branch of a step (cond/uncond, t/t+dt, ...) into ONE ``predict_eps`` call and
say what each row is with a ``Guidance``: which rows are unconditional (the prior's negative prompt)
and which (conditional, unconditional) row pairs they will combine with classifier-free guidance.
Nothing is inferred from the data: a prior with Perp-Neg adds its negative branches for the declared
pairs only, and returns for each paired conditional row a corrected ``eps_c'`` such that
``eps_u + s (eps_c' - eps_u)`` is its guided prediction (stable_diffusion.py).

Optional capabilities are methods with defaults here, never probed with ``hasattr``:

  ``stored_tokens(info)``   which precomputed text embeddings from shards it takes (default: none)
  ``denoiser_net()``        its noise-prediction network for trainable adapters (VSD's LoRA; default: none)
  ``ground_truth()``        the world it knows exactly and the renderer that draws it (the oracle; default: none)
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Literal, Optional, Sequence

import torch
from torch import Tensor, nn

from scalegen.data.cameras import Cameras
from scalegen.priors.world import GroundTruth

T = 1000


def ddpm_alphas_cumprod(beta_start: float = 0.00085, beta_end: float = 0.012, n: int = T) -> Tensor:
    """Stable Diffusion 2.1's DDPM schedule: ``scaled_linear`` betas, alphabar_t = prod (1 - beta)."""
    betas = torch.linspace(beta_start**0.5, beta_end**0.5, n, dtype=torch.float64) ** 2
    return torch.cumprod(1.0 - betas, 0).float()


@dataclass(frozen=True)
class Guidance:
    """What the N rows of one ``predict_eps`` call are, declared by the caller.

    ``uncond`` [N] bool: True for an unconditional row (the prior's negative prompt). Its ``text``
    entry still names the row's own prompt: the oracle's unconditional mixture always includes it.
    ``pairs`` [P, 2] long: (conditional row, unconditional row) at the same x_t and t that the
    caller combines with classifier-free guidance. Perp-Neg applies to these conditional rows only.
    """

    uncond: Tensor
    pairs: Tensor

    @staticmethod
    def all_conditional(n: int) -> "Guidance":
        return Guidance(torch.zeros(n, dtype=torch.bool), torch.zeros(0, 2, dtype=torch.long))

    @staticmethod
    def branches(n: int, unconditional: Sequence[bool], cfg_pairs: Sequence[tuple[int, int]] = ()) -> "Guidance":
        """Rows stacked as ``len(unconditional)`` branches of ``n`` rows each; ``cfg_pairs`` are
        (conditional branch, unconditional branch) indices whose rows pair up one to one."""
        uncond = torch.tensor(list(unconditional), dtype=torch.bool).repeat_interleave(n)
        rows = torch.arange(n)
        pairs = [torch.stack([c * n + rows, u * n + rows], 1) for c, u in cfg_pairs]
        for c, u in cfg_pairs:
            if unconditional[c] or not unconditional[u]:
                raise ValueError(f"guidance pair ({c}, {u}) must join a conditional and an unconditional branch")
        return Guidance(uncond, torch.cat(pairs) if pairs else torch.zeros(0, 2, dtype=torch.long))


@dataclass
class DenoiserNet:
    """A prior's frozen noise-prediction network, for distillers that train adapters on it (VSD's
    LoRA). ``embed(text)`` gives the view-independent prompt embeddings [N, L, D] of ``text`` rows
    (what ProlificDreamer's LoRA is conditioned on); ``to_eps(out, x_t, t)`` turns the network's
    output into eps (identity for epsilon prediction, a_t v + s_t x_t for v-prediction)."""

    unet: nn.Module
    embed: Callable[[Tensor], Tensor]
    to_eps: Callable[[Tensor, Tensor, Tensor], Tensor]
    device: torch.device


class Prior:
    """Base class of the frozen priors. Subclasses set ``alphas_cumprod`` and ``latent_channels`` and
    implement the four required methods; the optional capabilities below have working defaults."""

    alphas_cumprod: Tensor
    latent_channels: int
    device: torch.device = torch.device("cpu")

    # --- required ---------------------------------------------------------------------------------
    def encode(self, rgb: Tensor) -> Tensor:
        raise NotImplementedError

    def decode(self, latents: Tensor) -> Tensor:
        raise NotImplementedError

    def text_embeddings(self, prompts: list[str], tokens: Optional[Tensor] = None) -> Tensor:
        """Condition handles of ``prompts``, one row each. ``tokens``: precomputed embeddings in the
        layout ``stored_tokens`` named (only passed when it named one)."""
        raise NotImplementedError

    def predict_eps(self, x_t: Tensor, t: Tensor, text: Tensor, cameras: Cameras,
                    guidance: Optional[Guidance] = None) -> Tensor:
        """eps for every row; ``guidance`` None means every row is conditional and unpaired."""
        raise NotImplementedError

    # --- optional capabilities --------------------------------------------------------------------
    def stored_tokens(self, info: dict) -> Optional[Literal["views", "plain"]]:
        """Which token embeddings stored in shards built with encoder ``info`` (a manifest's
        ``encoder`` entry) this prior takes through ``text_embeddings(prompts, tokens=...)``:
        ``"views"`` (the 4 view-dependent variants), ``"plain"`` (the prompt itself) or None
        (it computes its own conditions; the default)."""
        return None

    def denoiser_net(self) -> Optional[DenoiserNet]:
        """The network a trainable adapter can be attached to (VSD's LoRA), or None (the default:
        a prior without one, such as the oracle, gets VSD's residual correction instead)."""
        return None

    def ground_truth(self) -> Optional[GroundTruth]:
        """The world this prior knows exactly and the renderer that draws it (the oracle), which
        validation grids, oracle metrics and refinement scores compare against; None (the default)
        for a learned prior, which has no ground truth."""
        return None

    # --- shared -----------------------------------------------------------------------------------
    def add_noise(self, z: Tensor, eps: Tensor, t: Tensor) -> Tensor:
        """x_t = a_t z + s_t eps with a_t = sqrt(alphabar_t), s_t = sqrt(1 - alphabar_t)."""
        ab = self.alphas_cumprod.to(z.device)[t.to(z.device)].view(-1, *[1] * (z.dim() - 1))
        return ab.sqrt() * z + (1 - ab).sqrt() * eps
