"""3D Gaussian splatting (Kerbl et al. 2023): the scene, its density field, and a differentiable
rasterizer in pure PyTorch (gsplat's CUDA kernels as an optional fast path).

A scene is G anisotropic Gaussians: mean mu_i, scale s_i (stored as log s), rotation q_i (unit
quaternion w, x, y, z), opacity o_i (stored as its logit) and colour as spherical-harmonic
coefficients (degree 0..3; the colour is ``max(SH(d) + 0.5, 0)`` for view direction d). Projected
with the camera's Jacobian J (the EWA splatting approximation), each Gaussian covers the image as

    Sigma_3D = R diag(s^2) R^T,   Sigma_2D = J W Sigma_3D W^T J^T + blur I      (W: world -> camera)
    alpha_i(p) = min(0.99, o_i exp(-1/2 (p - m_i)^T Sigma_2D^-1 (p - m_i)))     (m_i: projected mean)

and the pixels composite front to back over the Gaussians sorted by depth (per view):

    C(p) = sum_i c_i alpha_i T_i + T_G bg(p),   T_i = prod_{j<i} (1 - alpha_j),   opacity = 1 - T_G

The torch rasterizer works on (pixel, Gaussian) pairs: each Gaussian lists the pixels of its 3-sigma
box, the pairs are sorted by (pixel, depth), and a pixel's transmittance is a segmented cumulative
sum, so the whole image is a few batched tensor operations without per-tile padding. Gradients are
autograd's, exact for this function (tested against finite differences). Pixel centres and the camera convention are ``data.cameras.camera_rays``' (OpenGL c2w,
pixel (i, j) at i + 0.5, j + 0.5), so a Gaussian lands exactly where the VolSDF renderer's rays see it.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from scalegen.data.cameras import Cameras, camera_rays
from scalegen.errors import ConfigError
from scalegen.render.base import BackgroundFn, Field, Renderer, RenderOutput

# Real spherical harmonics up to degree 3 (the constants every 3DGS implementation uses).
SH_C0 = 0.28209479177387814
SH_C1 = 0.4886025119029199
SH_C2 = (1.0925484305920792, -1.0925484305920792, 0.31539156525252005, -1.0925484305920792, 0.5462742152960396)
SH_C3 = (-0.5900435899266435, 2.890611442640554, -0.4570457994644658, 0.3731763325901154, -0.4570457994644658,
         1.445305721320277, -0.5900435899266435)


def rgb_to_sh(rgb: Tensor) -> Tensor:
    """The degree-0 coefficient whose colour is ``rgb``: (rgb - 0.5) / C0."""
    return (rgb - 0.5) / SH_C0


def sh_to_rgb(sh: Tensor, dirs: Optional[Tensor]) -> Tensor:
    """Colour ``max(sum_k c_k Y_k(d) + 0.5, 0)`` of coefficients ``sh`` [..., K, 3] (K = (deg+1)^2) seen
    along unit directions ``dirs`` [..., 3] (None for K = 1)."""
    k = sh.shape[-2]
    out = SH_C0 * sh[..., 0, :]
    if k > 1:
        x, y, z = (dirs[..., i:i + 1] for i in range(3))
        out = out - SH_C1 * y * sh[..., 1, :] + SH_C1 * z * sh[..., 2, :] - SH_C1 * x * sh[..., 3, :]
        if k > 4:
            xx, yy, zz, xy, yz, xz = x * x, y * y, z * z, x * y, y * z, x * z
            out = (out + SH_C2[0] * xy * sh[..., 4, :] + SH_C2[1] * yz * sh[..., 5, :]
                   + SH_C2[2] * (2 * zz - xx - yy) * sh[..., 6, :] + SH_C2[3] * xz * sh[..., 7, :]
                   + SH_C2[4] * (xx - yy) * sh[..., 8, :])
            if k > 9:
                out = (out + SH_C3[0] * y * (3 * xx - yy) * sh[..., 9, :] + SH_C3[1] * xy * z * sh[..., 10, :]
                       + SH_C3[2] * y * (4 * zz - xx - yy) * sh[..., 11, :]
                       + SH_C3[3] * z * (2 * zz - 3 * xx - 3 * yy) * sh[..., 12, :]
                       + SH_C3[4] * x * (4 * zz - xx - yy) * sh[..., 13, :]
                       + SH_C3[5] * z * (xx - yy) * sh[..., 14, :] + SH_C3[6] * x * (xx - 3 * yy) * sh[..., 15, :])
    return (out + 0.5).clamp(min=0.0)


def quaternion_to_matrix(q: Tensor) -> Tensor:
    """Rotation matrices [..., 3, 3] of quaternions (w, x, y, z) [..., 4] (normalised here)."""
    w, x, y, z = F.normalize(q, dim=-1).unbind(-1)
    return torch.stack([
        1 - 2 * (y * y + z * z), 2 * (x * y - w * z), 2 * (x * z + w * y),
        2 * (x * y + w * z), 1 - 2 * (x * x + z * z), 2 * (y * z - w * x),
        2 * (x * z - w * y), 2 * (y * z + w * x), 1 - 2 * (x * x + y * y),
    ], -1).reshape(*q.shape[:-1], 3, 3)


def matrix_to_quaternion(r: Tensor) -> Tensor:
    """Unit quaternions (w, x, y, z) [..., 4] of rotation matrices [..., 3, 3] (Shepperd's method: the
    largest of the four candidate denominators, so no division by a small number)."""
    m = r
    t = torch.stack([1 + m[..., 0, 0] + m[..., 1, 1] + m[..., 2, 2], 1 + m[..., 0, 0] - m[..., 1, 1] - m[..., 2, 2],
                     1 - m[..., 0, 0] + m[..., 1, 1] - m[..., 2, 2], 1 - m[..., 0, 0] - m[..., 1, 1] + m[..., 2, 2]], -1)
    best = t.argmax(-1)
    s = t.gather(-1, best[..., None]).clamp(min=1e-12).sqrt()[..., 0] * 2  # 4 * (the largest component)
    q = torch.stack([
        torch.stack([s / 4, (m[..., 2, 1] - m[..., 1, 2]) / s, (m[..., 0, 2] - m[..., 2, 0]) / s,
                     (m[..., 1, 0] - m[..., 0, 1]) / s], -1),
        torch.stack([(m[..., 2, 1] - m[..., 1, 2]) / s, s / 4, (m[..., 0, 1] + m[..., 1, 0]) / s,
                     (m[..., 0, 2] + m[..., 2, 0]) / s], -1),
        torch.stack([(m[..., 0, 2] - m[..., 2, 0]) / s, (m[..., 0, 1] + m[..., 1, 0]) / s, s / 4,
                     (m[..., 1, 2] + m[..., 2, 1]) / s], -1),
        torch.stack([(m[..., 1, 0] - m[..., 0, 1]) / s, (m[..., 0, 2] + m[..., 2, 0]) / s,
                     (m[..., 1, 2] + m[..., 2, 1]) / s, s / 4], -1),
    ], -2)
    q = q.gather(-2, best[..., None, None].expand(*best.shape, 1, 4))[..., 0, :]
    return F.normalize(q * torch.where(q[..., :1] < 0, -1.0, 1.0), dim=-1)


class GaussianField(Field):
    """One prompt's Gaussians, as the renderer and the mesh exporter read them.

    Tensors (raw, as optimised and as the 3DGS PLY stores them): ``means`` [G, 3], ``log_scales``
    [G, 3], ``quats`` [G, 4] (w, x, y, z; normalised on use), ``opacity_logits`` [G], ``sh`` [G, K, 3].

    As a ``Field`` it is the density ``rho(x) = sum_i o_i exp(-1/2 (x - mu_i)^T Sigma_i^-1 (x - mu_i))``:
    ``sdf(x) = level - rho(x)`` is a signed level-set function (negative inside, NOT a distance), so
    marching cubes at 0 (``export.mesh``) extracts the surface ``rho = level``; ``query``'s colour is the
    density-weighted mean of the Gaussians' view-independent (degree-0) colours.
    """

    def __init__(self, means: Tensor, log_scales: Tensor, quats: Tensor, opacity_logits: Tensor, sh: Tensor,
                 level: float = 0.5):
        self.means, self.log_scales, self.quats = means, log_scales, quats
        self.opacity_logits, self.sh, self.level = opacity_logits, sh, level
        self.n_prompts = 1

    @property
    def n_gaussians(self) -> int:
        return self.means.shape[0]

    @property
    def sh_degree(self) -> int:
        return int(round(math.sqrt(self.sh.shape[1]))) - 1

    def scales(self) -> Tensor:
        return self.log_scales.exp()

    def opacities(self) -> Tensor:
        return torch.sigmoid(self.opacity_logits)

    def rotations(self) -> Tensor:
        return quaternion_to_matrix(self.quats)

    def covariances(self) -> Tensor:
        """Sigma = (R S)(R S)^T, [G, 3, 3]."""
        m = self.rotations() * self.scales()[:, None, :]
        return m @ m.transpose(-1, -2)

    # --- the Field view: density level set and colours (mesh export) -----------------------------
    @torch.no_grad()
    def density_colour(self, points: Tensor, chunk: int = 4096) -> tuple[Tensor, Tensor]:
        """rho [N] and the density-weighted degree-0 colour [N, 3] at ``points`` [N, 3]. Each chunk of
        points only visits the Gaussians whose 3-sigma ball reaches the chunk's bounding box."""
        rot = self.rotations()
        inv_s = (-self.log_scales).exp()
        precision = (rot * inv_s[:, None, :] ** 2) @ rot.transpose(-1, -2)  # R S^-2 R^T
        reach = 3.0 * self.scales().amax(-1)
        opac, colour = self.opacities(), sh_to_rgb(self.sh[:, :1], None)
        rho, rgb = points.new_zeros(len(points)), points.new_zeros(len(points), 3)
        for s in range(0, len(points), chunk):
            x = points[s:s + chunk]
            lo, hi = x.amin(0), x.amax(0)
            gap = (self.means.clamp(lo, hi) - self.means).norm(dim=-1)
            sel = torch.nonzero(gap <= reach).squeeze(1)
            if len(sel) == 0:
                continue
            d = x[:, None, :] - self.means[sel]  # [n, g, 3]
            m = torch.einsum("ngi,gij,ngj->ng", d, precision[sel], d)
            w = opac[sel] * torch.exp(-0.5 * m)
            rho[s:s + chunk] = w.sum(-1)
            rgb[s:s + chunk] = (w @ colour[sel]) / w.sum(-1, keepdim=True).clamp(min=1e-12)
        return rho, rgb

    def sdf(self, points: Tensor) -> Tensor:
        """``level - rho`` [1, N] at ``points`` [1, N, 3] (a level set, not a distance)."""
        return self.level - self.density_colour(points[0])[0][None]

    def query(self, points: Tensor) -> tuple[Tensor, Tensor]:
        rho, rgb = self.density_colour(points[0])
        return (self.level - rho)[None], rgb[None]


