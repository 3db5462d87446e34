"""Multi-resolution hash grid encoding (Instant-NGP) in pure PyTorch.

Level l has resolution ``N_l = floor(N_min * b^l)`` with ``b = exp((ln N_max - ln N_min)/(L-1))``.
A level whose ``(N_l + 1)^3`` vertices fit the table is indexed densely (one entry per vertex,
exact at grid vertices); finer levels hash vertex ``(x, y, z)`` to
``(x*1 ^ y*2654435761 ^ z*805459861) mod T``. Features are trilinearly interpolated from the 8
corners and concatenated over levels: ``[N, L*F]``.

Speed on CPU: the corner indices are built per axis and combined (8 cheap int32 ops on [N, L]
tensors instead of materialising [N, L, 8, 3]); a custom autograd function walks the points in
cache-sized chunks, gathers with ``index_select`` and scatters gradients with ``index_add_``
(much faster than advanced indexing), keeping each chunk's corner rows for the backward pass only
when the pass will be differentiated.
"""
from __future__ import annotations

import math

import torch
from torch import Tensor, nn

_PRIMES = (1, 2654435761 - 2**32, 805459861)  # iNGP's primes as wrapped int32
NO_GRAD_KEPT = 2  # no-grad encodings a grid keeps for reuse (an evaluation's proposal and fine passes)


class _HashEncode(torch.autograd.Function):
    """Trilinear hash-grid features, computed over cache-sized chunks of points.

    With ``keep`` (a pass that will be differentiated: grad mode on and a trainable table) each chunk's
    corner rows and weights are kept for the backward pass (96 bytes per point and level; rebuilding
    them instead cost a third of the backward); without it (no-grad passes) nothing is kept. The
    table's gradient is scattered with ``index_add_`` on a complex view of F = 2 features (one element
    per row: the same sums in the same order, faster than rows of two floats)."""

    @staticmethod
    def forward(ctx, table: Tensor, x: Tensor, grid: "HashGrid", chunk: int, keep: bool) -> Tensor:
        out = table.new_empty(x.shape[0], grid.n_levels, table.shape[1])
        kept = []
        for s in range(0, x.shape[0], chunk):
            idx, w = grid.corner_indices(x[s:s + chunk])
            acc = None
            for c in range(8):
                v = table.index_select(0, idx[c].reshape(-1)).view(*idx.shape[1:], -1).mul_(w[c].unsqueeze(-1))
                acc = v if acc is None else acc.add_(v)
            out[s:s + chunk] = acc
            if keep:
                kept.append((idx.reshape(-1).long(), w))  # int32 index_add_ is much slower
        ctx.kept, ctx.n, ctx.chunk, ctx.shape = kept, x.shape[0], chunk, table.shape
        return out

    @staticmethod
    def backward(ctx, grad_out: Tensor):
        f = ctx.shape[1]
        as_complex = f == 2 and grad_out.dtype in (torch.float32, torch.float64)
        if as_complex:
            grad_table = torch.zeros(ctx.shape[0], dtype=torch.complex64 if grad_out.dtype == torch.float32
                                     else torch.complex128)
        else:
            grad_table = grad_out.new_zeros(ctx.shape)
        for (rows, w), s in zip(ctx.kept, range(0, ctx.n, ctx.chunk)):
            g = grad_out[s:s + ctx.chunk]
            contrib = (g.unsqueeze(0) * w.unsqueeze(-1)).reshape(-1, f)
            grad_table.index_add_(0, rows, torch.view_as_complex(contrib) if as_complex else contrib)
        if as_complex:
            grad_table = torch.view_as_real(grad_table)
        return grad_table, None, None, None, None


