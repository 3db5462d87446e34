"""3DConv-Net (ScaleDreamer): a StyleGAN2-style 3D convolutional generator of a voxel feature grid.

Mapping (per prompt b, text condition c_b = pooled text embedding, noise z_b in R^{z_dim}):
    h = FC_2(FC_1(z_b / rms(z_b)))                         two leaky-ReLU layers of width w_dim
    w_b = FC_embed([h, c_b])                               one style vector, shared by every layer
Synthesis from a learned 4^3 constant up to ``resolution``^3, per block at resolution r:
    x = lrelu(up(modconv3(x, A(w))) + noise + bias)        3x3x3, weight demodulated per prompt
    x = x + B_r  (learned constant bias volume, r <= bias_resolution)
    x = lrelu(modconv3(x, A(w)) + noise + bias)
    img = up(img) + modconv1(x, A(w))                      "to-RGB" skip into the C-channel grid
The grid is sampled trilinearly over the scene box and decoded by shared MLPs (``fields.py``).

Modulated convolution is computed as conv(x * s_b, W) * d_b with
d_{b,o} = 1 / sqrt(sum_{i,k} (W_{o,i,k} s_{b,i})^2) (StyleGAN2's non-fused form): identical to
per-prompt weights, but one ordinary batched convolution, and no prompt can see another's style.
"""
from __future__ import annotations

import contextlib
import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from scalegen.generators.fields import FeatureField, decoder, unit_rms
from scalegen.generators.base import Generator
from scalegen.text.base import TextCond

# Presets: (z_dim, w_dim, mapping layers, resolution, grid channels, channels per resolution with
# the multiplier applied to r >= 32 as in the reference, bias_resolution, decoder hidden width).
PRESETS = {
    "paper": dict(z_dim=64, w_dim=256, mapping_layers=2, resolution=128, grid_channels=32,
                  channels={4: 512, 8: 512, 16: 512, 32: 256, 64: 128, 128: 64}, bias_resolution=64,
                  mlp_hidden=64),
    "small": dict(z_dim=16, w_dim=64, mapping_layers=2, resolution=32, grid_channels=16,
                  channels={4: 64, 8: 64, 16: 32, 32: 16}, bias_resolution=32, mlp_hidden=32),
}


def _lrelu(x: Tensor) -> Tensor:
    """Leaky ReLU (0.2) with StyleGAN's gain sqrt(2), clamped to +-256 as the reference does."""
    return (F.leaky_relu(x, 0.2) * math.sqrt(2.0)).clamp(-256.0, 256.0)


class EqualLinear(nn.Module):
    """Linear layer with equalised learning rate: W ~ N(0, 1), scaled by 1/sqrt(fan_in) at run time."""

    def __init__(self, d_in: int, d_out: int, bias_init: float = 0.0, activation: bool = False):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(d_out, d_in))
        self.bias = nn.Parameter(torch.full((d_out,), float(bias_init)))
        self.gain, self.activation = 1.0 / math.sqrt(d_in), activation

    def forward(self, x: Tensor) -> Tensor:
        x = F.linear(x, self.weight * self.gain, self.bias)
        return _lrelu(x) if self.activation else x


