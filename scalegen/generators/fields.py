"""Feature-volume fields shared by the 3DConv-Net and the Triplane-Transformer: per-prompt feature
grids sampled at points, decoded by MLPs shared by all prompts.

    e_b(x)   = trilinear(V_b, x)                          voxel grid V_b [C, R, R, R]
             | [bilinear(P_b^xy, (x, y)), bilinear(P_b^xz, (x, z)), bilinear(P_b^zy, (z, y))]
    sdf_b(x) = MLP_sdf(e_b(x)) + (|x| - r)                sphere bias: every prompt starts as a ball
    rgb_b(x) = sigmoid(MLP_rgb(e_b(x)))

Sampling keeps the batch axis first from grid to features: prompt b's features are read only from
V_b / P_b. (The reference flattens ``[B, C, N]`` as ``[C, B*N]`` and so mixes prompts at B > 1.)
"""
from __future__ import annotations

import warnings

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from scalegen.render.base import Field


def unit_rms(x: Tensor, dim: int = -1) -> Tensor:
    """``x / sqrt(mean(x^2))`` along ``dim`` (StyleGAN's normalize_2nd_moment); zero stays zero."""
    return x * (x.square().mean(dim, keepdim=True) + 1e-8).rsqrt()


def sample_voxels(grid: Tensor, unit: Tensor) -> Tensor:
    """Trilinear features ``[B, N, C]`` of ``grid`` [B, C, D, H, W] at ``unit`` [B, N, 3] in
    [-1, 1]^3 (x indexes W, y indexes H, z indexes D; cell-centred, zero outside)."""
    b, c = grid.shape[:2]
    out = F.grid_sample(grid, unit.view(b, 1, 1, -1, 3).to(grid.dtype), mode="bilinear",
                        padding_mode="zeros", align_corners=False)  # [B, C, 1, 1, N]
    return out.view(b, c, -1).transpose(1, 2)


# EG3D plane axes (with the fix of NVlabs/eg3d#67): each plane reads two coordinates (u -> W, v -> H).
PLANE_AXES = ((0, 1), (0, 2), (2, 1))  # xy, xz, zy


def sample_planes(planes: Tensor, unit: Tensor) -> Tensor:
    """Bilinear features of three planes ``[B, 3, C, H, W]`` at ``unit`` [B, N, 3] in [-1, 1]^3,
    concatenated per point -> ``[B, N, 3C]`` (plane order xy, xz, zy)."""
    b, n_planes, c, h, w = planes.shape
    uv = torch.stack([unit[..., list(ax)] for ax in PLANE_AXES], 1)  # [B, 3, N, 2]
    out = F.grid_sample(planes.reshape(b * n_planes, c, h, w), uv.reshape(b * n_planes, 1, -1, 2).to(planes.dtype),
                        mode="bilinear", padding_mode="zeros", align_corners=False)  # [B*3, C, 1, N]
    return out.view(b, n_planes, c, -1).permute(0, 3, 1, 2).reshape(b, -1, n_planes * c)


def _corner_weights(unit: Tensor, sizes: tuple[int, ...]) -> tuple[Tensor, Tensor]:
    """Linear-interpolation corners of points ``unit`` [N, K] in [-1, 1]^K on a cell-centred grid of
    ``sizes`` (axis k of the point indexes the k-th size, last size varies fastest in memory order
    reversed: index = sum_k i_k * stride_k with stride of axis 0 = 1). Returns flat indices and
    weights [N, 2^K]; corners outside the grid get weight 0 (zero padding, as grid_sample)."""
    n, k = unit.shape
    idx = unit.new_zeros(n, 1, dtype=torch.long)
    wts = unit.new_ones(n, 1)
    stride = 1
    for a in range(k):
        r = sizes[a]
        pos = ((unit[:, a] + 1.0) * r - 1.0) * 0.5  # align_corners=False
        i0 = pos.floor()
        f = pos - i0
        i0 = i0.long()
        cand_i = torch.stack([i0, i0 + 1], 1)  # [N, 2]
        cand_w = torch.stack([1.0 - f, f], 1)
        valid = (cand_i >= 0) & (cand_i < r)
        cand_w = cand_w * valid
        cand_i = cand_i.clamp(0, r - 1) * stride
        idx = (idx[:, :, None] + cand_i[:, None, :]).reshape(n, -1)
        wts = (wts[:, :, None] * cand_w[:, None, :]).reshape(n, -1)
        stride *= r
    return idx, wts


