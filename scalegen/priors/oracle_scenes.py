"""Ground-truth scenes of the compositional oracle world: where each object goes, and its field.

A fully specified ``SceneSpec`` (data/oracle_grammar.py) becomes one or two ``PlacedObject``s:
  * one object: centred at the origin, radius ``SIZES[size]`` (as in the default world);
  * two objects: each scaled by ``PAIR_SCALE`` so that both fit the scene box, placed by the relation
    in the world frame (z up; the front is +x, where the front camera, azimuth 0, stands; left is -y
    as that camera sees it): ``on top of`` stacks the first object on the second, ``left of`` /
    ``right of`` put them side by side along y, ``in front of`` / ``behind`` along x, bottoms aligned.
Instances (``world.instances`` = K > 1) turn the whole scene by a small yaw and shift it in the
ground plane (instance 0 is the canonical scene), so a fully specified prompt has K modes too.

Colours vary over the surface, in each object's own unit coordinates q (so they turn with it):
  striped: bands along z of width 0.35; checkered: cells of 0.5; two-tone: lower half in the second
  colour (a darker or, for dark colours, lighter shade of the first); a front marker paints the part
  of the surface with q_x > 0.55 x the shape's horizontal radius (the side the front camera sees).
"""
from __future__ import annotations

import math
import random
from dataclasses import dataclass
from typing import Optional

import torch
from torch import Tensor

from scalegen.data.oracle_grammar import SceneSpec
from scalegen.priors.oracle_world import PALETTE, SHAPES, SIZES, sdf_unit_shape
from scalegen.render.base import Field

# (horizontal radius, half height) of each unit shape (oracle_world.sdf_unit_shape)
UNIT_EXTENT = {"sphere": (1.0, 1.0), "cube": (0.75, 0.75), "cylinder": (0.7, 0.85), "cone": (0.9, 0.8),
               "torus": (1.0, 0.32), "capsule": (0.5, 0.95)}
PAIR_SCALE = 0.62  # two-object scenes: large (0.45) becomes 0.28, so two large spheres fit the box
GAP = 0.04
PATTERN_ID = {"plain": 0, "striped": 1, "checkered": 2, "two-tone": 3}
MARKER_FRACTION = 0.55


def shade(rgb: tuple[float, float, float]) -> tuple[float, float, float]:
    """The second colour of a pattern: darker, or lighter for dark colours, so it always contrasts."""
    lum = 0.3 * rgb[0] + 0.59 * rgb[1] + 0.11 * rgb[2]
    return tuple(c * 0.45 if lum > 0.3 else c * 0.45 + 0.55 for c in rgb)  # type: ignore[return-value]


@dataclass(frozen=True)
class PlacedObject:
    shape: str
    radius: float
    centre: tuple[float, float, float]
    yaw: float  # radians about z
    rgb: tuple[float, float, float]
    pattern: str = "plain"
    marker: Optional[tuple[float, float, float]] = None


def instance_jitter(scene_prompt: str, k: int, rotation_deg: float, offset: float, seed: int) -> tuple[float, float, float]:
    """(yaw, dx, dy) of instance ``k`` of a scene; instance 0 is the canonical scene."""
    if k == 0:
        return 0.0, 0.0, 0.0
    rng = random.Random(f"{seed}/{scene_prompt}/{k}")
    return (math.radians(rng.uniform(-rotation_deg, rotation_deg)), rng.uniform(-offset, offset),
            rng.uniform(-offset, offset))


def place(spec: SceneSpec, jitter: tuple[float, float, float] = (0.0, 0.0, 0.0)) -> list[PlacedObject]:
    """The objects of a fully specified scene, placed by its relation, then turned and shifted by ``jitter``."""
    if not spec.specified:
        raise ValueError(f"cannot place the under-specified scene {spec.prompt!r}; place its completions")
    scale = 1.0 if len(spec.objects) == 1 else PAIR_SCALE
    radii = [SIZES[o.size] * scale for o in spec.objects]
    hr = [UNIT_EXTENT[o.shape][0] * r for o, r in zip(spec.objects, radii)]
    hz = [UNIT_EXTENT[o.shape][1] * r for o, r in zip(spec.objects, radii)]
    if spec.relation is None:
        centres = [(0.0, 0.0, 0.0)]
    elif spec.relation == "on top of":
        z_b = -(hz[0] + hz[1]) + hz[1]
        centres = [(0.0, 0.0, z_b + hz[1] + hz[0]), (0.0, 0.0, z_b)]
    else:
        width = 2 * hr[0] + GAP + 2 * hr[1]
        first, second = -width / 2 + hr[0], width / 2 - hr[1]  # first object on the negative side
        floor = -max(hz)
        z = [floor + hz[0], floor + hz[1]]
        axis, sign = {"left of": (1, 1.0), "right of": (1, -1.0), "behind": (0, 1.0), "in front of": (0, -1.0)}[spec.relation]
        centres = []
        for along, zz in ((first, z[0]), (second, z[1])):
            c = [0.0, 0.0, zz]
            c[axis] = sign * along
            centres.append(tuple(c))
    yaw, dx, dy = jitter
    cy, sy = math.cos(yaw), math.sin(yaw)
    out = []
    for o, r, (x, y, z) in zip(spec.objects, radii, centres):
        out.append(PlacedObject(o.shape, r, (cy * x - sy * y + dx, sy * x + cy * y + dy, z), yaw, PALETTE[o.colour],
                                o.pattern, PALETTE[o.front] if o.front else None))
    return out