class ModulatedConv3d(nn.Module):
    """Style-modulated 3D convolution with per-prompt demodulation (see the module docstring),
    optional trilinear x2 upsampling after the convolution, per-voxel noise and bias."""

    def __init__(self, c_in: int, c_out: int, w_dim: int, kernel: int = 3, demodulate: bool = True,
                 upsample: bool = False, noise: bool = True):
        super().__init__()
        self.affine = EqualLinear(w_dim, c_in, bias_init=1.0)
        self.weight = nn.Parameter(torch.randn(c_out, c_in, kernel, kernel, kernel))
        self.bias = nn.Parameter(torch.zeros(c_out))
        self.noise_strength = nn.Parameter(torch.zeros(1)) if noise else None
        self.demodulate, self.upsample, self.kernel = demodulate, upsample, kernel
        # to-RGB (no demodulation) scales styles by 1/sqrt(fan_in) instead.
        self.style_gain = 1.0 if demodulate else 1.0 / math.sqrt(c_in * kernel**3)

    def forward(self, x: Tensor, w: Tensor, noise: bool) -> Tensor:
        s = self.affine(w) * self.style_gain  # [B, I]
        weight = self.weight.to(x.dtype)
        y = F.conv3d(x * s.to(x.dtype)[:, :, None, None, None], weight, padding=self.kernel // 2)
        if self.demodulate:  # d[b, o] = rsqrt(sum_i s[b, i]^2 sum_k W[o, i, k]^2)
            d = (s.square() @ self.weight.square().sum((2, 3, 4)).t() + 1e-8).rsqrt()
            y = y * d.to(y.dtype)[:, :, None, None, None]
        if self.upsample:
            y = F.interpolate(y, scale_factor=2, mode="trilinear", align_corners=True)
        if self.noise_strength is not None and noise:
            y = y + torch.randn_like(y[:, :1]) * self.noise_strength.to(y.dtype)
        y = y + self.bias.to(y.dtype)[None, :, None, None, None]
        return _lrelu(y) if self.demodulate else y


class SynthesisBlock(nn.Module):
    """One resolution step r/2 -> r (or the 4^3 prologue when ``c_in`` is None)."""

    def __init__(self, c_in: int | None, c_out: int, res: int, w_dim: int, grid_channels: int, const_bias: bool):
        super().__init__()
        self.conv0 = None if c_in is None else ModulatedConv3d(c_in, c_out, w_dim, upsample=True)
        self.const_bias = nn.Parameter(torch.randn(c_out, res, res, res) / math.sqrt(c_out)) if const_bias else None
        self.conv1 = ModulatedConv3d(c_out, c_out, w_dim)
        self.to_grid = ModulatedConv3d(c_out, grid_channels, w_dim, kernel=1, demodulate=False, noise=False)

    def forward(self, x: Tensor, img: Tensor | None, w: Tensor, noise: bool) -> tuple[Tensor, Tensor]:
        if self.conv0 is not None:
            x = self.conv0(x, w, noise)
        if self.const_bias is not None:
            x = x + self.const_bias.to(x.dtype)
        x = self.conv1(x, w, noise)
        y = self.to_grid(x, w, noise)
        if img is not None:
            y = y + F.interpolate(img, scale_factor=2, mode="trilinear", align_corners=True)
        return x, y


class Conv3DNet(Generator):
    """Generator interface: ``forward(cond, z=None) -> FeatureField``.

    ``z`` [B, z_dim]: drawn from N(0, I) per prompt in training and zero in eval mode when not
    given (the reference samples it per prompt). Synthesis noise is random in training, off in eval.
    ``sample_noise=False`` makes training deterministic as evaluation is (z = 0, no synthesis noise).
    ``text_norm`` scales the pooled text embedding to unit second moment, as z is, before the two meet.
    ``feature_init_scale`` scales the to-grid weights at init: the grid, and so (1-homogeneous decoders)
    the residual added to the start sphere, shrink by that factor while every layer still gets gradients.
    """

    def __init__(self, text_dim: int, preset: str = "paper", channel_multiplier: int = 1, z_dim: int = 0,
                 bound: float = 0.75, sdf_radius: float = 0.5, checkpointing: bool = False, bf16: bool = False,
                 sample_noise: bool = True, feature_init_scale: float = 1.0, text_norm: bool = False):
        super().__init__()
        p = dict(PRESETS[preset])
        self.z_dim = z_dim or p["z_dim"]
        w_dim, res, gc = p["w_dim"], p["resolution"], p["grid_channels"]
        ch = {r: c * (channel_multiplier if r >= 32 else 1) for r, c in p["channels"].items()}
        dims = [self.z_dim] + [w_dim] * p["mapping_layers"]
        self.mapping = nn.ModuleList([EqualLinear(a, b, activation=True) for a, b in zip(dims[:-1], dims[1:])])
        self.embed = EqualLinear(w_dim + text_dim, w_dim)
        self.const = nn.Parameter(torch.randn(ch[4], 4, 4, 4))
        blocks = [SynthesisBlock(None, ch[4], 4, w_dim, gc, const_bias=False)]
        r = 8
        while r <= res:
            blocks.append(SynthesisBlock(ch[r // 2], ch[r], r, w_dim, gc, const_bias=r <= p["bias_resolution"]))
            r *= 2
        self.blocks = nn.ModuleList(blocks)
        with torch.no_grad():
            for block in self.blocks:
                block.to_grid.weight.mul_(feature_init_scale)
        self.sdf_mlp = decoder(gc, p["mlp_hidden"], 1, 1)
        self.rgb_mlp = decoder(gc, p["mlp_hidden"], 3, 1)
        self.bound, self.sdf_radius, self.checkpointing, self.bf16 = bound, sdf_radius, checkpointing, bf16
        self.sample_noise, self.text_norm = sample_noise, text_norm

    def style(self, cond: TextCond, z: Tensor | None) -> Tensor:
        """w [B, w_dim] from the noise and the pooled text embedding."""
        c = cond.pooled.float()
        if self.text_norm:
            c = unit_rms(c)
        if z is None:
            draw = self.training and self.sample_noise
            z = torch.randn(c.shape[0], self.z_dim, device=c.device) if draw else c.new_zeros(c.shape[0], self.z_dim)
        h = unit_rms(z)
        for layer in self.mapping:
            h = layer(h)
        return self.embed(torch.cat([h, c], 1))

    def grid(self, cond: TextCond, z: Tensor | None = None) -> Tensor:
        """The per-prompt feature grid [B, C, R, R, R] (z indexes D, y H, x W)."""
        w = self.style(cond, z)
        noise = self.training and self.sample_noise
        dev = w.device.type
        # bf16 here, or whatever the trainer's autocast says (never switching an outer autocast off)
        with torch.autocast(dev, dtype=torch.bfloat16) if self.bf16 else contextlib.nullcontext():
            x, img = self.const.unsqueeze(0).expand(w.shape[0], -1, -1, -1, -1), None
            for block in self.blocks:
                if self.checkpointing and torch.is_grad_enabled():
                    x, img = checkpoint(block, x, img, w, noise, use_reentrant=False)
                else:
                    x, img = block(x, img, w, noise)
        return img.float()

    def forward(self, cond: TextCond, z: Tensor | None = None) -> FeatureField:
        return FeatureField(self.grid(cond, z), "voxel", self.sdf_mlp, self.rgb_mlp, self.bound, self.sdf_radius)

    def noise_dim(self) -> int:
        return self.z_dim

    def param_groups(self) -> dict[str, list[nn.Parameter]]:
        """Named parameter groups for per-module learning rates (``optim.group_lr``)."""
        return {"mapping": [*self.mapping.parameters(), *self.embed.parameters()],
                "synthesis": [self.const, *self.blocks.parameters()],
                "decoder": [*self.sdf_mlp.parameters(), *self.rgb_mlp.parameters()]}
