"""The compositional grammar of the oracle world: prompts, their completions, held-out levels.

A prompt is one object phrase, or two joined by a spatial relation:

    a [size] [colour] [pattern] <shape | object> [with a <colour> front] [<relation> <object phrase>]
    e.g. "a small red striped cube on top of a large blue cylinder", "a blue cylinder with a yellow front"

``size``, ``colour`` and ``shape`` are *free* when the prompt omits them (``world.underspecified``):
"a cube" stands for every size and colour of cube, "a red object" for every size and shape. The
prompt's completions (``completions``) are the fully specified scenes it stands for; the oracle's
conditional is the exact mixture over them. ``pattern`` (plain when omitted) and the front marker
(none when omitted) are *unmarked*: "a red cube" is a plain red cube without a marker.

Held-out combinations, at three levels (every word stays in training):
  * ``unseen_attribute``: a (colour, shape) pair that no training prompt binds ("a ... red torus");
  * ``unseen_object_pair``: two shapes that never share a training scene, in either order;
  * ``unseen_relation``: a (first object's shape, relation) use never trained ("a cone on top of ...").
A prompt belongs to the level of its held-out features; one with features of two levels belongs to
no split, so the splits are disjoint. Everything is a function of the vocabulary and the seed, so
``scalegen data compose --world oracle`` and the oracle prior agree on the splits.

This module is text only (the data room); the oracle prior turns specs into scenes (priors room).
"""
from __future__ import annotations

import itertools
import random
from dataclasses import dataclass, replace
from typing import Optional

from scalegen.errors import DataError
from scalegen.text.bow import tokenize

PATTERNS = ("plain", "striped", "checkered", "two-tone")
RELATIONS = ("on top of", "left of", "right of", "in front of", "behind")
LEVELS = ("unseen_attribute", "unseen_object_pair", "unseen_relation")
FORM = ("'a [size] [colour] [pattern] <shape|object> [with a <colour> front] [<relation> <object phrase>]'")


def article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


@dataclass(frozen=True)
class ObjectSpec:
    """One object of a prompt; None marks a free (unspecified) size, colour or shape."""

    size: Optional[str]
    colour: Optional[str]
    shape: Optional[str]
    pattern: str = "plain"
    front: Optional[str] = None  # marker colour on the object's +x side

    @property
    def phrase(self) -> str:
        words = [w for w in (self.size, self.colour) if w]
        if self.pattern != "plain":
            words.append(self.pattern)
        words.append(self.shape or "object")
        text = f"{article(words[0])} {' '.join(words)}"
        return text + (f" with {article(self.front)} {self.front} front" if self.front else "")

    @property
    def specified(self) -> bool:
        return None not in (self.size, self.colour, self.shape)


@dataclass(frozen=True)
class SceneSpec:
    """A prompt's meaning: one object, or ``objects[0] <relation> objects[1]``."""

    objects: tuple[ObjectSpec, ...]
    relation: Optional[str] = None

    @property
    def prompt(self) -> str:
        if self.relation is None:
            return self.objects[0].phrase
        return f"{self.objects[0].phrase} {self.relation} {self.objects[1].phrase}"

    @property
    def specified(self) -> bool:
        return all(o.specified for o in self.objects)


