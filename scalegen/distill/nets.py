"""The small trainable networks stateful distillers own.

* ``ResConvNet``: a residual conv net ``x -> x + f(x, t, camera, pooled)`` whose last conv is zero,
  so it is the identity at initialisation. VDM's degradation ``M_psi`` (on latents, or on the
  oracle's image space), and the correction ``Delta_phi`` of VSD's variational denoiser in the
  oracle world (see ``ResidualEps``).
* ``ResidualEps``: VSD's variational eps model when the prior has no UNet to copy (the oracle):
  ``eps_phi(x_t, t, c) = sg(eps_prior_c(x_t, t)) + Delta_phi(x_t, t, c)`` with ``Delta_phi``
  zero at init, so, exactly like a LoRA copy, it starts as the prior and learns only a correction.
* ``LoRAUNet``: VSD's LoRA on a Stable Diffusion prior's own UNet (peft adapters switched on only
  for phi's calls), with ProlificDreamer's camera embedding (last layer zero, so phi starts as the
  frozen UNet).
"""
from __future__ import annotations

import math
from contextlib import contextmanager

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from scalegen.data.cameras import Cameras
from scalegen.priors.base import T, DenoiserNet


def timestep_features(t: Tensor, dim: int = 32) -> Tensor:
    """Sinusoidal features of integer timesteps [N] -> [N, dim]."""
    half = dim // 2
    freqs = torch.exp(-math.log(10000.0) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    ang = t.float()[:, None] * freqs[None]
    return torch.cat([ang.sin(), ang.cos()], 1)


def camera_vector(cameras: Cameras, n: int) -> Tensor:
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


class VariationalEps(nn.Module):
    """VSD's eps_phi(x_t, t, y, c): what it needs from the prior's call and what it trains.

    ``needs_prior_eps``: the distiller stacks the rows' conditional prior eps at (x_t', t') into its
    one prior call and passes it as ``base_eps``. ``trainable()`` names the tensors phi owns (saved
    in checkpoints as ``distiller.<name>``; for a LoRA, the adapters, never the frozen UNet)."""

    needs_prior_eps: bool = False

    def forward(self, x_t: Tensor, t: Tensor, camera: Tensor, text: Tensor, pooled: Tensor | None = None,
                base_eps: Tensor | None = None) -> Tensor:
        raise NotImplementedError

    def trainable(self) -> dict[str, nn.Parameter]:
        return dict(self.named_parameters())


class ResidualEps(VariationalEps):
    """eps_phi(x_t, t, c) = sg(eps_prior_c(x_t, t)) + Delta_phi(x_t, t, c) (oracle-world VSD)."""

    needs_prior_eps = True

    def __init__(self, channels: int, width: int = 32, blocks: int = 2, cond_dim: int = 0):
        super().__init__()
        self.delta = ResConvNet(channels, width, blocks, cond_dim)

    def forward(self, x_t: Tensor, t: Tensor, camera: Tensor, text: Tensor, pooled: Tensor | None = None,
                base_eps: Tensor | None = None) -> Tensor:
        return base_eps.detach() + self.delta.residual(x_t, t, camera, pooled)


LORA_ADAPTER = "vsd_phi"


class LoRAUNet(VariationalEps):
    """VSD's eps_phi on a Stable Diffusion prior: LoRA adapters (peft, adapter ``vsd_phi``) injected
    into the prior's OWN frozen UNet, plus ProlificDreamer's camera embedding (c2w [16] -> time-
    embedding width, added to the timestep embedding through diffusers' ``class_embedding`` slot;
    last layer zero, so phi starts as the frozen UNet). The adapters are switched on only inside
    this module's forward (``_adapters_on``), so every call the prior makes sees the frozen UNet:
    no second copy of the UNet (3.4 GB at SD size in fp32). Conditioned on the view-independent
    prompt, as threestudio's ProlificDreamer."""

    def __init__(self, net: DenoiserNet, rank: int = 4, alpha: float | None = None):
        super().__init__()
        from peft import LoraConfig  # noqa: PLC0415 - needs the [sd] extra

        self.net = [net]  # a list: the UNet is the prior's, not a submodule of ours
        unet = net.unet
        unet.add_adapter(LoraConfig(r=rank, lora_alpha=alpha or rank, init_lora_weights=True,
                                    target_modules=["to_q", "to_k", "to_v", "to_out.0"]), adapter_name=LORA_ADAPTER)
        self.lora = {n.replace(".", "__"): p for n, p in unet.named_parameters() if f".{LORA_ADAPTER}." in n}
        for p in self.lora.values():  # adapters train in fp32 even on an fp16 UNet
            p.data = p.data.float()
        unet.disable_adapters()
        temb = unet.time_embedding.linear_2.out_features
        self.cam = nn.Sequential(nn.Linear(16, temb), nn.SiLU(), nn.Linear(temb, temb)).to(net.device)
        nn.init.zeros_(self.cam[2].weight)
        nn.init.zeros_(self.cam[2].bias)

    def trainable(self) -> dict[str, nn.Parameter]:
        return {**{f"lora.{n}": p for n, p in self.lora.items()},
                **{f"cam.{n}": p for n, p in self.cam.named_parameters()}}

    @contextmanager
    def _adapters_on(self):
        unet = self.net[0].unet
        unet.enable_adapters()
        unet.class_embedding = self.cam  # diffusers adds class_embedding(class_labels) to the time embedding
        try:
            yield unet
        finally:
            unet.class_embedding = None
            unet.disable_adapters()

    def forward(self, x_t: Tensor, t: Tensor, camera: Tensor, text: Tensor, pooled: Tensor | None = None,
                base_eps: Tensor | None = None) -> Tensor:
        net = self.net[0]
        dev = net.device
        x = x_t.to(dev)
        dtype = next(net.unet.parameters()).dtype
        with self._adapters_on() as unet:
            out = unet(x.to(dtype), t.to(dev), encoder_hidden_states=net.embed(text).to(dtype),
                       class_labels=camera.to(dev).float()).sample.float()
        return net.to_eps(out, x.float(), t.to(dev)).to(x_t.device)


def diffusion_timesteps(n: int, group: int = 1) -> Tensor:
    """t' ~ U{0, ..., T-1} for the variational model's own diffusion loss (threestudio's VSD); with
    ``group > 1`` consecutive groups of that size (an object's views, MVDream) share one t'."""
    return torch.randint(0, T, (-(-n // group),)).repeat_interleave(group)[:n]
