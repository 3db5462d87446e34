"""Small image helpers shared by validation grids, evaluation and galleries."""
from __future__ import annotations

import numpy as np
import torch
from torch import Tensor


def to_uint8(images: Tensor) -> np.ndarray:
    """[N, 3, H, W] floats in [0, 1] -> [N, H, W, 3] uint8."""
    return (images.detach().clamp(0, 1).permute(0, 2, 3, 1).cpu().numpy() * 255 + 0.5).astype(np.uint8)


def image_grid(rows: list[Tensor], pad: int = 2) -> np.ndarray:
    """Tile rows of images (each [V, 3, H, W]) into one uint8 picture, white padding."""
    arr = [to_uint8(r) for r in rows]
    v, h, w = arr[0].shape[0], arr[0].shape[1], arr[0].shape[2]
    grid = np.full((len(arr) * (h + pad) + pad, v * (w + pad) + pad, 3), 255, dtype=np.uint8)
    for i, row in enumerate(arr):
        for j in range(v):
            y, x = pad + i * (h + pad), pad + j * (w + pad)
            grid[y:y + h, x:x + w] = row[j]
    return grid


def psnr(a: Tensor, b: Tensor) -> Tensor:
    """Per-image PSNR in dB of images in [0, 1]; [N, C, H, W] -> [N]."""
    mse = (a - b).pow(2).flatten(1).mean(1).clamp(min=1e-10)
    return -10.0 * torch.log10(mse)
