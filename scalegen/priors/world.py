"""The oracle worlds' interface (``World``) and what an oracle offers the rest of the code as ground
truth (``GroundTruth``).

Two worlds implement ``World``: the default single-object world (``oracle_world.OracleWorld``,
``a <size> <color> <shape>``) and the compositional one (``oracle_compose.CompositionalWorld``).
The oracle prior builds its mixtures from a world's *components* (one ground-truth scene each);
evaluation, refinement and the training loop's validation grid draw ground truth through
``GroundTruth``, which they get from ``Prior.ground_truth()`` (or ``priors.build_ground_truth(cfg)``
when no prior is built): None for a real prior, so nobody asks which prior it is.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

import torch
from torch import Tensor

from einops import rearrange

from scalegen.data.cameras import Cameras, camera_rays
from scalegen.render.base import Field, Renderer, RenderOutput

RGB = tuple[float, float, float]


class World:
    """A prompt grammar with exact ground truth. ``seen`` / ``unseen``: training and held-out prompts;
    ``prompts``: every prompt that has an id so far, by id; ``n_components``: how many components
    there are (None: unbounded, created as prompts are indexed)."""

    seen: list[str]
    unseen: list[str]
    prompts: list[str]
    n_components: Optional[int]

    def splits(self) -> dict[str, list[str]]:
        """Prompt lists by split name, "seen" first (evaluation reports one row per split)."""
        raise NotImplementedError

    def parse(self, prompt: str) -> Any:
        """The prompt's meaning (a world's own scene spec); a ``DataError`` for a prompt outside the world."""
        raise NotImplementedError

    def index(self, prompt: str) -> int:
        """The prompt's id (wording-insensitive); a ``DataError`` outside the world."""
        raise NotImplementedError

    def completions(self, prompt_ids: list[int]) -> list[list[int]]:
        """Each prompt's mixture components: every fully specified scene it stands for (x instances)."""
        raise NotImplementedError

    def component_field(self, ids: list[int]) -> Field:
        """Ground-truth fields of components ``ids``, one prompt row each."""
        raise NotImplementedError

    def uncond_set(self, own: Tensor, n_uncond: int) -> Tensor:
        """Components of the unconditional mixture: the rows' own ``own`` plus others up to ``n_uncond``."""
        raise NotImplementedError

    def background(self, dirs: Tensor) -> Tensor:
        """The backdrop every scene is rendered on: dirs [P, V, R, 3] -> rgb [P, V, R, 3]."""
        raise NotImplementedError

    # --- optional ------------------------------------------------------------------------------------
    def marker_of(self, prompt: str) -> Optional[tuple[RGB, RGB]]:
        """(marker rgb, body rgb) of a single object with a front marker, for the multi-face measure;
        None (the default) when the prompt's object has none."""
        return None


@dataclass
class GroundTruth:
    """What an oracle prior offers evaluation, refinement and validation: its world and the renderer
    that draws the world's scenes (the prior's own, so metrics compare against what the prior saw)."""

    world: World
    renderer: Renderer

    @torch.no_grad()
    def draw(self, ids: list[int], cameras: Cameras) -> RenderOutput:
        """Renders of components ``ids`` at shared cameras [1, U] or at their own [len(ids), U]
        (deterministic sample placement). At shared cameras, scenes that differ only in their constant
        colour (``Field.distinct_geometry``) share one render of their geometry: each component's image is
        then composed as the renderer composes a constant-colour field, ``opacity * colour + (1 - opacity)
        * background``, the same pixels to the last bit."""
        field = self.world.component_field(ids)
        flat = field.constant_rgb() if cameras.shared else None
        shared = field.distinct_geometry() if flat is not None else None
        if shared is None:
            return self.renderer(field, cameras.expand(len(ids)), background=self.world.background,
                                 **self.renderer.eval_options())
        geometry, row = shared
        g, v = geometry.n_prompts, cameras.shape[1]
        out = self.renderer(geometry, cameras.expand(g), **self.renderer.eval_options())
        k, h, w = len(ids), cameras.height, cameras.width
        opacity = out.opacity.view(g, v, 1, h, w)[row]  # [K, V, 1, H, W]
        depth = out.depth.view(g, v, 1, h, w)[row]
        _, dirs = camera_rays(cameras.expand(k))
        bg = rearrange(self.world.background(dirs), "k v (h w) c -> k v c h w", h=h, w=w)
        rgb = opacity * flat.to(opacity)[:, None, :, None, None] + (1.0 - opacity) * bg
        return RenderOutput(rgb=rgb.flatten(0, 1), opacity=opacity.flatten(0, 1), depth=depth.flatten(0, 1),
                            normals=None, eikonal=None, n_prompts=k, n_views=v)

    @torch.no_grad()
    def render_components(self, ids: list[int], cameras: Cameras, chunk: int = 64) -> Tensor:
        """rgb [len(ids), U, 3, H, W] of components at shared cameras [1, U], ``chunk`` at a time; each
        component on its own cameras (its own sample placement), so a render never depends on the batch."""
        outs = []
        for i in range(0, len(ids), chunk):
            part = ids[i:i + chunk]
            outs.append(self.draw(part, cameras).rgb.view(len(part), cameras.shape[1], 3, cameras.height,
                                                          cameras.width))
        return outs[0] if len(outs) == 1 else torch.cat(outs)

    @torch.no_grad()
    def draw_mixture(self, prompt_ids: list[int], cameras: Cameras, gen: torch.Generator,
                     chunk: int = 8) -> tuple[Tensor, Tensor, Tensor]:
        """Samples of each prompt's conditional: view v of prompt p (cameras [P, V], or shared [1, V]) renders
        one component drawn uniformly (``gen``) from p's completions x instances, so the renders of a prompt
        are draws from the equal-weight mixture over its components that the oracle's conditional is. Returns
        rgb [P, V, 3, H, W], opacity [P, V, 1, H, W], component ids [P, V]. A prompt with one component draws
        nothing from ``gen`` and renders its views together."""
        cameras = cameras.expand(len(prompt_ids))
        comps = self.world.completions(prompt_ids)
        p, v = cameras.shape
        pick = [torch.randint(len(c), (v,), generator=gen).tolist() if len(c) > 1 else [0] * v for c in comps]
        component = torch.tensor([[c[k] for k in ks] for c, ks in zip(comps, pick)], dtype=torch.long).view(p, v)
        rgb, op = [], []
        for i in range(0, p, chunk):
            sl = slice(i, i + chunk)
            sub = cameras.map(lambda t: t[sl])
            ids = component[sl]
            if all(len(c) == 1 for c in comps[sl]):  # one component per prompt: its views in one draw
                out = self.draw(ids[:, 0].tolist(), sub)
            else:  # one row per view: each view its own component
                out = self.draw(ids.flatten().tolist(), sub.map(lambda t: t.reshape(-1, 1, *t.shape[2:])))
            k = ids.shape[0]
            rgb.append(out.rgb.reshape(k, v, 3, cameras.height, cameras.width))
            op.append(out.opacity.reshape(k, v, 1, cameras.height, cameras.width))
        return torch.cat(rgb), torch.cat(op), component

    def render(self, prompts: list[str], cameras: Cameras) -> Tensor:
        """Ground truth of world prompts at shared cameras [1, U] -> rgb [K, U, 3, H, W]: each prompt's
        first completion (the prompt itself in the default world)."""
        ids = [self.world.index(p) for p in prompts]
        return self.render_components([c[0] for c in self.world.completions(ids)], cameras)
