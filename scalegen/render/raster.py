"""Triangle coverage in pure PyTorch: which pixel centres lie inside which triangle.

Two users need it, and neither needs depth: mesh silhouettes (does the exported mesh cover the
pixels the volume renderer sees as opaque?) and texture baking (which 3D point of the mesh lies
under each texel of a UV atlas?). Every triangle's bounding box is enumerated at once
(``repeat_interleave`` over per-triangle box sizes), so the work is a few tensor ops, not a
Python loop over triangles.

Pixel convention (as ``camera_rays``): pixel (row j, column i) has its centre at continuous
image coordinates (i + 0.5, j + 0.5); x grows to the right, y downwards.
"""
from __future__ import annotations

import torch
from torch import Tensor

from scalegen.data.cameras import Cameras


def cover(tri: Tensor, height: int, width: int, max_candidates: int = 1 << 22) -> tuple[Tensor, Tensor, Tensor]:
    """Pixel centres covered by triangles ``tri`` [F, 3, 2] (image coordinates, any winding).

    Returns ``pixel`` [K] (flat index j * width + i), ``face`` [K] and barycentric weights
    ``bary`` [K, 3] of the pixel centre in its triangle. A pixel covered by several triangles
    appears once per triangle. Candidates are processed ``max_candidates`` at a time."""
    tri = tri.float()
    lo, hi = tri.amin(1), tri.amax(1)  # [F, 2]
    x0 = torch.ceil(lo[:, 0] - 0.5).clamp(min=0).long()
    x1 = torch.floor(hi[:, 0] - 0.5).clamp(max=width - 1).long()
    y0 = torch.ceil(lo[:, 1] - 0.5).clamp(min=0).long()
    y1 = torch.floor(hi[:, 1] - 0.5).clamp(max=height - 1).long()
    bw, bh = (x1 - x0 + 1).clamp(min=0), (y1 - y0 + 1).clamp(min=0)
    counts = bw * bh
    out_p, out_f, out_b = [], [], []
    ends = counts.cumsum(0)
    start = 0
    while start < len(tri):
        # The largest run of faces whose candidates fit the budget (at least one face).
        base = ends[start - 1] if start else ends.new_zeros(())
        stop = int(torch.searchsorted(ends, base + max_candidates, right=True))
        stop = max(stop, start + 1)
        f = torch.arange(start, stop)
        c = counts[start:stop]
        face = torch.repeat_interleave(f, c)
        if len(face):
            local = torch.arange(len(face)) - torch.repeat_interleave(c.cumsum(0) - c, c)
            px = x0[face] + local % bw[face]
            py = y0[face] + torch.div(local, bw[face], rounding_mode="floor")
            p = torch.stack([px.float() + 0.5, py.float() + 0.5], -1)
            bary, inside = _barycentric(tri[face], p)
            out_p.append((py * width + px)[inside])
            out_f.append(face[inside])
            out_b.append(bary[inside])
        start = stop
    if not out_p:
        return torch.zeros(0, dtype=torch.long), torch.zeros(0, dtype=torch.long), torch.zeros(0, 3)
    return torch.cat(out_p), torch.cat(out_f), torch.cat(out_b)


def _barycentric(tri: Tensor, p: Tensor, eps: float = 1e-6) -> tuple[Tensor, Tensor]:
    """Barycentric weights of points ``p`` [K, 2] in triangles ``tri`` [K, 3, 2] and whether the
    point is inside (edges included; degenerate triangles cover nothing)."""
    a, b, c = tri[:, 0], tri[:, 1], tri[:, 2]

    def cross(u: Tensor, v: Tensor) -> Tensor:
        return u[:, 0] * v[:, 1] - u[:, 1] * v[:, 0]

    area = cross(b - a, c - a)
    safe = torch.where(area.abs() > 1e-12, area, torch.ones_like(area))
    w_a = cross(c - b, p - b) / safe
    w_b = cross(a - c, p - c) / safe
    w_c = 1.0 - w_a - w_b
    bary = torch.stack([w_a, w_b, w_c], -1)
    inside = (bary >= -eps).all(-1) & (area.abs() > 1e-12)
    return bary, inside