@dataclass
class GaussianRenderOutput(RenderOutput):
    """``RenderOutput`` plus what densification reads: the projected means [V, G, 2] in pixels (their
    ``.grad`` after backward is the screen-space gradient) and which Gaussians each view saw [V, G]."""

    means2d: Optional[Tensor] = None
    visible: Optional[Tensor] = None


@dataclass
class Projected:
    """Gaussians projected into V views (the rasterizer's input): pixel means, conics (the inverse 2D
    covariance a, b, c of a x^2 + 2 b x y + c y^2), opacities, colours, depths, 3-sigma radii, validity."""

    means2d: Tensor  # [V, G, 2]
    conics: Tensor  # [V, G, 3]
    opacities: Tensor  # [G]
    colours: Tensor  # [V, G, 3]
    depths: Tensor  # [V, G] distance from the camera centre
    radii: Tensor  # [V, G] pixels
    valid: Tensor  # [V, G] in front of the near plane and touching the image


def project(field: GaussianField, c2w: Tensor, fovy: Tensor, height: int, width: int, near: float,
            blur: float) -> Projected:
    """EWA projection of every Gaussian into each of V cameras (``c2w`` [V, 4, 4], ``fovy`` [V])."""
    rot, cam = c2w[:, :3, :3], c2w[:, :3, 3]
    p = torch.einsum("vgj,vji->vgi", field.means[None] - cam[:, None, :], rot)  # camera frame (x right, y up, -z view)
    depth = -p[..., 2]
    focal = (0.5 * height / torch.tan(0.5 * fovy))[:, None]  # [V, 1] pixels, square pixels (camera_rays)
    d = depth.clamp(min=1e-6)
    u = 0.5 * width + focal * p[..., 0] / d
    v = 0.5 * height - focal * p[..., 1] / d
    # J = d(u, v)/d(x, y, z) at the mean; x/d, y/d clamped to 1.3x the frustum (3DGS) for stability.
    lim_x = 1.3 * (0.5 * width / focal)
    lim_y = 1.3 * (0.5 * height / focal)
    tx = (p[..., 0] / d).clamp(-lim_x, lim_x)
    ty = (p[..., 1] / d).clamp(-lim_y, lim_y)
    zero = torch.zeros_like(d)
    jac = torch.stack([torch.stack([focal / d, zero, focal * tx / d], -1),
                       torch.stack([zero, -focal / d, -focal * ty / d], -1)], -2)  # [V, G, 2, 3]
    cov_cam = rot.transpose(-1, -2)[:, None] @ field.covariances()[None] @ rot[:, None]  # W Sigma W^T
    cov2d = jac @ cov_cam @ jac.transpose(-1, -2)
    a, b, c = cov2d[..., 0, 0] + blur, cov2d[..., 0, 1], cov2d[..., 1, 1] + blur
    det = (a * c - b * b).clamp(min=1e-12)
    conics = torch.stack([c / det, -b / det, a / det], -1)
    mid = 0.5 * (a + c)
    lam = mid + (mid * mid - det).clamp(min=0.1).sqrt()
    radii = torch.ceil(3.0 * lam.sqrt()).detach()
    means2d = torch.stack([u, v], -1)
    valid = ((depth > near) & (u + radii > 0) & (u - radii < width) & (v + radii > 0) & (v - radii < height)).detach()
    if field.sh.shape[1] > 1:
        dirs = F.normalize(field.means[None] - cam[:, None, :], dim=-1)
        colours = sh_to_rgb(field.sh[None].expand(len(c2w), -1, -1, -1), dirs)
    else:
        colours = sh_to_rgb(field.sh[:, :1], None)[None].expand(len(c2w), -1, -1)
    return Projected(means2d, conics, field.opacities(), colours, p.norm(dim=-1), radii, valid)


