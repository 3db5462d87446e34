"""The small trainable networks stateful distillers own.

* ``ResConvNet``: a residual conv net ``x -> x + f(x, t, camera, pooled)`` whose last conv is zero,
  so it is the identity at initialisation. VDM's degradation ``M_psi`` (on latents, or on the
  oracle's image space), and the correction ``Delta_phi`` of VSD's variational denoiser in the
  oracle world (see ``ResidualEps``).
* ``ResidualEps``: VSD's variational eps model when the prior has no UNet to copy (the oracle):
  ``eps_phi(x_t, t, c) = sg(eps_prior_c(x_t, t)) + Delta_phi(x_t, t, c)`` with ``Delta_phi``
  zero at init, so, exactly like a LoRA copy, it starts as the prior and learns only a correction.
* ``LoRAUNet``: VSD's LoRA copy of a Stable Diffusion UNet (peft), with ProlificDreamer's camera
  embedding (c2w [16] -> time-embedding width, added to the timestep embedding through diffusers'
  ``class_embedding`` slot; last layer zero, so the copy starts as the frozen UNet).
"""
from __future__ import annotations

import copy
import math

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from scalegen.priors.base import T


def timestep_features(t: Tensor, dim: int = 32) -> Tensor:
    """Sinusoidal features of integer timesteps [N] -> [N, dim]."""
    half = dim // 2
    freqs = torch.exp(-math.log(10000.0) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    ang = t.float()[:, None] * freqs[None]
    return torch.cat([ang.sin(), ang.cos()], 1)


def camera_vector(cameras, n: int) -> Tensor:
    """The flattened camera-to-world matrix of each of ``n`` rows, [n, 16]."""
    return cameras.rows().c2w[0].reshape(n, 16).float()


class CondEmbedding(nn.Module):
    """e = MLP(sin(t)) + Linear(camera c2w) + Linear(pooled prompt embedding)."""

    def __init__(self, dim: int, cond_dim: int = 0):
        super().__init__()
        self.t_mlp = nn.Sequential(nn.Linear(32, dim), nn.SiLU(), nn.Linear(dim, dim))
        self.cam = nn.Linear(16, dim)
        self.pooled = nn.Linear(cond_dim, dim) if cond_dim > 0 else None

    def forward(self, t: Tensor, camera: Tensor, pooled: Tensor | None = None) -> Tensor:
        e = self.t_mlp(timestep_features(t).to(camera)) + self.cam(camera)
        if self.pooled is not None and pooled is not None:
            e = e + self.pooled(pooled.to(camera))
        return e


class _ResBlock(nn.Module):
    def __init__(self, ch: int, emb: int):
        super().__init__()
        self.n1, self.c1 = nn.GroupNorm(8, ch), nn.Conv2d(ch, ch, 3, padding=1)
        self.film = nn.Linear(emb, 2 * ch)
        self.n2, self.c2 = nn.GroupNorm(8, ch), nn.Conv2d(ch, ch, 3, padding=1)

    def forward(self, h: Tensor, e: Tensor) -> Tensor:
        y = self.c1(F.silu(self.n1(h)))
        scale, shift = self.film(F.silu(e))[:, :, None, None].chunk(2, 1)
        y = self.n2(y) * (1 + scale) + shift
        return h + self.c2(F.silu(y))


class ResConvNet(nn.Module):
    """x + f(x, t, camera, pooled); ``f``'s last conv is zero-initialised (identity at init)."""

    def __init__(self, channels: int, width: int = 32, blocks: int = 2, cond_dim: int = 0):
        super().__init__()
        self.emb = CondEmbedding(width, cond_dim)
        self.conv_in = nn.Conv2d(channels, width, 3, padding=1)
        self.blocks = nn.ModuleList(_ResBlock(width, width) for _ in range(blocks))
        self.norm_out = nn.GroupNorm(8, width)
        self.conv_out = nn.Conv2d(width, channels, 3, padding=1)
        nn.init.zeros_(self.conv_out.weight)
        nn.init.zeros_(self.conv_out.bias)

    def residual(self, x: Tensor, t: Tensor, camera: Tensor, pooled: Tensor | None = None) -> Tensor:
        e = self.emb(t, camera, pooled)
        h = self.conv_in(x)
        for b in self.blocks:
            h = b(h, e)
        return self.conv_out(F.silu(self.norm_out(h)))

    def forward(self, x: Tensor, t: Tensor, camera: Tensor, pooled: Tensor | None = None) -> Tensor:
        return x + self.residual(x, t, camera, pooled)


class ResidualEps(nn.Module):
    """eps_phi(x_t, t, c) = sg(eps_prior_c(x_t, t)) + Delta_phi(x_t, t, c) (oracle-world VSD)."""

    needs_base = True  # the distiller stacks the rows' conditional prior eps into its one prior call

    def __init__(self, channels: int, width: int = 32, blocks: int = 2, cond_dim: int = 0):
        super().__init__()
        self.delta = ResConvNet(channels, width, blocks, cond_dim)

    def forward(self, x_t: Tensor, t: Tensor, camera: Tensor, base_eps: Tensor, text=None,
                pooled: Tensor | None = None, cameras=None) -> Tensor:
        return base_eps.detach() + self.delta.residual(x_t, t, camera, pooled)


class LoRAUNet(nn.Module):
    """A LoRA copy of ``prior.unet`` with a camera embedding (VSD on Stable Diffusion)."""

    needs_base = False

    def __init__(self, prior, rank: int = 4, alpha: float | None = None):
        super().__init__()
        from peft import LoraConfig, inject_adapter_in_model  # noqa: PLC0415 - needs the [sd] extra

        self.prior = [prior]  # not a submodule: its weights are not ours
        unet = copy.deepcopy(prior.unet).float().requires_grad_(False)
        cfg = LoraConfig(r=rank, lora_alpha=alpha or rank, init_lora_weights=True,
                         target_modules=["to_q", "to_k", "to_v", "to_out.0"])
        unet = inject_adapter_in_model(cfg, unet)
        temb = unet.time_embedding.linear_2.out_features
        cam = nn.Sequential(nn.Linear(16, temb), nn.SiLU(), nn.Linear(temb, temb))
        nn.init.zeros_(cam[2].weight)
        nn.init.zeros_(cam[2].bias)
        unet.class_embedding = cam  # diffusers adds class_embedding(class_labels) to the time embedding
        for name, p in unet.named_parameters():
            p.requires_grad_("lora_" in name or name.startswith("class_embedding"))
        self.unet = unet.to(prior.device)

    def forward(self, x_t: Tensor, t: Tensor, camera: Tensor, base_eps=None, text=None, pooled=None,
                cameras=None) -> Tensor:
        p = self.prior[0]
        emb = p.row_embeddings(text, cameras).float()
        dev = p.device
        out = self.unet(x_t.to(dev).float(), t.to(dev), encoder_hidden_states=emb,
                        class_labels=camera.to(dev).float()).sample
        if p.prediction_type == "v_prediction":
            ab = p.alphas_cumprod.to(dev)[t.to(dev)].view(-1, 1, 1, 1)
            out = ab.sqrt() * out + (1 - ab).sqrt() * x_t.to(dev).float()
        return out.to(x_t.device)


def diffusion_timesteps(n: int, lo: float = 0.02, hi: float = 0.98) -> Tensor:
    """t ~ U[lo T, hi T] for the variational model's own diffusion loss."""
    return torch.randint(max(int(lo * T), 1), int(hi * T) + 1, (n,))
