"""Does the mesh match the renders? Silhouette IoU of an exported mesh against the volume
renderer's opacity (> 0.5) of the same field, view by view.

The mesh is the zero level set and the volume renderer's density is a Laplace CDF of the SDF
(VolSDF), so the two silhouettes agree up to about ``beta`` at the border; a wrong axis swap, a
half-cell offset in marching cubes or a missing piece shows up as a clear drop.
"""
from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

from scalegen.data.cameras import Cameras, orbit_cameras
from scalegen.render.raster import silhouettes


def check_cameras(cfg, views: int = 8, size: int = 64):
    """The evaluation orbit (elevation, distance, field of view of ``camera.eval_*``)."""
    c = cfg.camera
    return orbit_cameras(views, c.eval_elevation, c.eval_distance, c.eval_fovy, size)


def mask_iou(a: Tensor, b: Tensor) -> Tensor:
    """IoU per leading index of boolean masks [N, H, W] (1 where both are empty)."""
    inter = (a & b).flatten(1).sum(1).float()
    union = (a | b).flatten(1).sum(1).float()
    return torch.where(union > 0, inter / union.clamp(min=1), torch.ones_like(union))


@torch.no_grad()
def silhouette_iou(verts: list[np.ndarray], faces: list[np.ndarray], field, renderer, cameras: Cameras,
                   samples: int = 64, importance_samples: int = 64) -> Tensor:
    """IoU [B, V] between each prompt's mesh silhouette (``verts`` z-up, scene frame) and the
    volume renderer's opacity > 0.5 of ``field`` from the shared cameras."""
    out = renderer(field, cameras, perturb=False, samples=samples, importance_samples=importance_samples,
                   composite="all")
    v = cameras.shape[1]
    opaque = (out.opacity[:, 0] > 0.5).view(field.n_prompts, v, cameras.height, cameras.width)
    ious = []
    for p, (vs, fs) in enumerate(zip(verts, faces)):
        mesh_mask = silhouettes(torch.from_numpy(np.asarray(vs, dtype=np.float32)),
                                torch.from_numpy(np.asarray(fs, dtype=np.int64)), cameras)
        ious.append(mask_iou(mesh_mask, opaque[p]))
    return torch.stack(ious)
