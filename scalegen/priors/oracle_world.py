"""The oracle world: a procedural prompt grammar with a ground-truth SDF scene per prompt.

Prompts read ``a <size> <color> <shape>``. Each prompt's scene is one analytic solid of uniform
colour centred at the origin (z-up). Some attribute *combinations* are held out of training
(``unseen``) while every single attribute stays seen, which measures amortization: does the
generator produce a correct asset for a prompt it never trained on?
"""
from __future__ import annotations

import itertools
import random
from dataclasses import dataclass

import torch
from torch import Tensor

from scalegen.errors import DataError
from scalegen.priors.world import World
from scalegen.render.base import Field
from scalegen.text.bow import tokenize

PALETTE: dict[str, tuple[float, float, float]] = {
    "red": (0.85, 0.18, 0.15), "green": (0.20, 0.65, 0.25), "blue": (0.18, 0.30, 0.85),
    "yellow": (0.92, 0.80, 0.20), "purple": (0.55, 0.25, 0.75), "orange": (0.95, 0.50, 0.12),
    "white": (0.95, 0.95, 0.95), "black": (0.10, 0.10, 0.10), "pink": (0.95, 0.55, 0.70),
    "cyan": (0.20, 0.80, 0.85), "brown": (0.50, 0.32, 0.18), "gray": (0.50, 0.50, 0.50),
}
SIZES: dict[str, float] = {"tiny": 0.22, "small": 0.30, "medium": 0.38, "large": 0.45}


def _length2(a: Tensor, b: Tensor) -> Tensor:
    return torch.sqrt(a * a + b * b)


def sdf_unit_shape(shape: str, p: Tensor) -> Tensor:
    """SDF of the unit-scale solid ``shape`` at points ``p`` [..., 3] (z is up)."""
    x, y, z = p.unbind(-1)
    if shape == "sphere":
        return p.norm(dim=-1) - 1.0
    if shape == "cube":  # rounded box, half-extent 0.75
        rad = 0.06
        q = p.abs() - (0.75 - rad)
        return q.clamp(min=0).norm(dim=-1) + q.amax(-1).clamp(max=0) - rad
    if shape == "cylinder":  # axis z, radius 0.7, half-height 0.85
        dx, dz = _length2(x, y) - 0.7, z.abs() - 0.85
        return torch.maximum(dx, dz).clamp(max=0) + _length2(dx.clamp(min=0), dz.clamp(min=0))
    if shape == "cone":  # base radius 0.9 at z=-0.8, tip at z=+0.8 (capped cone with r_top = 0)
        h, r1, r2 = 0.8, 0.9, 0.0
        qx, qy = _length2(x, y), z
        k1x, k1y, k2x, k2y = r2, h, r2 - r1, 2 * h
        ca_x = qx - torch.minimum(qx, torch.where(qy < 0, torch.full_like(qy, r1), torch.full_like(qy, r2)))
        ca_y = qy.abs() - h
        f = (((k1x - qx) * k2x + (k1y - qy) * k2y) / (k2x * k2x + k2y * k2y)).clamp(0, 1)
        cb_x, cb_y = qx - k1x + k2x * f, qy - k1y + k2y * f
        s = torch.where((cb_x < 0) & (ca_y < 0), -1.0, 1.0)
        return s * torch.sqrt(torch.minimum(ca_x * ca_x + ca_y * ca_y, cb_x * cb_x + cb_y * cb_y))
    if shape == "torus":  # in the xy plane, major radius 0.68, minor 0.32
        return _length2(_length2(x, y) - 0.68, z) - 0.32
    if shape == "capsule":  # axis z, radius 0.5, segment half-length 0.45
        zc = z.clamp(-0.45, 0.45)
        return torch.sqrt(x * x + y * y + (z - zc) ** 2) - 0.5
    raise DataError(f"unknown shape {shape!r}; known shapes: sphere, cube, cylinder, cone, torus, capsule")


SHAPES = ("sphere", "cube", "cylinder", "cone", "torus", "capsule")


@dataclass(frozen=True)
class Scene:
    size: str
    color: str
    shape: str

    @property
    def prompt(self) -> str:
        return f"a {self.size} {self.color} {self.shape}"


