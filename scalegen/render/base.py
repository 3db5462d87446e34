"""What a renderer draws and what it returns: the ``Field`` interface every generator's output (and
the oracle's ground truth) implements, the ``Renderer`` interface, and ``RenderOutput``.

The field interface lives here, below the generators, because the renderer is its consumer.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

from torch import Tensor, nn

Background = Callable[[Tensor], Tensor]  # dirs [P, V, R, 3] -> rgb [B or 1, V, R, 3]


class Field:
    """The 3D fields of ``n_prompts`` prompts. Points are ``[P, N, 3]`` with P == n_prompts or P == 1
    (shared points, broadcast to every prompt). A prompt's values depend only on its own prompt."""

    n_prompts: int

    def query(self, points: Tensor) -> tuple[Tensor, Tensor]:
        """``sdf`` [B, N] and ``rgb`` [B, N, 3] in [0, 1] at ``points``."""
        raise NotImplementedError

    def sdf(self, points: Tensor) -> Tensor:
        """Signed distance [B, N] alone (override when it is cheaper than ``query``)."""
        return self.query(points)[0]

    def constant_rgb(self) -> Optional[Tensor]:
        """[B, 3] when every prompt's colour is one constant (ground truth), so a renderer can skip
        per-sample colours; None (the default) otherwise."""
        return None

    def select(self, prompts: list[int]) -> "Field":
        """The fields of ``prompts`` (indices, in that order) alone, so per-prompt point sets of
        different sizes need not be padded to the largest (mesh export). The default evaluates every
        prompt and keeps those rows; generators' fields override it to compute only those prompts."""
        return SelectedRows(self, prompts)


class SelectedRows(Field):
    """``Field.select``'s default: the chosen rows of a whole batch's values."""

    def __init__(self, whole: Field, prompts: list[int]):
        self.whole, self.prompts, self.n_prompts = whole, list(prompts), len(prompts)

    def _points(self, points: Tensor) -> Tensor:
        if points.shape[0] == 1:
            return points
        full = points.new_zeros(self.whole.n_prompts, *points.shape[1:])
        full[self.prompts] = points
        return full

    def query(self, points: Tensor) -> tuple[Tensor, Tensor]:
        sdf, rgb = self.whole.query(self._points(points))
        return sdf[self.prompts], rgb[self.prompts]

    def sdf(self, points: Tensor) -> Tensor:
        return self.whole.sdf(self._points(points))[self.prompts]


@dataclass
class RenderOutput:
    rgb: Tensor  # [B*V, 3, H, W] in [0, 1]
    opacity: Tensor  # [B*V, 1, H, W]
    depth: Tensor  # [B*V, 1, H, W] expected termination distance along the ray, given a hit
    normals: Optional[Tensor]  # [B*V, 3, H, W] world-space, opacity-weighted (with_normals)
    eikonal: Optional[Tensor]  # scalar mean (|grad d| - 1)^2 over sampled points (with_eikonal)
    n_prompts: int
    n_views: int


class Renderer(nn.Module):
    """Fields + cameras -> images, prompt-major: image ``b * V + v`` is prompt b seen from view v.

    ``forward(field, cameras [P, V] (P == 1: shared), background=None, *, with_normals=False,
    with_eikonal=False, ...) -> RenderOutput``."""

    def forward(self, field: Field, cameras, background: Optional[Background] = None, *,
                with_normals: bool = False, with_eikonal: bool = False, **options) -> RenderOutput:
        raise NotImplementedError