def project(verts: Tensor, cameras: Cameras) -> tuple[Tensor, Tensor]:
    """Image coordinates [V, N, 2] and depth in front of the camera [V, N] of world points
    ``verts`` [N, 3] for a shared camera set (P == 1) of V views."""
    c2w = cameras.c2w[0]  # [V, 4, 4]
    rot, origin = c2w[:, :3, :3], c2w[:, :3, 3]
    cam = torch.einsum("vji,vnj->vni", rot, verts[None] - origin[:, None])  # R^T (x - o)
    depth = -cam[..., 2]
    focal = 0.5 * cameras.height / torch.tan(0.5 * cameras.fovy[0])  # [V]
    z = depth.clamp(min=1e-6)
    u = cam[..., 0] / z * focal[:, None] + 0.5 * cameras.width
    v = 0.5 * cameras.height - cam[..., 1] / z * focal[:, None]
    return torch.stack([u, v], -1), depth


def silhouettes(verts: Tensor, faces: Tensor, cameras: Cameras, near: float = 1e-3) -> Tensor:
    """Boolean masks [V, H, W]: pixels whose centre some triangle of the mesh covers, seen from
    each view of a shared camera set. Triangles reaching behind the camera are skipped."""
    uv, depth = project(verts.float(), cameras)
    h, w = cameras.height, cameras.width
    masks = torch.zeros(uv.shape[0], h * w, dtype=torch.bool)
    for view in range(uv.shape[0]):
        in_front = (depth[view][faces] > near).all(-1)
        pixel, _, _ = cover(uv[view][faces[in_front]], h, w)
        masks[view, pixel] = True
    return masks.view(-1, h, w)


def shade_unlit(verts: Tensor, faces: Tensor, colours: Tensor, cameras: Cameras, background: float = 1.0,
                near: float = 1e-3) -> tuple[Tensor, Tensor]:
    """A triangle mesh's vertex colours, unlit (albedo), seen from a shared camera set [1, V]: colour
    [V, 3, H, W] composited over a solid ``background`` and coverage [V, 1, H, W].

    A z-buffer over ``cover``'s (pixel, face) pairs: the nearest face at each pixel centre wins, depth and
    colour interpolated perspective-correctly (1/z is affine in the image: z = 1 / sum_i b_i / z_i,
    c = z sum_i b_i c_i / z_i with the screen-space barycentrics b_i). One sample per pixel centre, no
    antialiasing. Triangles reaching behind ``near`` are skipped."""
    uv, depth = project(verts.float(), cameras)
    h, w = cameras.height, cameras.width
    n_views = uv.shape[0]
    rgb = torch.full((n_views, h * w, 3), float(background))
    alpha = torch.zeros(n_views, h * w)
    colours = colours.float()
    for view in range(n_views):
        keep = (depth[view][faces] > near).all(-1)
        f = faces[keep]
        pixel, face, bary = cover(uv[view][f], h, w)
        if len(pixel) == 0:
            continue
        corner = f[face]  # [K, 3] vertex ids
        wz = bary / depth[view][corner]  # b_i / z_i
        z = 1.0 / wz.sum(-1)
        order = torch.argsort(z, stable=True)
        order = order[torch.argsort(pixel[order], stable=True)]  # by pixel, nearest first
        first = torch.ones(len(order), dtype=torch.bool)
        first[1:] = pixel[order][1:] != pixel[order][:-1]
        win = order[first]
        c = (wz[win, :, None] * colours[corner[win]]).sum(1) * z[win, None]
        rgb[view, pixel[win]] = c.clamp(0, 1)
        alpha[view, pixel[win]] = 1.0
    return rgb.view(n_views, h, w, 3).permute(0, 3, 1, 2), alpha.view(n_views, 1, h, w)