class AnalyticField(Field):
    """Ground-truth fields of K scenes: exact SDF, one constant colour per scene."""

    def __init__(self, scenes: list[Scene]):
        self.scenes = scenes
        self.n_prompts = len(scenes)
        self._rgb = torch.tensor([PALETTE[s.color] for s in scenes])
        # Scenes sharing (shape, size) share one SDF evaluation.
        self._groups: dict[tuple[str, str], list[int]] = {}
        for i, s in enumerate(scenes):
            self._groups.setdefault((s.shape, s.size), []).append(i)

    def sdf(self, points: Tensor) -> Tensor:
        p, n, _ = points.shape
        out = points.new_empty(self.n_prompts, n)
        for (shape, size), ids in self._groups.items():
            r = SIZES[size]
            idx = torch.tensor(ids)
            pts = points if p == 1 else points[idx]
            out[idx] = (r * sdf_unit_shape(shape, pts / r)).expand(len(ids), n)
        return out

    def query(self, points: Tensor) -> tuple[Tensor, Tensor]:
        sdf = self.sdf(points)
        rgb = self._rgb.to(points)[:, None, :].expand(-1, points.shape[1], -1)
        return sdf, rgb

    def constant_rgb(self) -> Tensor:
        return self._rgb

    def distinct_geometry(self) -> tuple["AnalyticField", Tensor] | None:
        """One scene per (shape, size) group, and each row's group: colour is the only difference."""
        if len(self._groups) == self.n_prompts:
            return None
        first = [ids[0] for ids in self._groups.values()]
        row = torch.empty(self.n_prompts, dtype=torch.long)
        for g, ids in enumerate(self._groups.values()):
            row[ids] = g
        return AnalyticField([self.scenes[i] for i in first]), row


def background_rgb(dirs: Tensor) -> Tensor:
    """The world's backdrop: a neutral vertical gradient, darker below the horizon."""
    g = 0.80 + 0.12 * dirs[..., 2:3]
    return g.expand(*dirs.shape[:-1], 3)


