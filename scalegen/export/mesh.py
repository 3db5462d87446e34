"""Meshes from a batch of fields: the SDF on a grid (coarse to fine, batched over prompts),
marching cubes, floaters dropped, vertex colours from the colour field.

Field evaluation dominates, so the SDF is sampled on a pyramid of nested grids of 32, 64, ...
``resolution`` cells per axis. The coarsest grid is evaluated everywhere. Each finer one starts
as the previous one trilinearly upsampled; then, in rounds, the field is evaluated at the corners
of the cells the surface crosses (a sign change among a cell's 8 corners) that are not exact yet,
until every crossing cell has exact corners. Marching cubes reads nothing else: elsewhere only
the sign matters, and the upsampled values keep it. The first round's candidates are the
children of the coarser level's crossing cells (interpolation inside a cell whose corners share
a sign cannot create a sign change); later rounds look only at the cells around points whose
sign flipped. (Detail finer than the coarsest grid that leaves no sign change there can be
missed, as with any coarse-to-fine scheme.) The points of all prompts go to the field in one
batched call per round, padded to equal length; everything else is sparse tensor work.

Colours come from the colour field at the vertices, all prompts batched the same way.
(Interpolating colours evaluated at the grid points along the cell edges would save that call,
but mixes in the untrained colour inside the object: up to 0.15 off at 128^3 on a trained run.)
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field as dataclass_field
from typing import Callable, Optional

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from scalegen.errors import ExportError

# The SDF level extracted by default, in units of VolSDF's beta: the renderer's density
# Psi_beta(-d) / beta makes a grazing ray reach opacity 0.5 about 1.1-1.9 beta outside the zero level
# set (more for flatter silhouettes), so the zero level set looks thinner than every render. The measured
# mesh-vs-render silhouette IoU at both levels: docs/export.md and docs/notes/2026-11-30-generate-per-stage.md.
RENDER_LEVEL_BETAS = 1.5
COARSEST = 32  # cells per axis of the pyramid's first level, evaluated in full
MAX_ROUNDS = 32  # rounds of "evaluate the corners of crossing cells" per level (usually 3-8)
_CORNERS = torch.tensor([[a, b, c] for a in (0, 1) for b in (0, 1) for c in (0, 1)])  # [8, 3]


@dataclass
class Mesh:
    """One prompt's surface in the scene's frame (z-up, world units)."""

    verts: np.ndarray  # [V, 3] float32
    faces: np.ndarray  # [F, 3] int64, counter-clockwise seen from outside
    normals: np.ndarray  # [V, 3] float32, unit, outward
    colours: np.ndarray  # [V, 3] float32 in [0, 1]
    uv: Optional[np.ndarray] = None  # [V, 2] float32 when textured (see export/texture.py)
    texture: Optional[np.ndarray] = None  # [S, S, 3] uint8 base colour (row 0 at the top = v 1)


@dataclass
class StageTimes:
    """Seconds spent per stage of the export path (summed over calls)."""

    seconds: dict[str, float] = dataclass_field(default_factory=dict)

    def add(self, stage: str, t0: float) -> float:
        now = time.perf_counter()
        self.seconds[stage] = self.seconds.get(stage, 0.0) + now - t0
        return now


def pyramid_sizes(resolution: int) -> list[int]:
    """Cells per axis of the pyramid, finest last: 128 -> [32, 64, 128]; 48 -> [48]."""
    sizes = [resolution]
    while sizes[0] % 2 == 0 and sizes[0] // 2 >= COARSEST:
        sizes.insert(0, sizes[0] // 2)
    return sizes


def _unravel(index: Tensor, size: int) -> Tensor:
    """[N, 3] integer coordinates of flat indices into a ``size^3`` array."""
    return torch.stack([torch.div(index, size * size, rounding_mode="floor"),
                        torch.div(index, size, rounding_mode="floor") % size, index % size], -1)


def _ravel(ijk: Tensor, size: int) -> Tensor:
    return (ijk[..., 0] * size + ijk[..., 1]) * size + ijk[..., 2]


def grid_coords(index: Tensor, cells: int, bound: float) -> Tensor:
    """World coordinates [N, 3] of flat point indices of a grid of ``cells`` cells per axis
    (``cells + 1`` points) spanning [-bound, bound]^3 (x, y, z = the grid's dims 0, 1, 2)."""
    return _unravel(index, cells + 1).float() * (2 * bound / cells) - bound


def cell_corners(cells: Tensor, n: int) -> Tensor:
    """Flat point indices [C, 8] of the corners of flat cell indices ``cells`` (``n`` cells per axis)."""
    return _ravel(_unravel(cells, n)[:, None] + _CORNERS, n + 1)


def point_cells(points: Tensor, n: int) -> Tensor:
    """Flat indices of the (up to 8) cells touching flat point indices ``points``, unique."""
    ijk = _unravel(points, n + 1)[:, None] - _CORNERS  # [P, 8, 3]
    valid = ((ijk >= 0) & (ijk < n)).all(-1)
    return torch.unique(_ravel(ijk[valid], n))


def crossing(grid: Tensor, cells: Tensor, n: int) -> Tensor:
    """Mask over ``cells``: whose corners in ``grid`` (flat, ``(n+1)^3``) differ in sign."""
    inside = grid[cell_corners(cells, n)] < 0
    return inside.any(1) & ~inside.all(1)


def children(cells: Tensor, n: int) -> Tensor:
    """The 8 cells of the next level (``2n`` per axis) inside each cell of a level of ``n``."""
    return _ravel((2 * _unravel(cells, n))[:, None] + _CORNERS, 2 * n).reshape(-1)


def eval_grouped(field, fn: Callable, points: list[Tensor], chunk: int = 1 << 18, spread: float = 1.25) -> list[Tensor]:
    """``fn(field, points [B, N, 3])`` (e.g. the SDF, [B, N]) at per-prompt point sets of different
    lengths. Prompts with similar counts (within ``spread`` of each other) go in one padded call to
    ``field.select(group)``, so little work goes to padding (one padded call for 16 prompts whose
    meshes range from 16k to 81k vertices computes 2.4x the points needed), walked in chunks of
    about ``chunk`` points in all."""
    sizes = [len(p) for p in points]
    order = sorted(range(len(points)), key=lambda i: sizes[i])
    groups: list[list[int]] = []
    for i in order:
        if groups and sizes[i] <= spread * max(sizes[groups[-1][0]], 1):
            groups[-1].append(i)
        else:
            groups.append([i])
    out: list[Tensor] = [torch.empty(0)] * len(points)
    for g in groups:
        sub = field if g == list(range(len(points))) else field.select(g)
        n = max(max(sizes[i] for i in g), 1)  # an empty group still returns [0, ...] of the right shape
        padded = points[g[0]].new_zeros(len(g), n, 3)
        for j, i in enumerate(g):
            padded[j, :sizes[i]] = points[i]
        step = max(chunk // len(g), 1024)
        res = torch.cat([fn(sub, padded[:, s:s + step]) for s in range(0, n, step)], 1)
        for j, i in enumerate(g):
            out[i] = res[j, :sizes[i]]
    return out


def render_level(beta: float) -> float:
    """The SDF level whose surface matches the volume renders' silhouettes (``RENDER_LEVEL_BETAS``)."""
    return RENDER_LEVEL_BETAS * beta


@torch.no_grad()
def sdf_grids(field, bound: float, resolution: int, level: float = 0.0) -> list[Tensor]:
    """Every prompt's ``SDF - level`` on a grid of ``resolution`` cells per axis, [R+1, R+1, R+1]
    (x, y, z = dims 0, 1, 2, over [-bound, bound]^3), coarse to fine (module docstring). Memory:
    the finest grids of all prompts at once, 5 bytes per grid point (16 prompts at 256: 1.4 GB)."""
    def sdf(f, points: Tensor) -> Tensor:
        return f.sdf(points) - level

    sizes = pyramid_sizes(resolution)
    b, n0 = field.n_prompts, sizes[0]
    # The coarsest grid: the same points for every prompt (fields share their features there).
    grids = list(torch.cat([sdf(field, grid_coords(i, n0, bound)[None]) for i in torch.arange((n0 + 1) ** 3).split(1 << 17)],
                           1).view(b, n0 + 1, n0 + 1, n0 + 1))
    all_cells = torch.arange(n0 ** 3)
    cross = [all_cells[crossing(g.view(-1), all_cells, n0)] for g in grids]
    for n_prev, n in zip(sizes[:-1], sizes[1:]):
        grids = [F.interpolate(g[None, None], size=(n + 1,) * 3, mode="trilinear", align_corners=True)[0, 0]
                 for g in grids]
        known = [torch.zeros((n + 1) ** 3, dtype=torch.bool) for _ in range(b)]
        candidates = [children(c, n_prev) for c in cross]
        looked_at = [[c] for c in candidates]
        for _ in range(MAX_ROUNDS):
            need = []
            for g, k, c in zip(grids, known, candidates):
                pts = torch.unique(cell_corners(c[crossing(g.view(-1), c, n)], n))
                need.append(pts[~k[pts]])
            if not any(len(x) for x in need):
                break
            values = eval_grouped(field, sdf, [grid_coords(x, n, bound) for x in need])
            for p, (x, v) in enumerate(zip(need, values)):
                flat = grids[p].view(-1)
                flipped = x[(flat[x] < 0) != (v < 0)]
                flat[x] = v
                known[p][x] = True
                candidates[p] = point_cells(flipped, n)  # only their cells can have changed
                looked_at[p].append(candidates[p])
        cells = [torch.unique(torch.cat(c)) for c in looked_at]
        cross = [c[crossing(g.view(-1), c, n)] for g, c in zip(grids, cells)]
    return grids


def marching_cubes(grid: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Zero level set of ``grid`` [R, R, R]: vertices in grid units (index space), faces (outward
    winding) and outward unit normals. Runs on the box of cells the surface crosses only."""
    from skimage.measure import marching_cubes as skimage_mc  # noqa: PLC0415 - heavy import

    res = grid.shape[0]
    inside = grid < 0
    box = []
    for d in range(3):
        hits = np.flatnonzero(inside.any(axis=tuple(a for a in range(3) if a != d)))
        box.append((max(int(hits[0]) - 1, 0), min(int(hits[-1]) + 2, res)))
    crop = np.ascontiguousarray(grid[box[0][0]:box[0][1], box[1][0]:box[1][1], box[2][0]:box[2][1]])
    # "descent" winds faces counter-clockwise seen from the positive (outside) side; skimage's normals
    # point towards lower values, so they are flipped to point outwards.
    verts, faces, normals, _ = skimage_mc(crop, level=0.0, gradient_direction="descent")
    verts += np.array([lo for lo, _ in box], dtype=verts.dtype)
    return verts.astype(np.float32), faces.astype(np.int64), -normals.astype(np.float32)


def drop_fragments(verts: np.ndarray, faces: np.ndarray, min_fraction: float) -> tuple[np.ndarray, np.ndarray]:
    """Indices of the vertices kept and the re-indexed faces, without connected pieces of fewer
    than ``min_fraction`` of the largest piece's faces (floaters: small closed blobs of negative
    SDF in regions no camera constrained)."""
    from scipy.sparse import coo_matrix  # noqa: PLC0415
    from scipy.sparse.csgraph import connected_components  # noqa: PLC0415

    n = len(verts)
    edges = np.concatenate([faces[:, [0, 1]], faces[:, [1, 2]]])
    graph = coo_matrix((np.ones(len(edges)), (edges[:, 0], edges[:, 1])), shape=(n, n))
    _, label = connected_components(graph, directed=False)
    face_label = label[faces[:, 0]]
    counts = np.bincount(face_label)
    faces = faces[counts[face_label] >= min_fraction * counts.max()]
    used = np.unique(faces)
    remap = np.full(n, -1, dtype=np.int64)
    remap[used] = np.arange(len(used))
    return used, remap[faces]


def surface_of(grid: Tensor, min_fragment: float, name: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Marching cubes and floater removal on one prompt's grid (vertices in grid units), with the
    errors a user sees."""
    g = grid.numpy()
    if g.min() >= 0 or g.max() <= 0:
        what = "is empty" if g.min() >= 0 else "fills the whole scene box"
        raise ExportError(f"the shape of {name} {what} (no surface to extract); the checkpoint may be "
                          "untrained or diverged - check its validation images")
    verts, faces, normals = marching_cubes(g)
    if len(faces) < 4:
        raise ExportError(f"the mesh of {name} is degenerate ({len(faces)} faces); raise --resolution")
    if min_fragment > 0:
        keep, faces = drop_fragments(verts, faces, min_fragment)
        verts, normals = verts[keep], normals[keep]
    return verts, faces, normals


def clean(verts: np.ndarray, faces: np.ndarray, normals: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Drop faces that repeat a vertex and vertices no face uses; make every normal unit length
    (a zero or non-finite normal becomes the mean of its faces' normals, else +z). glTF validators
    reject non-unit normals."""
    faces = faces[(faces[:, 0] != faces[:, 1]) & (faces[:, 1] != faces[:, 2]) & (faces[:, 0] != faces[:, 2])]
    used = np.unique(faces)
    remap = np.full(len(verts), -1, dtype=np.int64)
    remap[used] = np.arange(len(used))
    verts, faces, normals = verts[used], remap[faces], normals[used]
    length = np.linalg.norm(normals, axis=1)
    bad = ~np.isfinite(length) | (length < 1e-6)
    if bad.any():
        tri = verts[faces]
        face_n = np.cross(tri[:, 1] - tri[:, 0], tri[:, 2] - tri[:, 0])
        acc = np.zeros_like(verts)
        for k in range(3):
            np.add.at(acc, faces[:, k], face_n)
        acc_len = np.linalg.norm(acc, axis=1)
        acc[acc_len < 1e-12] = (0.0, 0.0, 1.0)
        normals = np.where(bad[:, None], acc, normals)
        length = np.linalg.norm(normals, axis=1)
    return verts, faces, (normals / length[:, None]).astype(np.float32)


def simplify(verts: np.ndarray, faces: np.ndarray, max_faces: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Quadric decimation to at most ``max_faces`` faces (trimesh + fast-simplification); normals
    from the simplified faces."""
    import trimesh  # noqa: PLC0415 - heavy import

    try:
        tm = trimesh.Trimesh(verts, faces, process=False).simplify_quadric_decimation(face_count=max_faces)
    except ImportError:
        raise ExportError("--simplify needs the fast-simplification package: pip install 'scalegen[export]'") from None
    return (np.asarray(tm.vertices, dtype=np.float32), np.asarray(tm.faces, dtype=np.int64),
            np.asarray(tm.vertex_normals, dtype=np.float32))


@torch.no_grad()
def extract_meshes(field, bound: float, resolution: int = 128, level: float = 0.0, min_fragment: float = 0.02,
                   max_faces: int = 0, names: list[str] | None = None, times: StageTimes | None = None) -> list[Mesh]:
    """One ``Mesh`` per prompt of ``field``: the surface ``sdf = level`` (``render_level(beta)``
    matches the volume renders), simplified to ``max_faces`` faces when that is > 0.
    ``names`` (e.g. the prompts) appear in errors; ``times`` collects seconds per stage: sdf (the
    field on the grid pyramid), marching_cubes (with floater removal), simplify, colours (the
    colour field at the vertices)."""
    times = times or StageTimes()
    names = names or [f"prompt {i}" for i in range(field.n_prompts)]
    t = time.perf_counter()
    grids = sdf_grids(field, bound, resolution, level)
    t = times.add("sdf", t)
    surfaces = [surface_of(g, min_fragment, repr(name)) for g, name in zip(grids, names)]
    del grids
    t = times.add("marching_cubes", t)
    if max_faces > 0:
        surfaces = [simplify(v, f, max_faces) if len(f) > max_faces else (v, f, n) for v, f, n in surfaces]
        t = times.add("simplify", t)
    surfaces = [clean(v, f, n) for v, f, n in surfaces]
    h = 2 * bound / resolution
    verts = [torch.from_numpy(v * h - bound) for v, _, _ in surfaces]
    rgb = eval_grouped(field, lambda f, x: f.query(x)[1], verts)
    meshes = [Mesh(v.numpy(), f, n, c.clamp(0, 1).numpy()) for v, (_, f, n), c in zip(verts, surfaces, rgb)]
    times.add("colours", t)
    return meshes


def extract_mesh(field, bound: float, resolution: int = 128, min_fragment: float = 0.02, level: float = 0.0):
    """(vertices [V, 3], faces [F, 3], colours [V, 3]) of a one-prompt field."""
    m = extract_meshes(field, bound, resolution, level, min_fragment)[0]
    return m.verts, m.faces, m.colours
