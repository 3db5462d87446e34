"""What a renderer draws and what it returns: the ``Field`` interface every generator's output (and
the oracle's ground truth) implements, the ``Renderer`` interface, and ``RenderOutput``.

The field interface lives here, below the generators, because the renderer is its consumer.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

from torch import Tensor, nn

from scalegen.data.cameras import Cameras
from scalegen.text.base import TextCond

BackgroundFn = Callable[[Tensor], Tensor]  # dirs [P, V, R, 3] -> rgb [B or 1, V, R, 3]


class Background(nn.Module):
    """What a ray sees when it leaves the scene box: a (trainable) module that ``bind(cond)`` turns into
    the ``BackgroundFn`` of a batch of prompts, which the renderer calls with its ray directions."""

    def bind(self, cond: TextCond) -> BackgroundFn:
        """The backdrop of ``cond``'s prompts: dirs [P, V, R, 3] -> rgb [B, V, R, 3]."""
        raise NotImplementedError


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

    def distinct_geometry(self) -> Optional[tuple["Field", Tensor]]:
        """(a field of the distinct signed distance functions among the rows, each row's index into it
        [B]) when several rows share one SDF and differ only in a constant colour (ground truth of
        scenes that differ in colour alone), so their geometry is rendered once; None (the default)
        otherwise."""
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
    with_eikonal=False) -> RenderOutput``. A renderer adds its own keyword options to ``forward``
    explicitly (VolSDF: ``samples``, ``importance_samples``, ``perturb``, ``composite``); an option it
    does not declare is a ``TypeError`` naming the renderer, never silently ignored. Callers that do not
    know which renderer they hold ask ``eval_options`` for its options instead of passing them blind."""

    def forward(self, field: Field, cameras: Cameras, background: Optional[BackgroundFn] = None, *,
                with_normals: bool = False, with_eikonal: bool = False) -> RenderOutput:
        raise NotImplementedError

    def eval_options(self, samples: Optional[int] = None, importance_samples: Optional[int] = None) -> dict:
        """The ``forward`` options of a deterministic evaluation render with ``samples`` /
        ``importance_samples`` ray samples where the renderer samples rays (None: its own counts).
        The default: none (a renderer without such options, e.g. the Gaussian rasterizer)."""
        return {}
