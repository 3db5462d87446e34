"""Textured assets: a UV atlas from xatlas and a base-colour texture baked from the colour field.

Baking: every texel centre inside a chart triangle is mapped to its 3D point on the mesh
(barycentric interpolation, ``render.raster.cover`` in UV space), the colour field is evaluated
there (all prompts batched), and the texels around the charts are filled from their
neighbours (a few rounds of dilation) so bilinear filtering and mipmaps never read the empty
background at chart borders.

UV convention: trimesh's (OpenGL: v up, image row 0 at v = 1); trimesh flips v when it writes glTF.
xatlas wants float32 vertices and uint32 faces (other dtypes crash it), and its cost grows faster
than linearly in the face count (8k faces ~1 s, 20k ~6 s on one core): simplify first.
"""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from scalegen.errors import ExportError
from scalegen.export.mesh import Mesh, eval_grouped
from scalegen.render.raster import cover

DILATE_ROUNDS = 8  # texels of padding filled around every chart


def unwrap(mesh: Mesh, size: int) -> Mesh:
    """The mesh with xatlas's UV atlas: vertices split along seams, ``uv`` [V', 2] in [0, 1]."""
    try:
        import xatlas  # noqa: PLC0415 - optional dependency
    except ImportError:
        raise ExportError("--texture needs the xatlas package: pip install 'scalegen[export]' (or pip install "
                          "xatlas)") from None
    atlas = xatlas.Atlas()
    atlas.add_mesh(np.ascontiguousarray(mesh.verts, dtype=np.float32), np.ascontiguousarray(mesh.faces, dtype=np.uint32))
    chart_opts = xatlas.ChartOptions()
    pack_opts = xatlas.PackOptions()
    pack_opts.resolution, pack_opts.padding, pack_opts.bilinear = size, 2, True
    atlas.generate(chart_opts, pack_opts)
    vmap, faces, uv = atlas[0]
    vmap = vmap.astype(np.int64)
    return Mesh(mesh.verts[vmap], faces.astype(np.int64), mesh.normals[vmap], mesh.colours[vmap],
                uv=uv.astype(np.float32))


def texel_points(mesh: Mesh, size: int) -> tuple[Tensor, Tensor]:
    """Flat texel indices [K] (row-major, row 0 at the top) covered by the atlas and the 3D points
    [K, 3] (scene frame) under their centres."""
    uv = torch.from_numpy(mesh.uv)
    img = torch.stack([uv[:, 0] * size, (1.0 - uv[:, 1]) * size], -1)  # row 0 = v 1
    faces = torch.from_numpy(mesh.faces)
    texel, face, bary = cover(img[faces], size, size)
    verts = torch.from_numpy(mesh.verts)[faces[face]]  # [K, 3, 3]
    return texel, (bary[..., None] * verts).sum(1)


def dilate(image: Tensor, filled: Tensor, rounds: int = DILATE_ROUNDS) -> Tensor:
    """Fill empty texels of ``image`` [3, S, S] (``filled`` [S, S] marks the set ones) with the
    mean of their filled 3x3 neighbours, ``rounds`` times."""
    img, m = image * filled, filled.float()[None]
    for _ in range(rounds):
        num = F.avg_pool2d(img[None], 3, stride=1, padding=1)[0]
        den = F.avg_pool2d(m[None], 3, stride=1, padding=1)[0]
        grow = (den > 0) & (m == 0)
        img = torch.where(grow, num / den.clamp(min=1e-8), img)
        m = torch.where(grow, torch.ones_like(m), m)
    return img


@torch.no_grad()
def bake_textures(field, meshes: list[Mesh], size: int = 1024) -> list[Mesh]:
    """Unwrap every mesh and bake its colour field into a ``size`` x ``size`` texture."""
    unwrapped = [unwrap(m, size) for m in meshes]
    covered = [texel_points(m, size) for m in unwrapped]
    colours = eval_grouped(field, lambda f, x: f.query(x)[1], [p for _, p in covered])
    out = []
    for m, (texel, _), rgb in zip(unwrapped, covered, colours):
        image = torch.zeros(3, size * size)
        filled = torch.zeros(size * size, dtype=torch.bool)
        image[:, texel] = rgb.clamp(0, 1).t()
        filled[texel] = True
        image = dilate(image.view(3, size, size), filled.view(size, size))
        m.texture = (image.permute(1, 2, 0).numpy() * 255 + 0.5).astype(np.uint8)
        out.append(m)
    return out
