"""3D Gaussians in the standard 3DGS PLY layout (graphdeco-inria's ``save_ply``, which viewers such as
SuperSplat and gsplat's tools read): one binary little-endian ``vertex`` element of float32 properties

    x y z  nx ny nz (zeros)  f_dc_0..2  f_rest_0..3(K-1)-1  opacity (logit)  scale_0..2 (log)  rot_0..3 (w x y z)

``f_rest`` is channel-major: the K-1 higher-order coefficients of red, then green, then blue. Positions
are written in the scene's frame (z-up), as 3DGS writes its scene's: no axis swap.
"""
from __future__ import annotations

import io
import math
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from scalegen.errors import ExportError
from scalegen.export.files import write_atomic

PROPERTIES_HEAD = ["x", "y", "z", "nx", "ny", "nz", "f_dc_0", "f_dc_1", "f_dc_2"]


def gaussian_ply_names(sh_degree: int) -> list[str]:
    k = (sh_degree + 1) ** 2
    return (PROPERTIES_HEAD + [f"f_rest_{i}" for i in range(3 * (k - 1))] + ["opacity"]
            + [f"scale_{i}" for i in range(3)] + [f"rot_{i}" for i in range(4)])


def write_gaussian_ply(path: str | Path, means: Tensor, log_scales: Tensor, quats: Tensor, opacity_logits: Tensor,
                       sh: Tensor) -> Path:
    """Write raw Gaussian tensors (``sh`` [G, K, 3]) to ``path`` atomically (temp file + rename)."""
    from plyfile import PlyData, PlyElement  # noqa: PLC0415

    p = Path(path)
    if p.suffix.lower() != ".ply":
        raise ExportError(f"cannot write '{path}': a 3DGS file ends in .ply")
    if not p.parent.is_dir():
        raise ExportError(f"cannot write '{path}': folder '{p.parent}' does not exist; create it first")
    g, k = sh.shape[0], sh.shape[1]
    degree = int(round(math.sqrt(k))) - 1
    if (degree + 1) ** 2 != k:
        raise ExportError(f"{k} SH coefficients per colour is not (degree + 1)^2")
    f_rest = sh[:, 1:].transpose(1, 2).reshape(g, -1)  # [G, 3 * (K - 1)], channel-major
    columns = [means, torch.zeros_like(means), sh[:, 0], f_rest, opacity_logits.reshape(g, 1), log_scales, quats]
    data = torch.cat([c.detach().float().cpu().reshape(g, -1) for c in columns], 1).numpy()
    names = gaussian_ply_names(degree)
    records = np.empty(g, dtype=[(n, "<f4") for n in names])
    for i, n in enumerate(names):
        records[n] = data[:, i]
    buf = io.BytesIO()
    PlyData([PlyElement.describe(records, "vertex")], text=False, byte_order="<").write(buf)
    return write_atomic(p, buf.getvalue())


def is_gaussian_ply(path: str | Path) -> bool:
    """Whether a PLY file holds 3DGS Gaussians (its vertices have scale_0, rot_0 and opacity)."""
    from plyfile import PlyData  # noqa: PLC0415

    try:
        ply = PlyData.read(str(path))
    except Exception:  # noqa: BLE001 - not a PLY plyfile can read: not ours either
        return False
    names = {p.name for p in ply["vertex"].properties} if "vertex" in ply else set()
    return {"scale_0", "rot_0", "opacity", "f_dc_0"} <= names


def read_gaussian_ply(path: str | Path) -> dict[str, Tensor]:
    """``means``, ``log_scales``, ``quats``, ``opacity_logits``, ``sh`` [G, K, 3] of a 3DGS PLY file."""
    from plyfile import PlyData  # noqa: PLC0415

    try:
        ply = PlyData.read(str(path))
        v = ply["vertex"]
    except Exception as e:  # noqa: BLE001
        raise ExportError(f"'{path}' is not a readable PLY file with vertices ({e.__class__.__name__})") from None
    names = [p.name for p in v.properties]

    def cols(prefix: str, n: int) -> Tensor:
        if n == 0:
            return torch.zeros(len(v.data), 0)
        missing = [f"{prefix}{i}" for i in range(n) if f"{prefix}{i}" not in names]
        if missing:
            raise ExportError(f"'{path}' is not a 3DGS PLY file: it has no '{missing[0]}' property")
        return torch.from_numpy(np.stack([np.asarray(v[f"{prefix}{i}"], dtype=np.float32) for i in range(n)], 1))

    n_rest = len([n for n in names if n.startswith("f_rest_")])
    k = 1 + n_rest // 3
    if n_rest % 3 or int(round(math.sqrt(k))) ** 2 != k:
        raise ExportError(f"'{path}' has {n_rest} f_rest properties; a 3DGS file has 3 * ((degree + 1)^2 - 1)")
    if "opacity" not in names:
        raise ExportError(f"'{path}' is not a 3DGS PLY file: it has no 'opacity' property")
    g = len(v.data)
    sh = torch.cat([cols("f_dc_", 3)[:, None], cols("f_rest_", n_rest).reshape(g, 3, k - 1).transpose(1, 2)], 1)
    return {"means": torch.stack([torch.from_numpy(np.asarray(v[c], dtype=np.float32)) for c in "xyz"], 1),
            "log_scales": cols("scale_", 3), "quats": cols("rot_", 4),
            "opacity_logits": torch.from_numpy(np.asarray(v["opacity"], dtype=np.float32)), "sh": sh}
