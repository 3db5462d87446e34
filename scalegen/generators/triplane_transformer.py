"""Triplane-Transformer (ScaleDreamer, after OpenLRM): learned triplane tokens refined by a
transformer that reads the prompt's per-token text embeddings, then upsampled to three planes.

    X^0 = E                                           learned tokens [3 * h * h, D], shared by prompts
    X  <- X + CrossAttn(LN(X), T_b)                   T_b: prompt b's token embeddings [L, D_text]
    X  <- X + SelfAttn(LN(X))
    X  <- X + MLP_GELU(LN(X))                         x num_layers (pre-LN blocks)
    P_b = ConvTranspose2x2(LN(X)) per plane           [3, C, 2h, 2h]
The planes are sampled EG3D-style (xy, xz, zy; features concatenated) and decoded by shared MLPs
(``fields.py``). The architecture has no noise input: ``z`` is ignored.
"""
from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from scalegen.generators.fields import FeatureField, decoder, unit_rms
from scalegen.generators.base import Generator
from scalegen.text.base import TextCond

PRESETS = {
    "paper": dict(width=768, layers=12, heads=16, low_res=32, plane_channels=32, mlp_hidden=64),
    "small": dict(width=128, layers=2, heads=4, low_res=8, plane_channels=16, mlp_hidden=32),
}


class Attention(nn.Module):
    """Multi-head attention with bias-free q/k/v and a biased output projection (diffusers'
    ``Attention(bias=False)`` layout). ``mask`` [B, L_kv] (True = attend) hides padding tokens."""

    def __init__(self, dim: int, kv_dim: int, heads: int):
        super().__init__()
        self.heads = heads
        self.to_q = nn.Linear(dim, dim, bias=False)
        self.to_k = nn.Linear(kv_dim, dim, bias=False)
        self.to_v = nn.Linear(kv_dim, dim, bias=False)
        self.to_out = nn.Linear(dim, dim)

    def forward(self, x: Tensor, kv: Tensor, mask: Tensor | None = None) -> Tensor:
        b, n, d = x.shape
        split = lambda t: t.view(b, t.shape[1], self.heads, -1).transpose(1, 2)  # noqa: E731
        q, k, v = split(self.to_q(x)), split(self.to_k(kv)), split(self.to_v(kv))
        attn_mask = None if mask is None else mask[:, None, None, :]
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask)
        return self.to_out(out.transpose(1, 2).reshape(b, n, d))


class Block(nn.Module):
    """Pre-LN block: cross-attention to the text tokens, self-attention, GELU MLP."""

    def __init__(self, dim: int, text_dim: int, heads: int, mlp_ratio: float = 4.0, eps: float = 1e-6):
        super().__init__()
        self.norm1, self.cross_attn = nn.LayerNorm(dim, eps=eps), Attention(dim, text_dim, heads)
        self.norm2, self.self_attn = nn.LayerNorm(dim, eps=eps), Attention(dim, dim, heads)
        self.norm3 = nn.LayerNorm(dim, eps=eps)
        hidden = int(dim * mlp_ratio)
        self.mlp = nn.Sequential(nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, dim))

    def forward(self, x: Tensor, text: Tensor, mask: Tensor) -> Tensor:
        x = x + self.cross_attn(self.norm1(x), text, mask)
        h = self.norm2(x)
        x = x + self.self_attn(h, h)
        return x + self.mlp(self.norm3(x))


class TriplaneTransformer(Generator):
    """Generator interface: ``forward(cond, z=None) -> FeatureField`` (z is ignored).

    ``text_norm`` scales each text token to unit second moment before the cross-attention reads it.
    ``feature_init_scale`` scales the deconv's initial weights: the planes, and so (1-homogeneous
    decoders) the residual added to the start sphere, shrink by that factor."""

    def __init__(self, text_dim: int, preset: str = "paper", bound: float = 0.75, sdf_radius: float = 0.5,
                 checkpointing: bool = False, bf16: bool = False, feature_init_scale: float = 1.0,
                 text_norm: bool = False):
        super().__init__()
        p = PRESETS[preset]
        d, self.low_res, self.plane_channels = p["width"], p["low_res"], p["plane_channels"]
        self.tokens = nn.Parameter(torch.randn(1, 3 * self.low_res**2, d) / d**0.5)
        self.layers = nn.ModuleList([Block(d, text_dim, p["heads"]) for _ in range(p["layers"])])
        self.norm = nn.LayerNorm(d, eps=1e-6)
        self.deconv = nn.ConvTranspose2d(d, self.plane_channels, kernel_size=2, stride=2, bias=False)
        with torch.no_grad():
            self.deconv.weight.mul_(feature_init_scale)
        self.sdf_mlp = decoder(3 * self.plane_channels, p["mlp_hidden"], 1, 2)
        self.rgb_mlp = decoder(3 * self.plane_channels, p["mlp_hidden"], 3, 2)
        self.bound, self.sdf_radius, self.checkpointing, self.bf16 = bound, sdf_radius, checkpointing, bf16
        self.text_norm = text_norm

    def planes(self, cond: TextCond) -> Tensor:
        """Per-prompt planes [B, 3, C, 2h, 2h] (xy, xz, zy)."""
        text = cond.tokens.float()
        if self.text_norm:
            text = unit_rms(text)
        mask = cond.mask.bool()
        mask = mask | ~mask.any(1, keepdim=True)  # a prompt without a marked token attends to all
        b, h = text.shape[0], self.low_res
        # bf16 here, or whatever the trainer's autocast says (never switching an outer autocast off)
        with torch.autocast(text.device.type, dtype=torch.bfloat16) if self.bf16 else contextlib.nullcontext():
            x = self.tokens.expand(b, -1, -1)
            for layer in self.layers:
                if self.checkpointing and torch.is_grad_enabled():
                    x = checkpoint(layer, x, text, mask, use_reentrant=False)
                else:
                    x = layer(x, text, mask)
            x = self.norm(x)
            x = x.view(b * 3, h, h, -1).permute(0, 3, 1, 2)  # plane-major per prompt: [B*3, D, h, h]
            x = self.deconv(x)
        return x.float().view(b, 3, self.plane_channels, 2 * h, 2 * h)

    def forward(self, cond: TextCond, z: Tensor | None = None) -> FeatureField:
        return FeatureField(self.planes(cond), "triplane", self.sdf_mlp, self.rgb_mlp, self.bound, self.sdf_radius)

    def param_groups(self) -> dict[str, list[nn.Parameter]]:
        """Named parameter groups for per-module learning rates (``optim.group_lr``)."""
        return {"transformer": [self.tokens, *self.layers.parameters(), *self.norm.parameters()],
                "planes": list(self.deconv.parameters()),
                "decoder": [*self.sdf_mlp.parameters(), *self.rgb_mlp.parameters()]}