def _alpha(m2: Tensor, con: Tensor, opac: Tensor, px: Tensor, py: Tensor, alpha_min: float) -> Tensor:
    """alpha = min(0.99, o exp(-1/2 (a dx^2 + 2 b dx dy + c dy^2))), zero below ``alpha_min``."""
    dx, dy = px - m2[..., 0], py - m2[..., 1]
    power = -0.5 * (con[..., 0] * dx * dx + con[..., 2] * dy * dy) - con[..., 1] * dx * dy
    a = (opac * torch.exp(power.clamp(max=0.0))).clamp(max=0.99)
    return torch.where(a >= alpha_min, a, torch.zeros_like(a))


def _transmittance(alpha: Tensor, first: Tensor) -> Tensor:
    """T_i = prod_{j<i} (1 - alpha_j) within each pixel's run of pairs (sorted front to back; ``first``
    [N] marks where a pixel's run starts): exp of a cumulative sum of log(1 - alpha) minus its value at
    the run's start, in float64 so that the long global sum does not swamp one pixel's terms."""
    log_keep = torch.log1p(-alpha.double())
    before = torch.cumsum(log_keep, 0) - log_keep  # sum over all earlier pairs
    start = torch.where(first, torch.arange(len(first), device=first.device), 0).cummax(0).values
    return torch.exp(before - before[start]).to(alpha.dtype)