class Grammar:
    """The prompt space of one vocabulary, with its held-out combinations (seeded)."""

    def __init__(self, sizes: list[str], colours: list[str], shapes: list[str], patterns: list[str] = ("plain",),
                 relations: list[str] = RELATIONS, fronts: list[str] = (), underspecified: bool = False,
                 unseen_attribute_pairs: int = 0, unseen_object_pairs: int = 0, unseen_relation_uses: int = 0,
                 max_completions: int = 64, seed: int = 0):
        for name, values, known in (("patterns", patterns, PATTERNS), ("relations", relations, RELATIONS)):
            for v in values:
                if v not in known:
                    raise DataError(f"world.{name}: unknown value {v!r}; choose from {', '.join(known)}")
        for name, values in (("sizes", sizes), ("colors", colours), ("shapes", shapes), ("patterns", patterns)):
            if not values:
                raise DataError(f"world.{name} is empty; the compositional grammar needs at least one")
            if len(set(values)) != len(values):
                raise DataError(f"world.{name} lists a value twice: {list(values)}")
        if "object" in shapes:
            raise DataError("world.shapes: 'object' is the word of an unspecified shape, not a shape")
        self.sizes, self.colours, self.shapes = list(sizes), list(colours), list(shapes)
        self.patterns, self.relations, self.fronts = list(patterns), list(relations), list(fronts)
        self.underspecified, self.max_completions, self.seed = underspecified, max_completions, seed
        rng = random.Random(seed)
        self.held_attribute = self._pick(rng, [(c, s) for c in colours for s in shapes], unseen_attribute_pairs,
                                         "unseen_attribute_pairs", lambda p: [("c", p[0]), ("s", p[1])])
        pairs = [frozenset(p) for p in itertools.combinations(shapes, 2)]
        self.held_object_pair = self._pick(rng, pairs, unseen_object_pairs if relations else 0,
                                           "unseen_object_pairs", lambda p: [("s", s) for s in p])
        uses = [(s, r) for s in shapes for r in relations]
        self.held_relation = self._pick(rng, uses, unseen_relation_uses if relations else 0, "unseen_relation_uses",
                                        lambda u: [("s", u[0]), ("r", u[1])])
        self._vocab = {"size": set(sizes), "colour": set(colours), "shape": set(shapes)}
        self._rel_tokens = {r: tokenize(r) for r in relations}
        self.phrases = self._all_phrases()

    @staticmethod
    def _pick(rng: random.Random, options: list, n: int, key: str, uses) -> set:
        """``n`` options, at most one per vocabulary value they use, so every word keeps training prompts
        that combine it with the rest of the vocabulary."""
        order = sorted(options, key=lambda o: sorted(map(str, o)) if isinstance(o, frozenset) else o)
        rng.shuffle(order)
        held, used = set(), set()
        for o in order:
            if len(held) >= n:
                break
            if any(u in used for u in uses(o)):
                continue
            held.add(o)
            used.update(uses(o))
        if len(held) < n:
            raise DataError(f"world.{key}={n} is too many for this vocabulary (at most {len(held)} keep every word "
                            "in training); lower it")
        return held

    # --- the prompt space -------------------------------------------------------------------------
    def _all_phrases(self) -> list[ObjectSpec]:
        free = [None] if self.underspecified else []
        out = []
        for size, colour, pattern, shape, front in itertools.product(
                self.sizes + free, self.colours + free, self.patterns, self.shapes + free, [None] + self.fronts):
            if front is not None and front == colour:
                continue  # a marker must differ from the body
            o = ObjectSpec(size, colour, shape, pattern, front)
            if self.n_completions(SceneSpec((o,))) <= self.max_completions:
                out.append(o)
        return out

    def n_object_completions(self, o: ObjectSpec) -> int:
        n_colours = len(self.colours) - (1 if o.front in self.colours else 0)
        return ((len(self.sizes) if o.size is None else 1) * (n_colours if o.colour is None else 1)
                * (len(self.shapes) if o.shape is None else 1))

    def n_completions(self, spec: SceneSpec) -> int:
        n = 1
        for o in spec.objects:
            n *= self.n_object_completions(o)
        return n

    def completions(self, spec: SceneSpec) -> list[SceneSpec]:
        """The fully specified scenes ``spec`` stands for (itself when it is fully specified)."""
        per_object = []
        for o in spec.objects:
            sizes = self.sizes if o.size is None else [o.size]
            colours = [c for c in self.colours if c != o.front] if o.colour is None else [o.colour]
            shapes = self.shapes if o.shape is None else [o.shape]
            per_object.append([replace(o, size=a, colour=b, shape=c) for a, b, c in itertools.product(sizes, colours, shapes)])
        return [SceneSpec(objs, spec.relation) for objs in itertools.product(*per_object)]

    def level(self, spec: SceneSpec) -> Optional[str]:
        """``train``, one of ``LEVELS``, or None (held-out features of two levels: in no split)."""
        found = set()
        for o in spec.objects:
            if (o.colour, o.shape) in self.held_attribute:
                found.add("unseen_attribute")
        if spec.relation is not None:
            a, b = spec.objects[0].shape, spec.objects[1].shape
            if a and b and frozenset((a, b)) in self.held_object_pair:
                found.add("unseen_object_pair")
            if a and (a, spec.relation) in self.held_relation:
                found.add("unseen_relation")
        if len(found) > 1:
            return None
        return found.pop() if found else "train"

    @property
    def n_prompts(self) -> int:
        """Size of the whole index space (before the completion cap on two-object prompts and the splits)."""
        p = len(self.phrases)
        return p + p * len(self.relations) * p

    def decode(self, i: int) -> SceneSpec:
        """The prompt at index ``i`` of the space: single objects first, then (A, relation, B) in mixed radix."""
        p = len(self.phrases)
        if i < p:
            return SceneSpec((self.phrases[i],))
        i -= p
        a, rest = divmod(i, len(self.relations) * p)
        r, b = divmod(rest, p)
        return SceneSpec((self.phrases[a], self.phrases[b]), self.relations[r])

    def accepts(self, spec: SceneSpec) -> bool:
        return self.n_completions(spec) <= self.max_completions

    def sample(self, split: str, n: int, seed: int = 0, exact: bool = True) -> list[str]:
        """``n`` unique prompts of ``split`` (``train`` or a level), drawn uniformly from the split (seeded).
        A split with fewer prompts: a ``DataError`` with ``exact``, else all of them (shuffled)."""
        if split not in ("train", *LEVELS):
            raise DataError(f"unknown split {split!r}; choose from train, {', '.join(LEVELS)}")
        rng = random.Random(f"{self.seed}/{split}/{seed}")
        available = self.counts()[split]
        if available <= n:
            if exact and available < n:
                raise DataError(f"the grammar has {available} {split} prompts; ask for at most that many (or enlarge "
                                "the vocabulary: world.colors, shapes, sizes, patterns, relations)")
            out = [sp.prompt for sp in map(self.decode, range(self.n_prompts))
                   if self.accepts(sp) and self.level(sp) == split]
            rng.shuffle(out)
            return out
        total, out, seen = self.n_prompts, [], set()
        while len(out) < n:
            spec = self.decode(rng.randrange(total))
            if not self.accepts(spec) or self.level(spec) != split:
                continue
            text = spec.prompt
            if text not in seen:
                seen.add(text)
                out.append(text)
        return out

    def counts(self) -> dict[str, int]:
        """Exact number of prompts per split (``train``, each level, ``none``), by classes of phrases."""
        classes: dict[tuple, int] = {}
        for o in self.phrases:
            key = (o.shape, (o.colour, o.shape) in self.held_attribute, self.n_object_completions(o))
            classes[key] = classes.get(key, 0) + 1
        out = {"train": 0, **{lvl: 0 for lvl in LEVELS}, "none": 0}

        def add(spec: SceneSpec, k: int) -> None:
            lvl = self.level(spec)
            out["none" if lvl is None else lvl] += k

        def stand_in(shape, held, colour_free=False) -> ObjectSpec:
            if held:
                colour = next(c for c, s in self.held_attribute if s == shape)
            else:
                colour = next((c for c in self.colours if (c, shape) not in self.held_attribute), None)
            return ObjectSpec("x", colour, shape)

        for (shape, held, nc), k in classes.items():
            add(SceneSpec((stand_in(shape, held),)), k)
        for (sa, ha, na), ka in classes.items():
            for (sb, hb, nb), kb in classes.items():
                if na * nb > self.max_completions:
                    continue
                for r in self.relations:
                    add(SceneSpec((stand_in(sa, ha), stand_in(sb, hb)), r), ka * kb)
        return out

    # --- reading prompts --------------------------------------------------------------------------
    def parse(self, prompt: str) -> SceneSpec:
        """The spec of ``prompt`` (wording-insensitive: case, articles and punctuation are ignored);
        a ``DataError`` naming what is wrong when it is not in this world."""
        toks = tokenize(prompt)
        hits = [(i, r) for r, rt in self._rel_tokens.items() for i in range(len(toks) - len(rt) + 1)
                if toks[i:i + len(rt)] == rt]
        if len(hits) > 1:
            raise self._error(prompt, f"it has {len(hits)} relations; at most one ({', '.join(self.relations)})")
        if hits:
            i, rel = hits[0]
            parts = (toks[:i], toks[i + len(self._rel_tokens[rel]):])
            spec = SceneSpec(tuple(self._parse_object(prompt, p) for p in parts), rel)
        else:
            spec = SceneSpec((self._parse_object(prompt, toks),))
        n = self.n_completions(spec)
        if n > self.max_completions:
            raise self._error(prompt, f"it leaves {n} completions open (world.max_completions={self.max_completions}); "
                              "name more of its size, colour and shape")
        return spec

    def _parse_object(self, prompt: str, toks: list[str]) -> ObjectSpec:
        if not toks:
            raise self._error(prompt, "an object phrase is empty")
        front = None
        if len(toks) >= 3 and toks[-1] == "front" and toks[-3] == "with":
            front, toks = toks[-2], toks[:-3]
            if front not in self.fronts:
                raise self._error(prompt, f"the front colour {front!r} is not one of world.fronts "
                                  f"({', '.join(self.fronts) or 'none: this world has no objects with a front'})")
        if not toks:
            raise self._error(prompt, "an object phrase has no shape")
        head, words = toks[-1], toks[:-1]
        if head == "object":
            if not self.underspecified:
                raise self._error(prompt, "'object' leaves the shape open, and this world has no under-specified "
                                  "prompts (world.underspecified=false)")
            shape = None
        elif head in self._vocab["shape"]:
            shape = head
        else:
            raise self._error(prompt, f"{head!r} is not a shape of this world ({', '.join(self.shapes)})")
        found: dict[str, str] = {}
        pattern_words = {p: tokenize(p) for p in self.patterns if p != "plain"}
        j = 0
        while j < len(words):
            w = words[j]
            pat = next((p for p, pt in pattern_words.items() if words[j:j + len(pt)] == pt), None)
            if pat is not None:
                kind, value, j = "pattern", pat, j + len(pattern_words[pat])
            else:
                kind = next((k for k, vs in self._vocab.items() if k != "shape" and w in vs), None)
                if kind is None:
                    raise self._error(prompt, f"the word {w!r} is not a size, colour or pattern of this world")
                value, j = w, j + 1
            if kind in found:
                raise self._error(prompt, f"an object has two {kind}s ({found[kind]!r} and {value!r})")
            found[kind] = value
        spec = ObjectSpec(found.get("size"), found.get("colour"), shape, found.get("pattern", "plain"), front)
        if not self.underspecified:
            for kind in ("size", "colour"):
                if kind not in found and len(self._vocab[kind]) > 1:
                    raise self._error(prompt, f"an object has no {kind}, and this world has no under-specified "
                                      "prompts (world.underspecified=false)")
            spec = replace(spec, size=spec.size or self.sizes[0], colour=spec.colour or self.colours[0])
        if "plain" not in self.patterns and spec.pattern == "plain":
            raise self._error(prompt, f"an object has no pattern, and this world has none plain ({', '.join(self.patterns)})")
        if front is not None and front == spec.colour:
            raise self._error(prompt, "its front marker has the colour of the object itself")
        return spec

    def _error(self, prompt: str, why: str) -> DataError:
        return DataError(f"prompt {prompt!r} is not in the oracle world (compositional grammar {FORM}): {why}; "
                         "free-text prompts need a real prior (prior.name=stable_diffusion)")

    def max_tokens(self) -> int:
        """Words (``tokenize``) of the longest prompt of this grammar: what a text encoder must keep."""
        longest = max(len(tokenize(o.phrase)) for o in self.phrases)
        if not self.relations:
            return longest
        return 2 * longest + max(len(tokenize(r)) for r in self.relations)

    def words(self) -> set[str]:
        """Every word the vocabulary can put in a prompt (for the 'every word seen' checks)."""
        out = set(self.sizes) | set(self.colours) | set(self.shapes) | set(self.fronts)
        for p in self.patterns:
            out |= set(tokenize(p)) if p != "plain" else set()
        for r in self.relations:
            out |= set(tokenize(r))
        if self.fronts:
            out |= {"with", "front"}
        return out
