"""Hyper-iNGP (ScaleDreamer): a hash grid shared by all prompts, plus a hypernetwork that turns
each prompt's pooled text embedding into the weights of that prompt's small field MLPs.

    h      = SiLU(LayerNorm(W_a c))                     c: pooled text embedding [B, D]
    theta  = W_b h + b_b                                 all MLP weights of the prompt, flattened
    sdf(x) = relu(e(x) W1_sdf) W2_sdf + (|x| - r)        bias-free MLP (L*F -> H -> 1), sphere bias
    rgb(x) = sigmoid(relu(e(x) W1_rgb) W2_rgb)           bias-free MLP (L*F -> H -> 3)

``e(x)`` is the shared hash-grid encoding. A prompt's field depends only on its own row of ``c``
(no batch mixing; tested), so batches of any size are exact.
"""
from __future__ import annotations

import torch
from torch import Tensor, nn

from scalegen.errors import ConfigError
from scalegen.generators.base import Generator
from scalegen.generators.hash_grid import HashGrid, TCNNHashGrid
from scalegen.render.base import Field
from scalegen.text.base import TextCond


class _SharedPointsMLP(torch.autograd.Function):
    """All prompts' bias-free MLPs at shared points: out[b] = relu(feat W1_b) W2_b.

    The [N, B*H] hidden layer is the largest tensor of a training step and makes plain autograd
    memory-bound on CPU. This function walks the points in cache-sized chunks, keeps no hidden
    activations, and recomputes them chunk by chunk in the backward pass.
    """

    @staticmethod
    def forward(ctx, feat: Tensor, w1: Tensor, w2: Tensor, chunk: int) -> Tensor:
        b, f, h = w1.shape
        o = w2.shape[-1]
        w1_all = w1.permute(1, 0, 2).reshape(f, b * h)  # [F, B*H]
        w2_all = torch.block_diag(*w2.unbind(0))  # [B*H, B*O]
        out = feat.new_empty(feat.shape[0], b * o)
        for s in range(0, feat.shape[0], chunk):
            torch.mm((feat[s:s + chunk] @ w1_all).relu_(), w2_all, out=out[s:s + chunk])
        ctx.save_for_backward(feat, w1_all, w2_all)
        ctx.chunk, ctx.dims = chunk, (b, f, h, o)
        return out.view(-1, b, o).transpose(0, 1)

    @staticmethod
    def backward(ctx, grad: Tensor):
        feat, w1_all, w2_all = ctx.saved_tensors
        b, f, h, o = ctx.dims
        grad = grad.transpose(0, 1).reshape(-1, b * o)
        g_w1, g_w2 = torch.zeros_like(w1_all), torch.zeros_like(w2_all)
        g_feat = torch.empty_like(feat)
        for s in range(0, feat.shape[0], ctx.chunk):
            fc, gc = feat[s:s + ctx.chunk], grad[s:s + ctx.chunk]
            hid = (fc @ w1_all).relu_()  # recomputed, in place: hid > 0 exactly where the pre-activation is
            g_w2.addmm_(hid.t(), gc)
            g_hid = torch.ops.aten.threshold_backward(gc @ w2_all.t(), hid, 0)  # relu's own backward, one pass
            g_w1.addmm_(fc.t(), g_hid)
            torch.mm(g_hid, w1_all.t(), out=g_feat[s:s + ctx.chunk])
        g_w1 = g_w1.view(f, b, h).permute(1, 0, 2)
        g_w2 = torch.stack([g_w2[i * h:(i + 1) * h, i * o:(i + 1) * o] for i in range(b)])
        return g_feat, g_w1, g_w2, None