def rasterize(proj: Projected, height: int, width: int, alpha_min: float = 1.0 / 255.0, t_min: float = 1e-4,
              extra: Optional[Tensor] = None) -> tuple[Tensor, Tensor, Tensor, Optional[Tensor]]:
    """Composite projected Gaussians front to back. Returns colour [V, 3, H, W], opacity [V, 1, H, W],
    depth [V, 1, H, W] (weighted mean depth over the opacity) and ``extra`` [V, G, C] features composited
    the same way ([V, C, H, W]) or None.

    Vectorised over (pixel, Gaussian) pairs, with no padding: every Gaussian lists the pixels of its
    3-sigma box; pairs with alpha >= ``alpha_min`` are sorted by (pixel, depth); a pixel's pairs are
    kept while its transmittance is >= ``t_min`` (3DGS's early stop). Autograd then runs over the kept
    pairs only: alpha, the per-pixel transmittance, and ``index_add`` of alpha T c into the pixels."""
    v_n, g_n = proj.valid.shape
    dev = proj.means2d.device
    n_pix = height * width
    z = proj.means2d.new_zeros(v_n, 1, height, width)
    with torch.no_grad():
        vis_v, vis_g = torch.nonzero(proj.valid, as_tuple=True)
        u, v = proj.means2d[vis_v, vis_g, 0], proj.means2d[vis_v, vis_g, 1]
        r = proj.radii[vis_v, vis_g]
        # pixel i is in the box when |i + 0.5 - u| <= r
        x_lo = torch.ceil(u - r - 0.5).clamp(0, width - 1).long()
        x_hi = torch.floor(u + r - 0.5).clamp(-1, width - 1).long()
        y_lo = torch.ceil(v - r - 0.5).clamp(0, height - 1).long()
        y_hi = torch.floor(v + r - 0.5).clamp(-1, height - 1).long()
        wx, wy = (x_hi - x_lo + 1).clamp(min=0), (y_hi - y_lo + 1).clamp(min=0)
        counts = wx * wy
        owner = torch.repeat_interleave(torch.arange(len(counts), device=dev), counts)
        local = torch.arange(len(owner), device=dev) - (torch.cumsum(counts, 0) - counts).index_select(0, owner)
        w_own = wx.index_select(0, owner)
        px = x_lo.index_select(0, owner) + local % w_own
        py = y_lo.index_select(0, owner) + local // w_own
        pv, pg = vis_v.index_select(0, owner), vis_g.index_select(0, owner)
        flat = pv * g_n + pg  # row of the [V * G, ...] tables
        a = _alpha(proj.means2d.reshape(-1, 2).index_select(0, flat), proj.conics.reshape(-1, 3).index_select(0, flat),
                   proj.opacities.index_select(0, pg), px + 0.5, py + 0.5, alpha_min)
        hit = torch.nonzero(a > 0).squeeze(1)
        rank = torch.empty_like(proj.depths, dtype=torch.long)  # depth rank of every Gaussian in each view
        order = proj.depths.masked_fill(~proj.valid, float("inf")).argsort(-1)
        rank.scatter_(1, order, torch.arange(g_n, device=dev).expand(v_n, -1))
        pairs = torch.stack([flat, px, py, pv * n_pix + py * width + px], 1).index_select(0, hit)  # [N, 4]
        key = pairs[:, 3] * g_n + rank.reshape(-1).index_select(0, pairs[:, 0])
        sort = torch.argsort(key)
        pairs, a = pairs.index_select(0, sort), a.index_select(0, hit).index_select(0, sort)
        first = torch.ones(len(pairs), dtype=torch.bool, device=dev)
        first[1:] = pairs[1:, 3] != pairs[:-1, 3]
        alive = torch.nonzero(_transmittance(a, first) >= t_min).squeeze(1)
        pairs, first = pairs.index_select(0, alive), first.index_select(0, alive)
        flat, px, py, pixel = pairs.unbind(1)
    if len(flat) == 0:
        return z.expand(-1, 3, -1, -1), z, z, None if extra is None else z.expand(-1, extra.shape[-1], -1, -1)
    alpha = _alpha(proj.means2d.reshape(-1, 2).index_select(0, flat), proj.conics.reshape(-1, 3).index_select(0, flat),
                   proj.opacities.index_select(0, flat % g_n), px + 0.5, py + 0.5, alpha_min)
    w = alpha * _transmittance(alpha, first)  # alpha_i T_i per kept pair
    feats = [proj.colours, proj.depths[..., None], torch.ones_like(proj.depths[..., None])]
    feats += [extra] if extra is not None else []
    table = torch.cat(feats, -1).reshape(v_n * g_n, -1)
    out = torch.zeros(v_n * n_pix, table.shape[-1], device=dev, dtype=table.dtype)
    out = out.index_add(0, pixel, w[:, None] * table.index_select(0, flat))
    out = out.view(v_n, height, width, -1).permute(0, 3, 1, 2)  # [V, 3 + 1 + 1 (+ C), H, W]
    rgb, depth_sum, op = out[:, :3], out[:, 3:4], out[:, 4:5]  # sum_i alpha_i T_i = 1 - T_final
    depth = torch.where(op > 1e-4, depth_sum / op.clamp(min=1e-6), torch.zeros_like(depth_sum))
    return rgb, op, depth, out[:, 5:] if extra is not None else None


