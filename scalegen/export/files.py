"""Asset files: GLB (vertex colours or a baked base-colour texture), OBJ and PLY (vertex colours),
written with trimesh, y-up, atomically, under safe names.

Assets are written y-up (glTF's convention, which most viewers assume for OBJ/PLY too); the scene
is z-up, so (x, y, z) -> (x, z, -y), a rotation (winding and normals stay valid). GLB buffer views
get their ``target`` (vertex attributes / indices), which the Khronos validator asks for.
"""
from __future__ import annotations

import io
import re
from pathlib import Path

import numpy as np

from scalegen import atomic
from scalegen.errors import ExportError
from scalegen.export.mesh import Mesh

FORMATS = ("glb", "obj", "ply")
ARRAY_BUFFER, ELEMENT_ARRAY_BUFFER = 34962, 34963  # glTF bufferView.target values


def check_format(fmt: str) -> str:
    f = fmt.lower().lstrip(".")
    if f not in FORMATS:
        raise ExportError(f"unknown format '{fmt}'; choose one of {', '.join(FORMATS)}")
    return f


def slug(text: str, limit: int = 60) -> str:
    """A file-name-safe ASCII rendering of a prompt: 'A red cube!' -> 'a_red_cube'."""
    return re.sub(r"[^a-z0-9]+", "_", text.lower()).strip("_")[:limit].strip("_") or "prompt"


def asset_name(index: int, prompt: str) -> str:
    """Unique within a batch (the index) and readable (the prompt): '0003_a_red_cube'."""
    return f"{index:04d}_{slug(prompt)}"


def y_up(v: np.ndarray) -> np.ndarray:
    """Scene (z-up) to file (y-up): (x, y, z) -> (x, z, -y)."""
    return np.stack([v[:, 0], v[:, 2], -v[:, 1]], 1)


def z_up(v: np.ndarray) -> np.ndarray:
    """File (y-up) back to scene (z-up): the inverse of ``y_up``."""
    return np.stack([v[:, 0], -v[:, 2], v[:, 1]], 1)


def to_trimesh(mesh: Mesh):
    """A y-up ``trimesh.Trimesh`` with normals and either the texture (when baked) or vertex colours."""
    import trimesh  # noqa: PLC0415 - heavy import
    from PIL import Image  # noqa: PLC0415

    kwargs = dict(vertices=y_up(mesh.verts), faces=mesh.faces, vertex_normals=y_up(mesh.normals), process=False)
    if mesh.texture is not None:
        material = trimesh.visual.material.PBRMaterial(
            baseColorTexture=Image.fromarray(mesh.texture), metallicFactor=0.0, roughnessFactor=1.0)
        return trimesh.Trimesh(**kwargs, visual=trimesh.visual.TextureVisuals(uv=mesh.uv, material=material))
    rgba = np.concatenate([(mesh.colours * 255 + 0.5).astype(np.uint8), np.full((len(mesh.verts), 1), 255, np.uint8)], 1)
    return trimesh.Trimesh(**kwargs, vertex_colors=rgba)


def _set_targets(tree: dict) -> None:
    """glTF tree post-processor: vertex attributes live in ARRAY_BUFFER views, indices in
    ELEMENT_ARRAY_BUFFER views."""
    views = tree.get("bufferViews", [])
    accessors = tree.get("accessors", [])
    for m in tree.get("meshes", []):
        for prim in m.get("primitives", []):
            for acc in prim.get("attributes", {}).values():
                views[accessors[acc]["bufferView"]]["target"] = ARRAY_BUFFER
            if "indices" in prim:
                views[accessors[prim["indices"]]["bufferView"]]["target"] = ELEMENT_ARRAY_BUFFER


def mesh_bytes(mesh: Mesh, fmt: str) -> bytes:
    """The file's content in ``fmt`` (glb, obj or ply)."""
    tm = to_trimesh(mesh)
    if fmt == "glb":
        return tm.export(file_type="glb", include_normals=True, tree_postprocessor=_set_targets)
    if mesh.texture is not None:
        raise ExportError("a baked texture can only be written to GLB; use --format glb with --texture")
    if fmt == "obj":
        return tm.export(file_type="obj", include_normals=True, include_color=True).encode()
    buf = io.BytesIO()
    buf.write(tm.export(file_type="ply", encoding="binary"))
    return buf.getvalue()


def write_atomic(path: str | Path, data: bytes) -> Path:
    """``atomic.write_bytes``, with a write the system refuses (full disk, no permission) as a one-line
    ``ExportError`` naming the file."""
    try:
        return atomic.write_bytes(path, data)
    except OSError as e:
        raise ExportError(f"cannot write '{path}': {e.strerror or e}") from None


def write_mesh(mesh: Mesh, path: str | Path, fmt: str | None = None) -> Path:
    """Write ``mesh`` to ``path`` (format from ``fmt`` or the suffix), atomically."""
    p = Path(path)
    return write_atomic(p, mesh_bytes(mesh, check_format(fmt or p.suffix)))
