"""Mesh export: marching cubes on one prompt's SDF, vertex colours from its colour field.

Field evaluation, not marching cubes, dominates export time, so the SDF is sampled coarse to
fine: a grid at 1/4 resolution first, then the full-resolution grid only within two coarse cells
of the surface (elsewhere the trilinearly upsampled coarse values keep the right sign).
Assets are written y-up (glTF's convention, which most viewers assume for OBJ/PLY too); the
scene is z-up, so (x, y, z) -> (x, z, -y).
"""
from __future__ import annotations

import os
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from scalegen.errors import ExportError

FORMATS = (".glb", ".obj", ".ply")


def _eval_chunks(fn, points: torch.Tensor, chunk: int = 262144) -> torch.Tensor:
    return torch.cat([fn(points[i:i + chunk][None])[0] for i in range(0, len(points), chunk)])


def _grid_points(res: int, bound: float) -> torch.Tensor:
    axis = torch.linspace(-bound, bound, res)
    return torch.stack(torch.meshgrid(axis, axis, axis, indexing="ij"), -1).reshape(-1, 3)


@torch.no_grad()
def sdf_grid(field, bound: float, resolution: int) -> torch.Tensor:
    """SDF of a one-prompt field on a ``resolution^3`` grid over the scene box, coarse to fine."""
    coarse_res = max(resolution // 4, 8) + 1
    coarse = _eval_chunks(field.sdf, _grid_points(coarse_res, bound)).view(1, 1, *(coarse_res,) * 3)
    up = F.interpolate(coarse, size=(resolution,) * 3, mode="trilinear", align_corners=True)[0, 0]
    margin = 2.0 * (2 * bound / (coarse_res - 1)) * 3**0.5
    near = up.abs() < margin
    pts = _grid_points(resolution, bound)[near.reshape(-1)]
    out = up.clone()
    if len(pts):
        out[near] = _eval_chunks(field.sdf, pts)
    return out


def drop_fragments(verts: np.ndarray, faces: np.ndarray, min_fraction: float) -> tuple[np.ndarray, np.ndarray]:
    """Remove connected pieces with fewer than ``min_fraction`` of the largest piece's faces
    (floaters: small closed blobs of negative SDF in regions no camera constrained)."""
    from scipy.sparse import coo_matrix  # noqa: PLC0415
    from scipy.sparse.csgraph import connected_components  # noqa: PLC0415

    n = len(verts)
    edges = np.concatenate([faces[:, [0, 1]], faces[:, [1, 2]]])
    graph = coo_matrix((np.ones(len(edges)), (edges[:, 0], edges[:, 1])), shape=(n, n))
    _, label = connected_components(graph, directed=False)
    face_label = label[faces[:, 0]]
    counts = np.bincount(face_label)
    keep_faces = counts[face_label] >= min_fraction * counts.max()
    faces = faces[keep_faces]
    used = np.unique(faces)
    remap = np.full(n, -1, dtype=np.int64)
    remap[used] = np.arange(len(used))
    return verts[used], remap[faces]


@torch.no_grad()
def extract_mesh(field, bound: float, resolution: int = 128, min_fragment: float = 0.02):
    """(vertices [V, 3] z-up world units, faces [F, 3], colours [V, 3] in [0, 1]).
    Pieces smaller than ``min_fragment`` of the largest piece are dropped (0 keeps all)."""
    from skimage.measure import marching_cubes  # noqa: PLC0415 - heavy import

    grid = sdf_grid(field, bound, resolution).cpu().numpy()
    if grid.min() >= 0 or grid.max() <= 0:
        what = "is empty" if grid.min() >= 0 else "fills the whole scene box"
        raise ExportError(f"the shape {what} (no surface to extract); the checkpoint may be untrained or "
                          "diverged - check its validation images")
    spacing = (2 * bound / (resolution - 1),) * 3
    verts, faces, _, _ = marching_cubes(grid, level=0.0, spacing=spacing)
    if len(faces) < 4:
        raise ExportError("the extracted mesh is degenerate (fewer than 4 faces); raise --resolution")
    verts = verts - bound
    if min_fragment > 0:
        verts, faces = drop_fragments(verts, faces, min_fragment)
    vt = torch.from_numpy(verts.copy()).float()
    colours = _eval_chunks(lambda p: field.query(p)[1], vt).clamp(0, 1).numpy()
    return verts.astype(np.float32), faces.astype(np.int64), colours


def check_output_path(path: str | Path) -> Path:
    p = Path(path)
    if p.suffix.lower() not in FORMATS:
        raise ExportError(f"cannot write '{path}': choose a file ending in {', '.join(FORMATS)}")
    parent = p.parent if str(p.parent) else Path(".")
    if not parent.is_dir():
        raise ExportError(f"cannot write '{path}': folder '{parent}' does not exist; create it first")
    if not os.access(parent, os.W_OK):
        raise ExportError(f"cannot write '{path}': folder '{parent}' is not writable")
    return p


def write_mesh(verts: np.ndarray, faces: np.ndarray, colours: np.ndarray, path: str | Path) -> Path:
    """Write y-up with vertex colours, atomically (temp file + rename)."""
    import trimesh  # noqa: PLC0415 - heavy import

    p = check_output_path(path)
    y_up = np.stack([verts[:, 0], verts[:, 2], -verts[:, 1]], 1)
    rgba = np.concatenate([(colours * 255 + 0.5).astype(np.uint8), np.full((len(colours), 1), 255, np.uint8)], 1)
    mesh = trimesh.Trimesh(vertices=y_up, faces=faces, vertex_colors=rgba, process=False)
    tmp = p.with_name(f".{p.stem}.tmp-{os.getpid()}{p.suffix}")
    try:
        mesh.export(str(tmp), file_type=p.suffix.lower().lstrip("."))
        os.replace(tmp, p)
    except OSError as e:
        raise ExportError(f"cannot write '{path}': {e.strerror}") from None
    finally:
        if tmp.exists():
            tmp.unlink()
    return p


def export_prompt(model, text_encoder, prompt: str, path: str | Path, bound: float, resolution: int = 128,
                  min_fragment: float = 0.02) -> dict:
    """Generate ``prompt``'s asset and write it; returns timings and sizes."""
    check_output_path(path)
    t0 = time.perf_counter()
    with torch.no_grad():
        field, _ = model(text_encoder.encode([prompt]))
    t1 = time.perf_counter()
    verts, faces, colours = extract_mesh(field, bound, resolution, min_fragment)
    t2 = time.perf_counter()
    out = write_mesh(verts, faces, colours, path)
    t3 = time.perf_counter()
    return {"path": str(out), "vertices": len(verts), "faces": len(faces), "generate_s": t1 - t0,
            "mesh_s": t2 - t1, "write_s": t3 - t2, "total_s": t3 - t0,
            "mean_colour": colours.mean(0).tolist()}