def gsplat_available() -> bool:
    """gsplat's CUDA rasterizer can run here (installed, and a CUDA device)."""
    if not torch.cuda.is_available():
        return False
    try:
        import gsplat  # noqa: F401, PLC0415
    except ImportError:
        return False
    return True


class GaussianRasterizer(Renderer):
    """Renders a ``GaussianField`` (one prompt) from cameras [1, V] -> ``GaussianRenderOutput``.

    ``backend``: ``torch`` (the pair rasterizer above, any device), ``gsplat`` (its CUDA kernels; the
    field and cameras must be on a CUDA device) or ``auto`` (gsplat when it can run, else torch).
    ``blur`` is the 2D low-pass added to every projected covariance (px^2, 3DGS/gsplat's 0.3);
    ``alpha_min`` drops contributions below 1/255 and a pixel stops once its transmittance is below ``t_min``
    (1e-4), as 3DGS does. VolSDF's sample counts, which callers
    that render any field pass, do not apply here."""

    def __init__(self, near: float = 0.05, blur: float = 0.3, alpha_min: float = 1.0 / 255.0, t_min: float = 1e-4,
                 backend: str = "auto"):
        super().__init__()
        self.near, self.blur, self.backend = near, blur, backend
        self.alpha_min, self.t_min = alpha_min, t_min

    def use_gsplat(self, field: GaussianField) -> bool:
        if self.backend == "torch":
            return False
        ok = gsplat_available() and field.means.is_cuda
        if self.backend == "gsplat" and not ok:
            raise ConfigError("render.splat_backend=gsplat needs the gsplat package and a CUDA device; "
                              "use render.splat_backend=torch (or auto)")
        return ok

    def forward(self, field: Field, cameras: Cameras, background: Optional[BackgroundFn] = None, *,
                with_normals: bool = False, with_eikonal: bool = False) -> GaussianRenderOutput:
        if not isinstance(field, GaussianField):
            raise TypeError(f"the Gaussian rasterizer renders GaussianField, not {type(field).__name__}")
        p, v = cameras.shape
        assert p == 1, f"cameras for {p} prompts cannot render one prompt's Gaussians"
        h, w = cameras.height, cameras.width
        c2w, fovy = cameras.c2w[0].to(field.means), cameras.fovy[0].to(field.means)
        normals_g = self._normals(field, c2w) if with_normals else None
        if self.use_gsplat(field):
            rgb, op, depth, normals, means2d, visible = self._gsplat(field, c2w, fovy, h, w, normals_g)
        else:
            proj = project(field, c2w, fovy, h, w, self.near, self.blur)
            means2d, visible = proj.means2d, proj.valid
            if means2d.requires_grad and torch.is_grad_enabled():
                means2d.retain_grad()  # densification reads the screen-space gradient
            rgb, op, depth, normals = rasterize(proj, h, w, self.alpha_min, self.t_min, normals_g)
        if background is not None:
            _, dirs = camera_rays(cameras)  # [1, V, R, 3]
            bg = background(dirs.to(field.means)).reshape(v, h, w, 3).permute(0, 3, 1, 2)
            rgb = rgb + (1.0 - op) * bg
        return GaussianRenderOutput(rgb=rgb, opacity=op, depth=depth, normals=normals, eikonal=None, n_prompts=1,
                                    n_views=v, means2d=means2d, visible=visible)

    @staticmethod
    def _normals(field: GaussianField, c2w: Tensor) -> Tensor:
        """Each Gaussian's shortest axis, turned towards each camera: [V, G, 3] (world space)."""
        axis = field.rotations().gather(-1, field.log_scales.argmin(-1).view(-1, 1, 1).expand(-1, 3, 1))[..., 0]
        to_cam = c2w[:, None, :3, 3] - field.means[None]
        sign = torch.where((axis[None] * to_cam).sum(-1, keepdim=True) < 0, -1.0, 1.0)
        return axis[None] * sign

    def _gsplat(self, field: GaussianField, c2w: Tensor, fovy: Tensor, h: int, w: int, normals_g: Optional[Tensor]):
        """gsplat's ``rasterization`` (OpenCV cameras: y down, z forward) with colours, expected depth and
        optional normals as extra channels; the background is composited by the caller."""
        from gsplat import rasterization  # noqa: PLC0415 - optional, CUDA only

        flip = torch.diag(torch.tensor([1.0, -1.0, -1.0, 1.0], device=c2w.device, dtype=c2w.dtype))
        viewmats = torch.linalg.inv(c2w @ flip)  # world -> OpenCV camera
        focal = 0.5 * h / torch.tan(0.5 * fovy)
        ks = torch.zeros(len(c2w), 3, 3, device=c2w.device, dtype=c2w.dtype)
        ks[:, 0, 0], ks[:, 1, 1], ks[:, 0, 2], ks[:, 1, 2], ks[:, 2, 2] = focal, focal, 0.5 * w, 0.5 * h, 1.0
        if normals_g is None:
            colours, degree = field.sh, field.sh_degree
        else:  # extra channels cannot ride on SH evaluation: evaluate colours per view first
            dirs = F.normalize(field.means[None] - c2w[:, None, :3, 3], dim=-1)
            colours = torch.cat([sh_to_rgb(field.sh[None].expand(len(c2w), -1, -1, -1), dirs), normals_g], -1)
            degree = None
        out, alphas, meta = rasterization(field.means, F.normalize(field.quats, dim=-1), field.scales(),
                                          field.opacities(), colours, viewmats, ks, w, h, near_plane=self.near,
                                          sh_degree=degree, eps2d=self.blur, render_mode="RGB+ED", packed=False)
        return gsplat_outputs(out, alphas, meta, normals_g is not None)


def gsplat_outputs(out: Tensor, alphas: Tensor, meta: dict, with_normals: bool):
    """gsplat's ``rasterization`` result (``out`` [V, H, W, C], ``alphas`` [V, H, W, 1], ``meta``) as the torch
    path's: rgb, opacity, depth, normals [V, C, H, W], the projected means [V, G, 2] and visibility [V, G].

    ``meta["radii"]`` is [V, G] before gsplat 1.5 and [V, G, 2] (x and y radius) from 1.5 on: a Gaussian is
    visible in a view when its radii are positive (as gsplat's own strategies read it, all over the last axis),
    so densification always gets the [V, G] mask it multiplies with its per-view gradient norms."""
    out = out.permute(0, 3, 1, 2)  # [V, C, H, W]
    op = alphas.permute(0, 3, 1, 2)
    normals = out[:, 3:6] if with_normals else None
    means2d = meta["means2d"]
    if means2d.requires_grad and torch.is_grad_enabled():
        means2d.retain_grad()
    radii = meta["radii"]
    visible = (radii > 0).all(-1) if radii.dim() == 3 else radii > 0
    return out[:, :3], op, out[:, -1:], normals, means2d, visible
