"""Retrieval arithmetic shared by CLIP evaluation and the oracle world: R@1 with documented ties,
the seeded distractor sets of our protocol, and CLIPScore.

R@1 ("R-precision" at R = 1, Park et al. 2021; the figure ScaleDreamer and TriplaneTurbo report):
for a query (one rendered view) and candidates (prompts), a hit when the query's own prompt scores
highest. **Ties** are broken uniformly at random *in expectation*: when the own candidate shares the
maximum with m - 1 others the hit counts 1/m (0 when it is below the maximum). So a scorer that
sees nothing (all scores equal) gets exactly 1/C, chance, instead of 1 (ties to the truth) or 0,
and the figure never depends on the order of the candidates. The references take ``argmax``,
which breaks a tie toward the lowest index; with real CLIP features exact ties do not happen and
the two rules agree.

Distractors (our protocol): prompt i of a pool of n prompts is retrieved among itself and
k = 99 others, drawn without replacement by Floyd's algorithm from a SplitMix64 stream seeded by
(seed, i), where i is the prompt's position in the *sorted* pool. The set is therefore a function
of (seed, the pool's prompts, the prompt) only: not of file order, ranks, or library versions.
"""
from __future__ import annotations

import torch
from torch import Tensor

_MASK64 = (1 << 64) - 1


def r_at_1(scores: Tensor, own: Tensor | int) -> Tensor:
    """Per-query top-1 hit, ties shared: ``scores`` [Q, C], ``own`` [Q] (or one int for all queries)
    = the column of each query's right candidate -> [Q] float64 in [0, 1]."""
    if isinstance(own, int):
        own = torch.full((scores.shape[0],), own, dtype=torch.long, device=scores.device)
    at_max = scores == scores.max(dim=1, keepdim=True).values
    own_at_max = at_max.gather(1, own.view(-1, 1)).squeeze(1)
    return own_at_max.double() / at_max.sum(1).clamp(min=1).double()  # float64: 1/m exactly as Python writes it


def clip_score(cosine: Tensor, w: float = 2.5) -> Tensor:
    """CLIPScore (Hessel et al. 2021): ``w * max(cos(image, caption), 0)``, w = 2.5."""
    return w * cosine.clamp(min=0)


def _splitmix64(state: int) -> tuple[int, int]:
    state = (state + 0x9E3779B97F4A7C15) & _MASK64
    z = state
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _MASK64
    return state, z ^ (z >> 31)


def distractors(i: int, n: int, k: int, seed: int) -> list[int]:
    """k distinct indices of ``range(n)`` other than ``i`` (all n - 1 others when k >= n - 1), sorted;
    a pure function of (i, n, k, seed)."""
    if k >= n - 1:
        return [j for j in range(n) if j != i]
    state = (seed * 0x100000001B3 + i) & _MASK64
    chosen: set[int] = set()
    m = n - 1  # draw from 0..n-2, then skip over i
    for j in range(m - k, m):  # Floyd: k iterations, uniform k-subsets of range(m)
        state, r = _splitmix64(state)
        t = r % (j + 1)
        chosen.add(j if t in chosen else t)
    return sorted(x + (x >= i) for x in chosen)