class HashGrid(nn.Module):
    def __init__(self, n_levels: int = 16, n_features: int = 2, log2_size: int = 19,
                 base_resolution: int = 16, max_resolution: int = 4096, init_scale: float = 1e-4):
        super().__init__()
        self.n_levels, self.n_features = n_levels, n_features
        self.table_size = 2**log2_size
        b = math.exp((math.log(max_resolution) - math.log(base_resolution)) / max(n_levels - 1, 1))
        res = [int(math.floor(base_resolution * b**level)) for level in range(n_levels)]
        dense = [(r + 1) ** 3 <= self.table_size for r in res]
        # Dense levels use exactly (r+1)^3 rows; hashed levels use T rows.
        sizes = [(r + 1) ** 3 if d else self.table_size for r, d in zip(res, dense)]
        offsets = [0]
        for s in sizes:
            offsets.append(offsets[-1] + s)
        # int32 keys: hashing wraps like iNGP's uint32 arithmetic and the table offsets fit easily.
        assert offsets[-1] < 2**31, "hash grid too large for int32 indices"
        self.register_buffer("resolution", torch.tensor(res, dtype=torch.int32), persistent=False)
        self.register_buffer("dense", torch.tensor(dense), persistent=False)
        self.register_buffer("level_offset", torch.tensor(offsets[:-1], dtype=torch.int32), persistent=False)
        self.hash_mask = self.table_size - 1
        assert all(dense[:sum(dense)]), "dense levels are the coarsest (resolutions grow with the level)"
        self.n_dense = sum(dense)
        self.table = nn.Parameter(torch.empty(offsets[-1], n_features).uniform_(-init_scale, init_scale))
        self._kept: list[tuple[Tensor, Tensor, Tensor]] = []  # (table, points, features) of no-grad passes

    @property
    def out_dim(self) -> int:
        return self.n_levels * self.n_features

    def corner_indices(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """Table rows and trilinear weights of the 8 corners of ``x`` [N, 3] in [0, 1]: [8, N, L].

        Levels are sorted by resolution, so the dense ones are a prefix: each part computes only its
        own keys (no ``where`` over both). Corner c = (i, j, k) reuses the (i, j) partial sums and
        products of the x and y axes; weights keep the product order ``(w_x w_y) w_z``."""
        res = self.resolution
        pos = x.unsqueeze(1) * res.view(1, -1, 1).to(x.dtype)  # [N, L, 3]
        p0 = pos.floor()
        frac = pos - p0
        p0 = p0.int()
        nd = self.n_dense
        wx, wy, wz = ((1.0 - frac[..., d], frac[..., d]) for d in range(3))
        wxy = [wx[i] * wy[j] for i in (0, 1) for j in (0, 1)]
        idx = p0.new_empty(8, *p0.shape[:2])
        w = frac.new_empty(8, *frac.shape[:2])
        for c in range(8):
            torch.mul(wxy[c >> 1], wz[c & 1], out=w[c])
        if nd > 0:  # dense levels: key = x (r+1)^2 + y (r+1) + z, already < (r+1)^3
            lo = p0[:, :nd]
            r1 = res[:nd] + 1
            kx = lo[..., 0] * (r1 * r1) + self.level_offset[:nd]
            ky = lo[..., 1] * r1
            kz = lo[..., 2]
            kx = (kx, kx + r1 * r1)
            ky = (ky, ky + r1)
            kxy = [kx[i] + ky[j] for i in (0, 1) for j in (0, 1)]
            for c in range(8):
                torch.add(kxy[c >> 1], kz + (c & 1), out=idx[c, :, :nd])
        if nd < self.n_levels:  # hashed levels: (x*1 ^ y*p2 ^ z*p3) mod T
            hi = p0[:, nd:]
            hx = [hi[..., 0] + i for i in (0, 1)]  # the first prime is 1
            hy = [(hi[..., 1] + j) * _PRIMES[1] for j in (0, 1)]
            hz = [(hi[..., 2] + k) * _PRIMES[2] for k in (0, 1)]
            hxy = [hx[i] ^ hy[j] for i in (0, 1) for j in (0, 1)]
            off = self.level_offset[nd:]
            for c in range(8):
                torch.add((hxy[c >> 1] ^ hz[c & 1]).bitwise_and_(self.hash_mask), off, out=idx[c, :, nd:])
        return idx, w

    def forward(self, x: Tensor) -> Tensor:
        """Encode points ``x`` [N, 3] in [0, 1]^3 (clamped) -> features [N, L*F].

        Without grad, the last two encodings are kept (``NO_GRAD_KEPT``) and returned again for the
        same points and an unchanged table: an evaluation renders every batch of prompts with the
        same proposal samples, whose features need computing once."""
        x = x.detach().clamp(0.0, 1.0).to(self.table.dtype)
        if not torch.is_grad_enabled():
            return self._encode_no_grad(x)
        keep = self.table.requires_grad
        out = _HashEncode.apply(self.table, x, self, 32768, keep)
        return out.reshape(x.shape[0], self.out_dim)

    def _encode_no_grad(self, x: Tensor) -> Tensor:
        """Kept features for the same points and the same table (compared exactly: an update that
        bypasses the version counter, such as a write through ``.data``, still counts), else computed."""
        table = self.table.detach()
        for i, (tab, pts, feat) in enumerate(self._kept):
            if pts.shape == x.shape and torch.equal(pts, x) and tab.shape == table.shape and torch.equal(tab, table):
                self._kept.append(self._kept.pop(i))
                return feat
        feat = _HashEncode.apply(table, x, self, 32768, False).reshape(x.shape[0], self.out_dim)
        self._kept.append((table.clone(), x, feat))
        del self._kept[:-NO_GRAD_KEPT]
        return feat


class TCNNHashGrid(nn.Module):
    """Optional tiny-cuda-nn backend (CUDA only). Same interface as ``HashGrid``.

    Untested on our CPU-only CI; selected with ``generator.backend=tcnn``.
    """

    def __init__(self, n_levels: int, n_features: int, log2_size: int, base_resolution: int,
                 max_resolution: int, init_scale: float = 1e-4):
        super().__init__()
        import tinycudann as tcnn  # noqa: PLC0415 - optional dependency

        b = math.exp((math.log(max_resolution) - math.log(base_resolution)) / max(n_levels - 1, 1))
        self.encoding = tcnn.Encoding(3, {
            "otype": "HashGrid", "n_levels": n_levels, "n_features_per_level": n_features,
            "log2_hashmap_size": log2_size, "base_resolution": base_resolution, "per_level_scale": b,
        })
        self.n_levels, self.n_features = n_levels, n_features

    @property
    def out_dim(self) -> int:
        return self.n_levels * self.n_features

    def forward(self, x: Tensor) -> Tensor:
        return self.encoding(x.clamp(0.0, 1.0)).float()
