"""The compositional oracle world (``world.kind: compositional``): the grammar of
data/oracle_grammar.py (two-object scenes with spatial relations, surface patterns, objects with a
front, under-specified prompts) with exact ground truth (oracle_scenes.py).

The prior's mixtures are built from *components*: one fully specified scene (a completion of a
prompt) in one of its K instances. ``completions(prompt ids)`` gives each prompt's components, all of
them (the conditional is exact); ``uncond_set`` gives the unconditional mixture's components: every
row's own components plus random fully specified scenes of the whole grammar (any split; a random
instance each) up to ``n_uncond`` (subsampled, as the default world does beyond its size). Prompts
and components get ids as they are first used, so a 100k-prompt corpus costs nothing up front.

The world's own prompt lists (``data.prompts=oracle`` and evaluation): ``seen`` = ``world.n_prompts``
training prompts, and ``world.n_eval`` prompts of each held-out level (``unseen_levels``); all of them
when a split has fewer.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from scalegen.data.oracle_grammar import LEVELS, Grammar, ObjectSpec, SceneSpec
from scalegen.errors import DataError
from scalegen.priors.oracle_scenes import PlacedObject, SceneField, instance_jitter, place
from scalegen.priors.oracle_world import PALETTE, SHAPES, SIZES, background_rgb
from scalegen.priors.world import World


class CompositionalWorld(World):
    def __init__(self, grammar: Grammar, n_prompts: int = 2000, n_eval: int = 32, instances: int = 1,
                 instance_rotation: float = 15.0, instance_offset: float = 0.04, seed: int = 0):
        for c in grammar.colours + grammar.fronts:
            if c not in PALETTE:
                raise DataError(f"world: unknown colour {c!r}; choose from {', '.join(PALETTE)}")
        for s in grammar.shapes:
            if s not in SHAPES:
                raise DataError(f"world.shapes: unknown shape {s!r}; choose from {', '.join(SHAPES)}")
        for s in grammar.sizes:
            if s not in SIZES:
                raise DataError(f"world.sizes: unknown size {s!r}; choose from {', '.join(SIZES)}")
        self.grammar, self.instances, self.seed = grammar, instances, seed
        self.jitter = (instance_rotation, instance_offset)
        self.seen = grammar.sample("train", n_prompts, seed, exact=False)
        held = {"unseen_attribute": grammar.held_attribute, "unseen_object_pair": grammar.held_object_pair,
                "unseen_relation": grammar.held_relation}
        self.unseen_levels = {lvl: grammar.sample(lvl, n_eval, seed, exact=False) for lvl in LEVELS if held[lvl] and n_eval > 0}
        self.unseen = [p for ps in self.unseen_levels.values() for p in ps]
        self.prompts: list[str] = []  # registered prompts, by id
        self._prompt_id: dict[str, int] = {}
        self._completions: list[list[int]] = []
        self._component_id: dict[tuple[str, int], int] = {}
        self._components: list[tuple[SceneSpec, int]] = []  # (completion, instance); placed when rendered
        self.n_components: Optional[int] = None  # unbounded: the prior caches renders lazily
        self._n_one: Optional[int] = None

    # --- prompts ----------------------------------------------------------------------------------
    def splits(self) -> dict[str, list[str]]:
        return {"seen": self.seen, **self.unseen_levels}

    def parse(self, prompt: str) -> SceneSpec:
        return self.grammar.parse(prompt)

    def index(self, prompt: str) -> int:
        i = self._prompt_id.get(prompt)
        if i is not None:
            return i
        spec = self.grammar.parse(prompt)
        i = self._prompt_id.get(spec.prompt)
        if i is None:
            i = len(self.prompts)
            self.prompts.append(spec.prompt)
            self._prompt_id[spec.prompt] = i
            self._completions.append([self._component(c, k) for c in self.grammar.completions(spec)
                                      for k in range(self.instances)])
        self._prompt_id[prompt] = i
        return i

    def _component(self, spec: SceneSpec, k: int) -> int:
        key = (spec.prompt, k)
        c = self._component_id.get(key)
        if c is None:
            c = len(self._components)
            self._component_id[key] = c
            self._components.append((spec, k))
        return c

    # --- components -------------------------------------------------------------------------------
    @property
    def n_registered(self) -> int:
        """Components given an id so far (what the registry holds in memory)."""
        return len(self._components)

    def completions(self, prompt_ids: list[int]) -> list[list[int]]:
        return [self._completions[i] for i in prompt_ids]

    def component_field(self, ids: list[int]) -> SceneField:
        return SceneField([self.placed(i) for i in ids])

    def placed(self, i: int) -> list[PlacedObject]:
        spec, k = self._components[i]
        return place(spec, instance_jitter(spec.prompt, k, *self.jitter, self.seed))

    def component_spec(self, i: int) -> SceneSpec:
        return self._components[i][0]

    def random_scene(self, gen: Optional[torch.Generator] = None) -> SceneSpec:
        """A fully specified scene, drawn slot by slot (torch RNG): one object or two in proportion to how
        many prompts of each kind the grammar has, then each word uniformly (a front differs from its body)."""
        g = self.grammar
        if self._n_one is None:
            self._n_one = sum(1 for o in g.phrases if o.specified)
        n_one = self._n_one

        def pick(xs: list, forbid=None):
            xs = [x for x in xs if x != forbid] if forbid is not None else xs
            return xs[int(torch.randint(len(xs), (1,), generator=gen))]

        def obj() -> ObjectSpec:
            front = pick([None] + g.fronts)
            return ObjectSpec(pick(g.sizes), pick(g.colours, forbid=front), pick(g.shapes), pick(g.patterns), front)

        two = bool(g.relations) and float(torch.rand((), generator=gen)) > 1.0 / (1 + len(g.relations) * n_one)
        return SceneSpec((obj(), obj()), pick(g.relations)) if two else SceneSpec((obj(),))

    def uncond_set(self, own: Tensor, n_uncond: int) -> Tensor:
        """Components of the unconditional mixture: the rows' own, topped up with random scenes of the
        grammar (random instances) to ``n_uncond``."""
        own_u = torch.unique(own)
        extra = []
        for _ in range(max(n_uncond - len(own_u), 0)):
            k = int(torch.randint(self.instances, (1,)))
            extra.append(self._component(self.random_scene(), k))
        return torch.cat([own_u, torch.tensor(extra, dtype=torch.long)]) if extra else own_u

    # --- what metrics need ------------------------------------------------------------------------
    def marker_of(self, prompt: str) -> Optional[tuple[tuple[float, float, float], tuple[float, float, float]]]:
        """(marker rgb, body rgb) of a single-object prompt with a front and a named colour, else None."""
        spec = self.grammar.parse(prompt)
        o = spec.objects[0]
        if len(spec.objects) != 1 or o.front is None or o.colour is None:
            return None
        return PALETTE[o.front], PALETTE[o.colour]

    @staticmethod
    def background(dirs: Tensor) -> Tensor:
        return background_rgb(dirs)


def build_compositional_world(w) -> CompositionalWorld:
    """The world of a ``WorldConfig`` with ``kind: compositional``."""
    grammar = Grammar(w.sizes, w.colors, w.shapes, w.patterns, w.relations, w.fronts, w.underspecified,
                      w.unseen_attribute_pairs, w.unseen_object_pairs, w.unseen_relation_uses, w.max_completions,
                      seed=w.seed)
    return CompositionalWorld(grammar, w.n_prompts, w.n_eval, w.instances, w.instance_rotation, w.instance_offset,
                              seed=w.seed)


