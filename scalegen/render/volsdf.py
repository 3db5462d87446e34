"""VolSDF volume renderer, batched over B prompts x V views, in pure PyTorch.

Density from the signed distance d (Yariv et al. 2021):
    sigma(x) = (1/beta) * Psi_beta(-d(x)),  Psi_beta = CDF of a zero-mean Laplace of scale beta
Compositing over sorted samples t_i with segment lengths delta_i:
    alpha_i = 1 - exp(-sigma_i delta_i),  T_i = exp(-sum_{j<i} sigma_j delta_j),  w_i = T_i alpha_i
    rgb = sum_i w_i c_i + (1 - sum_i w_i) * background,  opacity = sum_i w_i

Near/far are each ray's intersections with the scene box [-bound, bound]^3 (never a fixed far
plane). Samples: ``samples`` stratified proposals, then ``importance_samples`` drawn from the
proposal weights (inverse CDF). When cameras are shared by all prompts (P == 1) the importance
pdf is the mean over prompts, so every prompt keeps the same points and the field can compute
shared features once.
"""
from __future__ import annotations

import torch
from einops import rearrange
from torch import Tensor

from scalegen.data.cameras import Cameras, camera_rays
from scalegen.render.base import BackgroundFn, Field, Renderer, RenderOutput

def laplace_density(sdf: Tensor, beta: float) -> Tensor:
    """sigma = (1/beta) Psi_beta(-sdf)."""
    s = -sdf
    psi = torch.where(s <= 0, 0.5 * torch.exp(s.clamp(max=0) / beta), 1.0 - 0.5 * torch.exp(-s.clamp(min=0) / beta))
    return psi / beta


def ray_box(origins: Tensor, dirs: Tensor, bound: float) -> tuple[Tensor, Tensor]:
    """Entry/exit distances of rays with the box [-bound, bound]^3 (exit <= entry: miss)."""
    inv = 1.0 / torch.where(dirs.abs() < 1e-9, torch.full_like(dirs, 1e-9), dirs)
    t0, t1 = (-bound - origins) * inv, (bound - origins) * inv
    t_near = torch.minimum(t0, t1).amax(-1)
    t_far = torch.maximum(t0, t1).amin(-1)
    return t_near, t_far


def sample_pdf(edges: Tensor, weights: Tensor, n: int, perturb: bool, span: bool = False) -> Tensor:
    """Draw ``n`` sorted distances per ray from the piecewise-constant pdf ``weights`` on bins
    ``edges`` [..., S+1] (inverse-CDF sampling, stratified when ``perturb``). With ``span`` the
    first and last draws are the ray's ends (the draws are interval edges covering the ray)."""
    pdf = weights + 1e-5 * weights.sum(-1, keepdim=True).clamp(min=1e-3)
    pdf = pdf / pdf.sum(-1, keepdim=True)
    cdf = torch.cat([torch.zeros_like(pdf[..., :1]), pdf.cumsum(-1)], -1).clamp(max=1.0)
    if span:
        u = torch.linspace(0.0, 1.0, n, device=edges.device, dtype=edges.dtype).expand(*pdf.shape[:-1], n)
        if perturb:
            jitter = (torch.rand_like(u) - 0.5) / max(n - 1, 1)
            jitter[..., 0] = 0.0
            jitter[..., -1] = 0.0
            u = u + jitter
    else:
        u = (torch.arange(n, device=edges.device, dtype=edges.dtype) + 0.5) / n
        u = u.expand(*pdf.shape[:-1], n)
        if perturb:
            u = u + (torch.rand_like(u) - 0.5) / n
    u = u.contiguous().clamp(0.0, 1.0 - 1e-6)
    i = torch.searchsorted(cdf, u, right=True).clamp(1, cdf.shape[-1] - 1)
    c0, c1 = cdf.gather(-1, i - 1), cdf.gather(-1, i)
    e0, e1 = edges.gather(-1, i - 1), edges.gather(-1, i)
    frac = ((u - c0) / (c1 - c0).clamp(min=1e-8)).clamp(0, 1)
    return e0 + frac * (e1 - e0)