class HyperINGPField(Field):
    """The fields of B prompts. Points are ``[P, N, 3]`` with P == B or P == 1 (shared points:
    the grid encoding is computed once and all B prompts' MLPs run as two dense matmuls,
    ``[N, F] @ [F, B*H]`` then a block-diagonal ``[B*H, B*O]``, which is far faster on CPU than
    batched per-prompt products)."""

    def __init__(self, grid: nn.Module, weights: dict[str, Tensor], bound: float, sdf_radius: float):
        self.grid, self.w, self.bound, self.sdf_radius = grid, weights, bound, sdf_radius
        self.n_prompts = weights["sdf1"].shape[0]

    def select(self, prompts: list[int]) -> "HyperINGPField":
        """The fields of a subset of the prompts (the same weights, no copy of the grid)."""
        return HyperINGPField(self.grid, {k: w[prompts] for k, w in self.w.items()}, self.bound, self.sdf_radius)

    def _encode(self, points: Tensor) -> Tensor:
        p, n, _ = points.shape
        unit = (points.reshape(-1, 3) / self.bound + 1.0) * 0.5
        return self.grid(unit).view(p, n, -1)

    def _mlp(self, feat: Tensor, w1: Tensor, w2: Tensor) -> Tensor:
        """relu(feat W1_b) W2_b for every prompt b -> [B, N, O]."""
        b = w1.shape[0]
        if feat.shape[0] == 1 and b > 1:
            # The fused kernel writes into preallocated fp32 buffers: it runs outside autocast, in fp32.
            with torch.autocast(feat.device.type, enabled=False):
                return _SharedPointsMLP.apply(feat[0].float(), w1.float(), w2.float(), 2048)
        return torch.bmm(torch.relu(torch.bmm(feat.expand(b, -1, -1), w1)), w2)

    def _sdf_from(self, feat: Tensor, points: Tensor) -> Tensor:
        sdf = self._mlp(feat, self.w["sdf1"], self.w["sdf2"]).squeeze(-1)  # [B, N]
        return sdf + (points.norm(dim=-1) - self.sdf_radius)

    def sdf(self, points: Tensor) -> Tensor:
        """Signed distance [B, N] at ``points`` [P, N, 3]."""
        return self._sdf_from(self._encode(points), points)

    def query(self, points: Tensor) -> tuple[Tensor, Tensor]:
        """``sdf`` [B, N] and ``rgb`` [B, N, 3] in [0, 1] at ``points`` [P, N, 3]."""
        feat = self._encode(points)
        sdf = self._sdf_from(feat, points)
        rgb = torch.sigmoid(self._mlp(feat, self.w["rgb1"], self.w["rgb2"]))
        return sdf, rgb


class HyperINGP(Generator):
    def __init__(self, text_dim: int, bound: float = 0.75, hash_levels: int = 16, hash_features: int = 2,
                 hash_log2_size: int = 19, hash_base_resolution: int = 16, hash_max_resolution: int = 4096,
                 mlp_hidden: int = 64, hyper_hidden: int = 64, hyper_out_gain: float = 1.0,
                 sdf_radius: float = 0.5, backend: str = "torch"):
        super().__init__()
        grid_args = (hash_levels, hash_features, hash_log2_size, hash_base_resolution, hash_max_resolution)
        if backend == "tcnn":
            try:
                self.grid = TCNNHashGrid(*grid_args)
            except ImportError:
                raise ConfigError("generator.backend=tcnn needs tiny-cuda-nn (CUDA only); install it or use "
                                  "generator.backend=torch") from None
        else:
            self.grid = HashGrid(*grid_args)
        self.bound, self.sdf_radius = bound, sdf_radius
        d_in, hid = self.grid.out_dim, mlp_hidden
        self.shapes = {"sdf1": (d_in, hid), "sdf2": (hid, 1), "rgb1": (d_in, hid), "rgb2": (hid, 3)}
        n_out = sum(a * b for a, b in self.shapes.values())
        first = nn.Linear(text_dim, hyper_hidden, bias=False)
        last = nn.Linear(hyper_hidden, n_out)
        nn.init.xavier_normal_(first.weight)
        nn.init.xavier_normal_(last.weight, gain=hyper_out_gain)
        nn.init.zeros_(last.bias)
        self.hypernet = nn.Sequential(first, nn.LayerNorm(hyper_hidden), nn.SiLU(), last)

    def forward(self, cond: TextCond, z: Tensor | None = None) -> HyperINGPField:
        """One field per prompt; Hyper-iNGP has no noise input, ``z`` is ignored."""
        theta = self.hypernet(cond.pooled.float())
        weights, start = {}, 0
        for name, (a, b) in self.shapes.items():
            weights[name] = theta[:, start:start + a * b].reshape(-1, a, b)
            start += a * b
        return HyperINGPField(self.grid, weights, self.bound, self.sdf_radius)

    def param_groups(self) -> dict[str, list[nn.Parameter]]:
        """Named parameter groups for per-module learning rates."""
        return {"grid": list(self.grid.parameters()), "hypernet": list(self.hypernet.parameters())}