def _csr(crow: Tensor, col: Tensor, val: Tensor, shape: tuple[int, int]) -> Tensor:
    with warnings.catch_warnings():  # "CSR support is in beta"
        warnings.simplefilter("ignore")
        return torch.sparse_csr_tensor(crow, col, val, shape, check_invariants=False)


class _SparseInterp(torch.autograd.Function):
    """out = S G for the interpolation matrix S [N, M] (row n: the 2^K corner weights of point n)
    and grid values G [M, F] (rows = cells, columns = prompts x channels); G.grad = S^T grad.
    For shared points this replaces ``grid_sample`` over a B-times-expanded point set (and its
    slow scalar backward) by two sparse-dense products, which is faster on CPU."""

    @staticmethod
    def forward(ctx, g: Tensor, idx: Tensor, wts: Tensor) -> Tensor:
        n, k = idx.shape
        ctx.save_for_backward(idx, wts)
        ctx.m = g.shape[0]
        s = _csr(torch.arange(0, n * k + 1, k, device=g.device), idx.reshape(-1), wts.reshape(-1), (n, ctx.m))
        return torch.sparse.mm(s, g)

    @staticmethod
    def backward(ctx, grad: Tensor):
        idx, wts = ctx.saved_tensors
        n, k = idx.shape
        cols = idx.reshape(-1)
        order = cols.argsort()
        crow = torch.zeros(ctx.m + 1, dtype=torch.long, device=idx.device)
        crow[1:] = torch.bincount(cols, minlength=ctx.m).cumsum(0)
        rows = torch.arange(n, device=idx.device).repeat_interleave(k)
        s_t = _csr(crow, rows[order], wts.reshape(-1)[order], (ctx.m, n))
        return torch.sparse.mm(s_t, grad.contiguous()), None, None


def shared_interp(grid: Tensor, unit: Tensor) -> Tensor:
    """Interpolate a batch of grids ``grid`` [B, C, *S] (S = (D, H, W) or (H, W)) at shared points
    ``unit`` [N, K] (K = len(S); coordinate k indexes the k-th axis from the end, like grid_sample)
    -> [N, B, C] (point-major, so the decoders run on it without a transpose). Equal to grid_sample
    with the points broadcast to every prompt."""
    b, c, *sizes = grid.shape
    idx, wts = _corner_weights(unit.float(), tuple(reversed(sizes)))
    values = grid.reshape(b * c, -1).t().contiguous()  # [M, B*C]
    out = _SparseInterp.apply(values, idx, wts.to(values.dtype))  # [N, B*C]
    return out.view(-1, b, c)


class _ChunkedMLP(torch.autograd.Function):
    """A bias-free ReLU MLP over many rows, walked in cache-sized chunks that keep no hidden
    activations (recomputed chunk by chunk in backward). At ~10^6 points x prompts per step the
    hidden layers are the largest tensors of a step and plain autograd is memory-bound on CPU."""

    @staticmethod
    def forward(ctx, x: Tensor, chunk: int, *ws: Tensor) -> Tensor:
        out = x.new_empty(x.shape[0], ws[-1].shape[0])
        for s in range(0, x.shape[0], chunk):
            h = x[s:s + chunk]
            for w in ws[:-1]:
                h = torch.relu(h @ w.t())
            torch.mm(h, ws[-1].t(), out=out[s:s + chunk])
        ctx.save_for_backward(x, *ws)
        ctx.chunk = chunk
        return out

    @staticmethod
    def backward(ctx, grad: Tensor):
        x, *ws = ctx.saved_tensors
        g_ws = [torch.zeros_like(w) for w in ws]
        g_x = torch.empty_like(x) if ctx.needs_input_grad[0] else None
        for s in range(0, x.shape[0], ctx.chunk):
            hs = [x[s:s + ctx.chunk]]
            for w in ws[:-1]:
                hs.append(torch.relu(hs[-1] @ w.t()))
            g = grad[s:s + ctx.chunk]
            for i in range(len(ws) - 1, -1, -1):
                g_ws[i].addmm_(g.t(), hs[i])
                if i > 0:
                    g = (g @ ws[i]).mul_(hs[i] > 0)
                elif g_x is not None:
                    torch.mm(g, ws[0], out=g_x[s:s + ctx.chunk])
        return (g_x, None, *g_ws)