class VolSDFRenderer(Renderer):
    """``composite="fine"`` (training default): the stratified proposal pass evaluates only the SDF,
    without autograd, to build the pdf; the differentiable pass evaluates the field only at the
    ``importance_samples`` drawn from that pdf (mixed with ``uniform_mix`` of a uniform pdf so no
    part of the ray is ever unsampled) and composites those alone, as Mip-NeRF 360 does with its
    proposal samples. ``composite="all"`` composites proposals and importance samples together
    (ground truth and evaluation, where accuracy matters more than speed)."""

    def __init__(self, bound: float = 0.75, samples: int = 32, importance_samples: int = 16,
                 beta: float = 1.0 / 30.0, near_min: float = 0.05, normal_eps: float = 0.01,
                 eikonal_points: int = 4096, composite: str = "fine", uniform_mix: float = 0.2):
        super().__init__()
        self.bound, self.samples, self.importance_samples = bound, samples, importance_samples
        self.beta, self.near_min, self.normal_eps = beta, near_min, normal_eps
        self.eikonal_points, self.composite, self.uniform_mix = eikonal_points, composite, uniform_mix

    def eval_options(self, samples: int | None = None, importance_samples: int | None = None) -> dict:
        """No jitter (midpoints), and the given sample counts (None: the renderer's own)."""
        return {"perturb": False, "samples": samples, "importance_samples": importance_samples}

    def forward(self, field: Field, cameras: Cameras, background: BackgroundFn | None = None, *,
                with_normals: bool = False, with_eikonal: bool = False, perturb: bool | None = None,
                samples: int | None = None, importance_samples: int | None = None,
                composite: str | None = None) -> RenderOutput:
        perturb = self.training if perturb is None else perturb
        n_s = self.samples if samples is None else samples
        n_i = self.importance_samples if importance_samples is None else importance_samples
        mode = self.composite if composite is None else composite
        b = field.n_prompts
        p, v = cameras.shape
        assert p in (1, b), f"cameras for {p} prompts cannot render {b} fields"
        h, w = cameras.height, cameras.width
        origins, dirs = camera_rays(cameras)  # [P, V, R, 3]
        r = h * w
        o, d = origins.reshape(p, v * r, 3), dirs.reshape(p, v * r, 3)
        t_near, t_far = ray_box(o, d, self.bound)
        t_near = t_near.clamp(min=self.near_min)
        hit = t_far > t_near  # [P, VR]
        t_far = torch.where(hit, t_far, t_near + 1e-3)

        def points(tt: Tensor) -> Tensor:
            return (o[..., None, :] + d[..., None, :] * tt[..., None]).reshape(p, -1, 3)

        # Stratified proposals in [near, far].
        u = torch.linspace(0.0, 1.0, n_s + 1, device=o.device, dtype=o.dtype)
        edges = t_near[..., None] + (t_far - t_near)[..., None] * u  # [P, VR, S+1]
        jitter = torch.rand_like(edges[..., :-1]) if perturb else torch.full_like(edges[..., :-1], 0.5)
        t = edges[..., :-1] + (edges[..., 1:] - edges[..., :-1]) * jitter
        fine_only = mode == "fine" and n_i > 0
        # A field of constant colour per prompt (ground truth) skips per-sample colours.
        flat = field.constant_rgb()
        if fine_only or flat is not None:
            with torch.no_grad():
                sdf = field.sdf(points(t)).view(b, v * r, n_s)
        else:
            sdf, rgb = field.query(points(t))
            sdf, rgb = sdf.view(b, v * r, n_s), rgb.view(b, v * r, n_s, 3)

        if n_i > 0:
            with torch.no_grad():
                delta = edges[..., 1:] - edges[..., :-1]
                pdf = self._weights(sdf.detach(), delta.expand(b, -1, -1), hit)
                if p == 1 and b > 1:
                    pdf = pdf.mean(0, keepdim=True)  # union pdf keeps points shared
                if fine_only:
                    pdf = pdf / pdf.sum(-1, keepdim=True).clamp(min=1e-8)
                    pdf = (1.0 - self.uniform_mix) * pdf + self.uniform_mix / n_s
                if fine_only:  # I+1 interval edges spanning the ray; samples at their midpoints
                    e_fine = sample_pdf(edges, pdf, n_i + 1, perturb, span=True)
                    e_fine[..., -1] = t_far
                    t_fine = 0.5 * (e_fine[..., 1:] + e_fine[..., :-1])  # [P, VR, I]
                else:
                    t_fine = sample_pdf(edges, pdf, n_i, perturb)
            if flat is not None:
                sdf_f = field.sdf(points(t_fine)).view(b, v * r, n_i)
            else:
                sdf_f, rgb_f = field.query(points(t_fine))
                sdf_f, rgb_f = sdf_f.view(b, v * r, n_i), rgb_f.view(b, v * r, n_i, 3)
            if fine_only:
                t, sdf = t_fine, sdf_f
                if flat is None:
                    rgb = rgb_f
            else:
                t = torch.cat([t, t_fine], -1)
                order = t.argsort(-1)
                t = t.gather(-1, order)
                order_b = order.expand(b, -1, -1)
                sdf = torch.cat([sdf, sdf_f], -1).gather(-1, order_b)
                if flat is None:
                    rgb = torch.cat([rgb, rgb_f], -2).gather(-2, order_b[..., None].expand(-1, -1, -1, 3))
        if fine_only:  # midpoint rule on the importance intervals
            delta = e_fine[..., 1:] - e_fine[..., :-1]
        else:  # segment lengths of the sorted samples (the last one runs to the exit point)
            delta = torch.cat([t[..., 1:] - t[..., :-1], (t_far[..., None] - t[..., -1:]).clamp(min=1e-4)], -1)
        wts = self._weights(sdf, delta.expand(b, -1, -1), hit)  # [B, VR, S]
        opacity = wts.sum(-1)  # [B, VR]
        if flat is not None:
            color = opacity[..., None] * flat.to(opacity)[:, None, :]
        else:
            color = (wts[..., None] * rgb).sum(-2)  # [B, VR, 3]
        if background is not None:
            bg = background(d.view(p, v, r, 3)).reshape(-1, v * r, 3)
            color = color + (1.0 - opacity[..., None]) * bg
        depth = (wts * t).sum(-1) / opacity.clamp(min=1e-6)
        depth = torch.where(opacity > 1e-4, depth, torch.zeros_like(depth))

        normals = None
        if with_normals:
            grad = self.sdf_gradient(field, points(t)).view(b, v * r, -1, 3)
            normals = (wts[..., None] * torch.nn.functional.normalize(grad, dim=-1)).sum(-2)
        eikonal = None
        if with_eikonal:
            eikonal = self.eikonal(field, o, d, t, p)

        def img(x: Tensor) -> Tensor:  # per-ray values of every view -> one image per (prompt, view)
            return rearrange(x, "b (v h w) c -> (b v) c h w", v=v, h=h, w=w)

        return RenderOutput(rgb=img(color), opacity=img(opacity[..., None]), depth=img(depth[..., None]),
                            normals=None if normals is None else img(normals), eikonal=eikonal,
                            n_prompts=b, n_views=v)

    def _weights(self, sdf: Tensor, delta: Tensor, hit: Tensor) -> Tensor:
        sigma_delta = laplace_density(sdf, self.beta) * delta * hit[..., None]
        # T_i = exp(-sum_{j<i} sigma_j delta_j): exclusive cumulative sum.
        acc = torch.cumsum(sigma_delta, -1)
        trans = torch.exp(-(acc - sigma_delta))
        return trans * (1.0 - torch.exp(-sigma_delta))

    def sdf_gradient(self, field, points: Tensor) -> Tensor:
        """Central finite-difference gradient of the SDF at ``points`` [P, N, 3] -> [B, N, 3]."""
        e = self.normal_eps
        offsets = torch.eye(3, device=points.device, dtype=points.dtype) * e
        pts = torch.cat([points + offsets[i] for i in range(3)] + [points - offsets[i] for i in range(3)], 1)
        s = field.sdf(pts).view(-1, 6, points.shape[1])
        return torch.stack([(s[:, i] - s[:, i + 3]) / (2 * e) for i in range(3)], -1)

    def eikonal(self, field, o: Tensor, d: Tensor, t: Tensor, p: int) -> Tensor:
        """Mean (|grad d| - 1)^2 at ``eikonal_points`` random ray samples (plus as many uniform
        points in the box), instead of at every sample: the term only needs a fair estimate."""
        m = self.eikonal_points
        n_rays, n_samp = t.shape[-2], t.shape[-1]
        ray = torch.randint(0, n_rays, (p, m), device=t.device)
        k = torch.randint(0, n_samp, (p, m), device=t.device)
        tt = t.expand(p, -1, -1)[torch.arange(p)[:, None], ray, k]
        pts = o[torch.arange(p)[:, None], ray] + d[torch.arange(p)[:, None], ray] * tt[..., None]
        uni = (torch.rand(p, m, 3, device=t.device) * 2 - 1) * self.bound
        grad = self.sdf_gradient(field, torch.cat([pts.detach(), uni], 1))
        return ((grad.norm(dim=-1) - 1.0) ** 2).mean()
