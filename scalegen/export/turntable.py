"""Turntables: an orbit of volume renders per prompt (what the generator's field looks like, with
its learned backdrop), written as an H.264 MP4 (imageio-ffmpeg) or, without ffmpeg, an animated GIF.

The orbit's cameras are shared by all prompts, so the renderer evaluates shared sample points (the
fields share their feature computation there). Only the window the meshes project into is volume
rendered; around it the frame is the backdrop (``render_turntables``): 2-5x fewer rays.
"""
from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import torch
from einops import rearrange

from scalegen import atomic
from scalegen.data.cameras import Cameras, camera_rays, orbit_cameras
from scalegen.errors import ExportError
from scalegen.render.images import to_uint8
from scalegen.render.raster import project

FPS = 24


def turntable_cameras(cfg, frames: int, size: int):
    """One revolution at the evaluation orbit's elevation, distance and field of view."""
    c = cfg.camera
    return orbit_cameras(frames, c.eval_elevation, c.eval_distance, c.eval_fovy, size, azimuth_offset=0.0)


def crop_size(verts: list[np.ndarray], cameras: Cameras, margin: float) -> int:
    """Side of the centred pixel window (same parity as the frame) that holds every mesh's
    projection, grown by ``margin`` world units, in every view of ``cameras``; at most the frame."""
    size = cameras.height
    half = 0.0
    for v in verts:
        uv, depth = project(torch.from_numpy(np.asarray(v, dtype=np.float32)), cameras)
        focal = 0.5 * size / torch.tan(0.5 * cameras.fovy[0])
        grow = margin * focal[:, None] / depth.clamp(min=1e-3)  # [V, N] pixels
        half = max(half, float(((uv - 0.5 * size).abs().amax(-1) + grow).max()))
    c = min(size, 2 * int(np.ceil(half)) + 2)
    return c + (size - c) % 2


@torch.no_grad()
def render_turntables(field, background, renderer, cameras: Cameras, samples: int, importance_samples: int,
                      crop: int | None = None, views_per_call: int = 4) -> np.ndarray:
    """uint8 frames [B, T, H, W, 3] of every prompt of ``field`` along a shared orbit ``cameras``.

    With ``crop`` (see ``crop_size``) only the centred ``crop`` x ``crop`` window is volume
    rendered, through cameras of the same focal length and a narrower field of view (the same rays
    as the window's pixels); the rest of the frame is the backdrop, which is what the renderer
    returns there (no surface within the margin: opacity below ~1% at 6 beta)."""
    b, n, size = field.n_prompts, cameras.shape[1], cameras.height
    crop = size if crop is None else crop
    pad = (size - crop) // 2
    half_angle = torch.atan(torch.tan(0.5 * cameras.fovy) * crop / size)
    frames = np.empty((b, n, size, size, 3), dtype=np.uint8)
    for s in range(0, n, views_per_call):
        sl = slice(s, s + views_per_call)
        full = cameras.map(lambda t: t[:, sl], size, size)
        window = dataclasses.replace(full, fovy=2 * half_angle[:, sl], height=crop, width=crop)
        v = full.shape[1]
        out = renderer(field, window, background=background, **renderer.eval_options(samples, importance_samples))
        if crop < size:
            _, dirs = camera_rays(full)
            backdrop = background(dirs).expand(b, -1, -1, -1).reshape(b, v, size, size, 3).clone()
            backdrop[:, :, pad:pad + crop, pad:pad + crop] = rearrange(out.rgb, "(b v) c h w -> b v h w c", b=b)
            rgb = rearrange(backdrop, "b v h w c -> (b v) c h w")
        else:
            rgb = out.rgb
        frames[:, sl] = to_uint8(rgb).reshape(b, v, size, size, 3)
    return frames


def video_suffix() -> str:
    """'.mp4' where imageio-ffmpeg is installed, else '.gif'."""
    try:
        import imageio_ffmpeg  # noqa: F401, PLC0415 - optional dependency

        return ".mp4"
    except ImportError:
        return ".gif"


def write_video(frames: np.ndarray, path: str | Path) -> Path:
    """Write uint8 frames [T, H, W, 3] to ``path`` (.mp4 or .gif), atomically; loops at 24 fps."""
    p = Path(path)
    try:
        with atomic.writing(p) as tmp:  # the temporary keeps p's suffix: ffmpeg picks the container by it
            if p.suffix == ".mp4":
                import imageio.v2 as iio  # noqa: PLC0415

                # yuv420p + even sizes: what browsers' H.264 decoders accept.
                iio.mimwrite(tmp, list(frames), format="FFMPEG", fps=FPS, codec="libx264", quality=8,
                             pixelformat="yuv420p", macro_block_size=16)
            else:
                from PIL import Image  # noqa: PLC0415

                images = [Image.fromarray(f) for f in frames]
                images[0].save(tmp, save_all=True, append_images=images[1:], duration=round(1000 / FPS), loop=0)
    except OSError as e:
        raise ExportError(f"cannot write '{p}': {e.strerror or e}") from None
    return p
