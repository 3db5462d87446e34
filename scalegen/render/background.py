"""Backgrounds: what a ray sees when it leaves the scene box without hitting anything.

``EnvironmentBackground`` is a text-conditioned environment map (an MLP of the ray direction and
the pooled prompt embedding), so each prompt can own its backdrop; ``SolidBackground`` is one
learned colour. Both support random solid-colour augmentation (ScaleDreamer's ``random_aug``):
with probability ``random_prob`` per prompt during training the backdrop is replaced by a random
colour, which discourages the geometry from "painting" the background.
"""
from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from scalegen.render.base import Background, BackgroundFn
from scalegen.text.base import TextCond


def direction_encoding(dirs: Tensor, n_freqs: int) -> Tensor:
    """[..., 3] -> [..., 3 + 6 * n_freqs] sin/cos frequency encoding of unit directions."""
    out = [dirs]
    for k in range(n_freqs):
        out += [torch.sin((2.0**k) * math.pi * dirs), torch.cos((2.0**k) * math.pi * dirs)]
    return torch.cat(out, -1)


def _augment(bg: Tensor, n_prompts: int, prob: float) -> Tensor:
    """Replace whole prompts' backgrounds with random solid colours with probability ``prob``."""
    if prob <= 0:
        return bg
    bg = bg.expand(n_prompts, *bg.shape[1:])
    swap = torch.rand(n_prompts, device=bg.device) < prob
    colours = torch.rand(n_prompts, 1, 1, 3, device=bg.device)
    return torch.where(swap.view(-1, 1, 1, 1), colours, bg)


class EnvironmentBackground(Background):
    def __init__(self, text_dim: int, hidden: int = 32, n_freqs: int = 2, random_prob: float = 0.0):
        super().__init__()
        self.n_freqs, self.random_prob = n_freqs, random_prob
        self.dir_in = nn.Linear(3 + 6 * n_freqs, hidden)
        self.text_in = nn.Linear(text_dim, hidden, bias=False)
        self.out = nn.Sequential(nn.ReLU(), nn.Linear(hidden, hidden), nn.ReLU(), nn.Linear(hidden, 3))

    def bind(self, cond: TextCond) -> BackgroundFn:
        """A ``BackgroundFn`` for these prompts: dirs [P, V, R, 3] -> rgb [B, V, R, 3]."""
        txt = self.text_in(cond.pooled.float())  # [B, H]

        def background(dirs: Tensor) -> Tensor:
            hd = self.dir_in(direction_encoding(dirs, self.n_freqs))  # [P, V, R, H]
            rgb = torch.sigmoid(self.out(hd + txt[:, None, None, :]))
            return _augment(rgb, txt.shape[0], self.random_prob) if self.training else rgb

        return background


class SolidBackground(Background):
    def __init__(self, text_dim: int = 0, random_prob: float = 0.0):
        super().__init__()
        self.random_prob = random_prob
        self.logit = nn.Parameter(torch.zeros(3))

    def bind(self, cond: TextCond) -> BackgroundFn:
        n = len(cond)

        def background(dirs: Tensor) -> Tensor:
            rgb = torch.sigmoid(self.logit).expand(n, *dirs.shape[1:3], 3)
            return _augment(rgb, n, self.random_prob) if self.training else rgb

        return background