class SceneField(Field):
    """Exact fields of B placed scenes (one or two objects each): the SDF is the minimum of the objects'
    SDFs, the colour that of the nearest object, patterned and marked in its own unit coordinates."""

    def __init__(self, scenes: list[list[PlacedObject]]):
        b, s = len(scenes), max(len(sc) for sc in scenes)
        self.n_prompts, self.slots = b, s
        self.present = torch.zeros(b, s, dtype=torch.bool)
        self.shape = torch.zeros(b, s, dtype=torch.long)
        self.radius = torch.ones(b, s)
        self.centre = torch.zeros(b, s, 3)
        self.cos, self.sin = torch.ones(b, s), torch.zeros(b, s)
        self.rgb, self.second, self.marker = torch.zeros(b, s, 3), torch.zeros(b, s, 3), torch.zeros(b, s, 3)
        self.pattern = torch.zeros(b, s, dtype=torch.long)
        self.has_marker = torch.zeros(b, s, dtype=torch.bool)
        self.marker_x = torch.zeros(b, s)
        for i, sc in enumerate(scenes):
            for j, o in enumerate(sc):
                self.present[i, j] = True
                self.shape[i, j] = SHAPES.index(o.shape)
                self.radius[i, j] = o.radius
                self.centre[i, j] = torch.tensor(o.centre)
                self.cos[i, j], self.sin[i, j] = math.cos(o.yaw), math.sin(o.yaw)
                self.rgb[i, j] = torch.tensor(o.rgb)
                self.second[i, j] = torch.tensor(shade(o.rgb))
                self.pattern[i, j] = PATTERN_ID[o.pattern]
                if o.marker is not None:
                    self.has_marker[i, j] = True
                    self.marker[i, j] = torch.tensor(o.marker)
                self.marker_x[i, j] = MARKER_FRACTION * UNIT_EXTENT[o.shape][0]
        same = (self.rgb == self.rgb[:, :1]).all(-1) | ~self.present
        self._flat = bool(((self.pattern == 0) | ~self.present).all() and not self.has_marker.any() and same.all())

    def _local(self, points: Tensor, j: int) -> Tensor:
        """Unit coordinates q [B, N, 3] of object slot ``j``: q = R_z(-yaw) (p - c) / r as one batched
        affine map, q = p M + b with M = R_z(-yaw)^T / r and b = -c M."""
        c, s, r = self.cos[:, j], self.sin[:, j], self.radius[:, j]
        m = torch.zeros(self.n_prompts, 3, 3)
        m[:, 0, 0], m[:, 1, 0], m[:, 0, 1], m[:, 1, 1], m[:, 2, 2] = c, s, -s, c, torch.ones_like(c)
        m = (m / r[:, None, None]).to(points)
        b = -torch.bmm(self.centre[:, j, None, :].to(points), m)
        return torch.baddbmm(b, points, m)

    def _slot_sdf(self, q: Tensor, j: int) -> Tensor:
        kinds = self.shape[:, j][self.present[:, j]].unique().tolist()
        if len(kinds) == 1 and bool(self.present[:, j].all()):  # one shape in this slot: no gather/scatter
            return self.radius[:, j, None].to(q) * sdf_unit_shape(SHAPES[kinds[0]], q)
        out = q.new_full(q.shape[:2], 1e3)
        for k in kinds:
            rows = (self.shape[:, j] == k) & self.present[:, j]
            out[rows] = self.radius[rows, j, None].to(q) * sdf_unit_shape(SHAPES[k], q[rows])
        return out

    def _slot_rgb(self, q: Tensor, j: int) -> Tensor:
        base = self.rgb[:, j, None, :].to(q)
        rgb = base.expand(*q.shape[:2], 3)
        pat = self.pattern[:, j]
        if bool((pat > 0).any()):
            p = pat[:, None].to(q.device)
            use_second = torch.zeros(q.shape[:2], dtype=torch.bool, device=q.device)
            if bool((pat == 1).any()):
                use_second |= (p == 1) & (torch.floor(q[..., 2] / 0.35).remainder(2) == 1)
            if bool((pat == 2).any()):
                use_second |= (p == 2) & (torch.floor(q / 0.5).sum(-1).remainder(2) == 1)
            if bool((pat == 3).any()):
                use_second |= (p == 3) & (q[..., 2] < 0)
            rgb = torch.where(use_second[..., None], self.second[:, j, None, :].to(q), rgb)
        if bool(self.has_marker[:, j].any()):
            marked = self.has_marker[:, j, None].to(q.device) & (q[..., 0] > self.marker_x[:, j, None].to(q))
            rgb = torch.where(marked[..., None], self.marker[:, j, None, :].to(q), rgb)
        return rgb

    def _points(self, points: Tensor) -> Tensor:
        return points.expand(self.n_prompts, -1, -1) if points.shape[0] == 1 else points

    def sdf(self, points: Tensor) -> Tensor:
        points = self._points(points)
        out = self._slot_sdf(self._local(points, 0), 0)
        for j in range(1, self.slots):
            out = torch.minimum(out, self._slot_sdf(self._local(points, j), j))
        return out

    def query(self, points: Tensor) -> tuple[Tensor, Tensor]:
        points = self._points(points)
        q = self._local(points, 0)
        sdf, rgb = self._slot_sdf(q, 0), self._slot_rgb(q, 0)
        for j in range(1, self.slots):  # the nearest object's colour
            q = self._local(points, j)
            d = self._slot_sdf(q, j)
            nearer = d < sdf
            sdf = torch.where(nearer, d, sdf)
            rgb = torch.where(nearer[..., None], self._slot_rgb(q, j), rgb)
        return sdf, rgb

    def constant_rgb(self) -> Optional[Tensor]:
        """One colour per scene when no object is patterned or marked and both objects share it."""
        return self.rgb[:, 0] if self._flat else None