def run_decoder(mlp: nn.Sequential, x: Tensor, chunk: int = 4096) -> Tensor:
    """``mlp(x)`` for a ``decoder`` MLP, through ``_ChunkedMLP`` when autograd or size calls for it."""
    shape = x.shape
    ws = [m.weight for m in mlp if isinstance(m, nn.Linear)]
    out = _ChunkedMLP.apply(x.reshape(-1, shape[-1]), chunk, *ws)
    return out.view(*shape[:-1], -1)


def decoder(d_in: int, hidden: int, d_out: int, n_hidden: int) -> nn.Sequential:
    """Bias-free ReLU MLP with ``n_hidden`` hidden layers of width ``hidden`` (threestudio's VanillaMLP)."""
    dims = [d_in] + [hidden] * n_hidden
    layers: list[nn.Module] = []
    for a, b in zip(dims[:-1], dims[1:]):
        layers += [nn.Linear(a, b, bias=False), nn.ReLU(inplace=True)]
    layers.append(nn.Linear(dims[-1], d_out, bias=False))
    return nn.Sequential(*layers)


class FeatureField(Field):
    """The fields of B prompts from per-prompt feature grids. Points are ``[P, N, 3]`` with P == B
    or P == 1 (shared points, broadcast to every prompt as a view)."""

    def __init__(self, features: Tensor, kind: str, sdf_mlp: nn.Module, rgb_mlp: nn.Module, bound: float,
                 sdf_radius: float):
        self.features, self.kind = features, kind  # "voxel": [B, C, R, R, R]; "triplane": [B, 3, C, H, W]
        self.sdf_mlp, self.rgb_mlp, self.bound, self.sdf_radius = sdf_mlp, rgb_mlp, bound, sdf_radius
        self.n_prompts = features.shape[0]

    def select(self, prompts: list[int]) -> "FeatureField":
        """The fields of a subset of the prompts (their feature grids, shared decoders)."""
        return FeatureField(self.features[prompts], self.kind, self.sdf_mlp, self.rgb_mlp, self.bound, self.sdf_radius)

    def encode(self, points: Tensor) -> tuple[Tensor, bool]:
        """Per-prompt features at ``points`` [P, N, 3]: ``[B, N, C]``, or ``[N, B, C]`` for shared
        points (the flag says which). Sampling and decoding run in fp32 outside any autocast: the
        sparse product and the chunked decoder write into fp32 buffers (and MKL has no bf16 CSR)."""
        with torch.autocast(points.device.type, enabled=False):
            return self._encode(points.float())

    def _encode(self, points: Tensor) -> tuple[Tensor, bool]:
        b = self.n_prompts
        features = self.features.float()
        assert points.shape[0] in (1, b), f"points for {points.shape[0]} prompts cannot query {b} fields"
        unit = points / self.bound
        if unit.shape[0] == 1 and b > 1 and not unit.requires_grad:  # shared points: sparse interpolation
            if self.kind == "voxel":
                return shared_interp(features, unit[0]), True
            return torch.cat([shared_interp(features[:, i], unit[0][:, list(ax)])
                              for i, ax in enumerate(PLANE_AXES)], -1), True
        unit = unit.expand(b, -1, -1)
        feat = sample_voxels(features, unit) if self.kind == "voxel" else sample_planes(features, unit)
        return feat, False

    def _decode(self, mlp: nn.Module, feat: Tensor, point_major: bool) -> Tensor:
        with torch.autocast(feat.device.type, enabled=False):
            out = run_decoder(mlp, feat.float())
        return out.transpose(0, 1) if point_major else out

    def _sdf_from(self, feat: Tensor, point_major: bool, points: Tensor) -> Tensor:
        sdf = self._decode(self.sdf_mlp, feat, point_major).squeeze(-1)
        return sdf + (points.norm(dim=-1) - self.sdf_radius)

    def sdf(self, points: Tensor) -> Tensor:
        """Signed distance [B, N] at ``points`` [P, N, 3]."""
        return self._sdf_from(*self.encode(points), points)

    def query(self, points: Tensor) -> tuple[Tensor, Tensor]:
        """``sdf`` [B, N] and ``rgb`` [B, N, 3] in [0, 1] at ``points`` [P, N, 3]."""
        feat, point_major = self.encode(points)
        rgb = torch.sigmoid(self._decode(self.rgb_mlp, feat, point_major))
        return self._sdf_from(feat, point_major, points), rgb