class OracleWorld(World):
    def __init__(self, colors: list[str], shapes: list[str], sizes: list[str], n_unseen: int = 0, seed: int = 0):
        for c in colors:
            if c not in PALETTE:
                raise DataError(f"world.colors: unknown colour {c!r}; choose from {', '.join(PALETTE)}")
        for s in shapes:
            if s not in SHAPES:
                raise DataError(f"world.shapes: unknown shape {s!r}; choose from {', '.join(SHAPES)}")
        for s in sizes:
            if s not in SIZES:
                raise DataError(f"world.sizes: unknown size {s!r}; choose from {', '.join(SIZES)}")
        self.colors, self.shapes, self.sizes = list(colors), list(shapes), list(sizes)
        self.scenes = [Scene(sz, c, sh) for sz, c, sh in itertools.product(sizes, colors, shapes)]
        self.prompts = [s.prompt for s in self.scenes]
        self._index = {p: i for i, p in enumerate(self.prompts)}
        unseen = self._split(n_unseen, seed)
        self.unseen = [p for p in self.prompts if p in unseen]
        self.seen = [p for p in self.prompts if p not in unseen]

    def _split(self, n_unseen: int, seed: int) -> set[str]:
        """Hold out ``n_unseen`` combinations, keeping at least half the occurrences of every
        attribute value (so every word is trained on) and never holding out two prompts that
        differ only in size (so each unseen (color, shape) pair appears in some size)."""
        order = list(self.scenes)
        random.Random(seed).shuffle(order)
        count = {("size", s): 0 for s in self.sizes} | {("color", c): 0 for c in self.colors} | \
            {("shape", s): 0 for s in self.shapes}
        total = {("size", s): len(self.colors) * len(self.shapes) for s in self.sizes} | \
            {("color", c): len(self.sizes) * len(self.shapes) for c in self.colors} | \
            {("shape", s): len(self.sizes) * len(self.colors) for s in self.shapes}
        held: set[str] = set()
        pairs: set[tuple[str, str]] = set()
        for sc in order:
            if len(held) >= n_unseen:
                break
            keys = [("size", sc.size), ("color", sc.color), ("shape", sc.shape)]
            if any(count[k] + 1 > total[k] // 2 for k in keys):
                continue
            if len(self.sizes) > 1 and (sc.color, sc.shape) in pairs:
                continue
            held.add(sc.prompt)
            pairs.add((sc.color, sc.shape))
            for k in keys:
                count[k] += 1
        if len(held) < n_unseen:
            raise DataError(f"world.n_unseen={n_unseen} is too many for this grammar (at most {len(held)} keep "
                            "every attribute trained); lower it")
        return held

    def index(self, prompt: str) -> int:
        """World index of ``prompt`` (wording-insensitive: 'A red Cube, large' works)."""
        i = self._index.get(prompt)
        if i is not None:
            return i
        return self._index[self.parse(prompt).prompt]

    def parse(self, prompt: str) -> Scene:
        words = set(tokenize(prompt))
        def pick(options: list[str], what: str) -> str:
            found = [o for o in options if o in words]
            if len(found) != 1:
                if not found and what == "size" and len(options) == 1:
                    return options[0]
                raise DataError(f"prompt {prompt!r} is not in the oracle world (prompts 'a <size> <color> <shape>'): it "
                                f"needs exactly one {what} of {', '.join(options)}; free-text prompts need a real prior "
                                "(prior.name=stable_diffusion), prompts of `data compose --world oracle` the "
                                "compositional world (--config configs/oracle/world_compose.yaml)")
            return found[0]
        return Scene(pick(self.sizes, "size"), pick(self.colors, "color"), pick(self.shapes, "shape"))

    def field(self, prompts: list[str]) -> AnalyticField:
        return AnalyticField([self.scenes[self.index(p)] for p in prompts])

    # --- the ``World`` interface (no object of this world has a front marker: ``marker_of`` is None) --
    # A *component* is one ground-truth scene of the prior's mixtures. Here every prompt is exactly
    # one component with the prompt's own id; the compositional world has completions and instances.
    @property
    def n_components(self) -> int:
        return len(self.prompts)

    def splits(self) -> dict[str, list[str]]:
        return {"seen": self.seen, "unseen": self.unseen}

    def completions(self, prompt_ids: list[int]) -> list[list[int]]:
        return [[i] for i in prompt_ids]

    def component_field(self, ids: list[int]) -> AnalyticField:
        return AnalyticField([self.scenes[i] for i in ids])

    def uncond_set(self, own: Tensor, n_uncond: int) -> Tensor:
        """Prompts of the unconditional mixture: every row's own prompt, topped up with random
        others to ``n_uncond`` (all prompts when the world is small enough)."""
        n_world = len(self.prompts)
        own_u = torch.unique(own)
        if n_uncond >= n_world:
            return torch.arange(n_world)
        rest = torch.ones(n_world, dtype=torch.bool)
        rest[own_u] = False
        others = torch.nonzero(rest).squeeze(1)
        n_more = max(n_uncond - len(own_u), 0)
        pick = others[torch.randperm(len(others))[:n_more]]
        return torch.cat([own_u, pick])

    def colour(self, prompt: str) -> tuple[float, float, float]:
        return PALETTE[self.parse(prompt).color]

    @staticmethod
    def background(dirs: Tensor) -> Tensor:
        """The ``BackgroundFn`` of every scene: dirs [P, V, R, 3] -> rgb [P, V, R, 3]."""
        return background_rgb(dirs)


def build_world(cfg) -> World:
    """The oracle world of ``cfg.world``: the default single-object world (``kind: single``), or the
    compositional world of priors/oracle_compose.py (``kind: compositional``)."""
    w = cfg.world
    if w.kind == "compositional":
        from scalegen.priors.oracle_compose import build_compositional_world  # noqa: PLC0415 - imports this module

        world = build_compositional_world(w)
        longest = world.grammar.max_tokens()
        if cfg.text.encoder == "bow" and longest > cfg.text.max_tokens:
            raise DataError(f"the world's longest prompts have {longest} words and text.max_tokens is "
                            f"{cfg.text.max_tokens}: the encoder would cut them; set text.max_tokens={longest}")
        return world
    return OracleWorld(w.colors, w.shapes, w.sizes, n_unseen=w.n_unseen, seed=w.seed)
