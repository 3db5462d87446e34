"""Compositional prompt corpora in ATT3D's style: subject × activity × attire × headwear, plus
subject × activity × material ("... made out of gold"), as in AT2520.

Amortization is measured on *unseen combinations*: a seeded choice of (subject, activity) pairs is
held out entirely: no training prompt contains such a pair, while every subject and every activity
still occurs in training. Everything is a function of the seed.

``compose_oracle_corpus``: corpora of the oracle world's compositional grammar (data/oracle_grammar.py)
of any size, with its held-out levels, for `scalegen data compose --world oracle`.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch

from scalegen.atomic import write_text
from scalegen.data.oracle_grammar import LEVELS, Grammar
from scalegen.errors import DataError

SUBJECTS = [
    "squirrel", "raccoon", "pig", "monkey", "robot", "lion", "rabbit", "tiger", "orangutan", "bear",
    "corgi", "penguin", "fox", "owl", "koala", "panda", "frog", "cat", "hamster", "elephant",
    "giraffe", "kangaroo", "otter", "hedgehog", "sloth", "beaver", "goat", "llama", "zebra", "wolf",
    "duck", "chicken", "turtle", "octopus", "crocodile", "hippo", "rhino", "badger", "moose", "parrot",
]
ACTIVITIES = [
    "riding a motorcycle", "playing the guitar", "holding a book", "sitting on a chair", "holding a shovel",
    "wielding a katana", "holding a blue balloon", "riding a bicycle", "playing the drums", "eating a burger",
    "reading a newspaper", "holding an umbrella", "playing the violin", "riding a skateboard", "drinking coffee",
    "holding a lantern", "playing chess", "juggling apples", "holding a trophy", "carrying a suitcase",
    "painting a canvas", "holding a telescope", "playing the trumpet", "riding a horse", "holding a sword",
]
ATTIRES = [
    "a leather jacket", "a backpack", "a cape", "a sweater", "a suit", "a medieval armor", "a tuxedo",
    "a raincoat", "a kimono", "a hoodie", "a scarf", "a denim jacket", "a lab coat", "a spacesuit",
    "a superhero costume", "an apron", "a poncho", "a vest", "a bow tie", "a tie",
]
HEADWEAR = [
    "a party hat", "a sombrero", "a helmet", "a tophat", "a baseball cap", "a crown", "a beanie",
    "a cowboy hat", "a chef hat", "a beret", "a wizard hat", "a viking helmet", "a headband", "sunglasses",
    "a flower crown",
]
MATERIALS = [
    "made out of gold", "carved out of wood", "made out of lego", "made out of clay", "made out of glass",
    "made out of marble", "made out of paper", "made out of ice", "made out of chocolate", "made out of bronze",
]


def _article(noun: str) -> str:
    return f"an {noun}" if noun[0] in "aeiou" else f"a {noun}"


def compose_prompt(subject: int, activity: int, rest: int) -> str:
    """``rest`` < len(ATTIRES) * len(HEADWEAR) picks attire + headwear; above that, a material."""
    head = f"{_article(SUBJECTS[subject])} {ACTIVITIES[activity]}"
    n_wear = len(ATTIRES) * len(HEADWEAR)
    if rest < n_wear:
        return f"{head} wearing {ATTIRES[rest // len(HEADWEAR)]} wearing {HEADWEAR[rest % len(HEADWEAR)]}"
    return f"{head} {MATERIALS[rest - n_wear]}"


def n_rest() -> int:
    return len(ATTIRES) * len(HEADWEAR) + len(MATERIALS)


def compose_corpus(n_train: int = 100_000, n_unseen_pairs: int = 20, n_val: int = 2000, seed: int = 0) -> dict:
    """{"train", "val", "test"} (val = test = prompts of held-out subject-activity pairs)."""
    ns, na, nr = len(SUBJECTS), len(ACTIVITIES), n_rest()
    pairs = ns * na
    if not 0 < n_unseen_pairs < pairs // 2:
        raise DataError(f"--unseen-pairs must be between 1 and {pairs // 2 - 1}")
    g = torch.Generator().manual_seed(seed)
    held = set()
    for p in torch.randperm(pairs, generator=g).tolist():
        s, a = divmod(p, na)
        # keep every subject and activity in training: hold out at most one pair per subject/activity
        if all(s != hs and a != ha for hs, ha in held):
            held.add((s, a))
        if len(held) == n_unseen_pairs:
            break
    if len(held) < n_unseen_pairs:
        raise DataError(f"cannot hold out {n_unseen_pairs} pairs with every subject and activity still seen; "
                        f"use at most {min(ns, na)}")
    n_seen = (pairs - len(held)) * nr
    if n_train > n_seen:
        raise DataError(f"the grammar has {n_seen} training combinations; ask for at most that many (--n)")
    seen_pairs = [(s, a) for s in range(ns) for a in range(na) if (s, a) not in held]
    order = torch.randperm(n_seen, generator=g)[:n_train].tolist()
    train = [compose_prompt(*seen_pairs[i // nr], i % nr) for i in order]
    held_sorted = sorted(held)
    n_unseen = len(held_sorted) * nr
    order = torch.randperm(n_unseen, generator=g)[:min(n_val, n_unseen)].tolist()
    val = [compose_prompt(*held_sorted[i // nr], i % nr) for i in order]
    return {"train": train, "val": val, "test": list(val),
            "unseen_pairs": [f"{SUBJECTS[s]} | {ACTIVITIES[a]}" for s, a in held_sorted]}


def _write_files(out: str | Path, files: list[tuple[Path, str]]) -> None:
    out = Path(out)
    if out.is_dir():
        raise DataError(f"cannot write '{out}': it is a folder; give a file name such as {out / 'corpus.json'}")
    out.parent.mkdir(parents=True, exist_ok=True)
    for path, text in files:
        write_text(path, text)


def write_composed(out: str | Path, **kw) -> dict:
    corpus = compose_corpus(**kw)
    out = Path(out)
    _write_files(out, [(out, json.dumps({k: corpus[k] for k in ("train", "val", "test")}, indent=0) + "\n"),
                       (out.with_suffix(".unseen_pairs.json"), json.dumps(corpus["unseen_pairs"], indent=1) + "\n")])
    return corpus


def compose_oracle_corpus(grammar: Grammar, n_train: int, n_eval: int, seed: int = 0) -> dict:
    """A corpus of the oracle world's compositional grammar: ``train`` = ``n_train`` unique training prompts,
    one list per held-out level (up to ``n_eval`` prompts each), ``val`` = ``test`` = all held-out ones."""
    train = grammar.sample("train", n_train, seed, exact=True)
    held = {"unseen_attribute": grammar.held_attribute, "unseen_object_pair": grammar.held_object_pair,
            "unseen_relation": grammar.held_relation}
    levels = {lvl: grammar.sample(lvl, n_eval, seed, exact=False) for lvl in LEVELS if held[lvl]}
    val = [p for ps in levels.values() for p in ps]
    return {"train": train, "val": val, "test": list(val), **levels}


def write_oracle_composed(out: str | Path, grammar: Grammar, world: dict, n_train: int, n_eval: int,
                          seed: int = 0) -> dict:
    """Write ``compose_oracle_corpus`` to ``out`` and, beside it, ``<out>.world.json``: the world config it
    belongs to (train with the same ``world.*`` keys) and its held-out combinations."""
    corpus = compose_oracle_corpus(grammar, n_train, n_eval, seed)
    out = Path(out)
    info = {"world": world, "held_out": {
        "unseen_attribute": sorted(f"{c} {s}" for c, s in grammar.held_attribute),
        "unseen_object_pair": sorted(" + ".join(sorted(p)) for p in grammar.held_object_pair),
        "unseen_relation": sorted(f"{s} {r}" for s, r in grammar.held_relation)},
        "counts": grammar.counts()}
    _write_files(out, [(out, json.dumps(corpus, indent=0) + "\n"),
                       (out.with_suffix(".world.json"), json.dumps(info, indent=1) + "\n")])
    return corpus
