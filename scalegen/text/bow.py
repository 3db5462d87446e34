"""Offline token-hash bag-of-words encoder for the oracle world.

Each lower-cased word maps to a fixed Gaussian vector seeded by a stable hash of the word, so
the encoder needs no weights, is identical on every machine, and can express prompts never seen
in training (an unseen attribute combination is the sum of seen words). Articles are dropped so
"a red cube" and "red cube" agree.

A bag of words cannot bind words to each other: "a red cube on top of a blue sphere" and "a blue
cube on top of a red sphere" sum to the same vector. With ``word_order="rotary"`` each word's
vector is turned by its position j as rotary position embeddings do (pairs of dimensions (2k, 2k+1)
rotated by the angle j * 10000^(-2k/dim)), so the sum keeps the order while an unseen combination
is still a sum of seen words at seen positions.
"""
from __future__ import annotations

import hashlib
import re

import torch

from scalegen.errors import DataError
from scalegen.text.base import TextCond, TextEncoder

_STOP = {"a", "an", "the", "of", "made"}


def tokenize(prompt: str) -> list[str]:
    return [w for w in re.findall(r"[a-z0-9]+", prompt.lower()) if w not in _STOP]


class BagOfWordsEncoder(TextEncoder):
    def __init__(self, dim: int = 128, max_tokens: int = 16, word_order: str = "bag"):
        if word_order == "rotary" and dim % 2:
            raise DataError(f"text.word_order=rotary needs an even text.dim, got {dim}")
        self.dim = dim
        self.max_tokens = max_tokens
        self.word_order = word_order
        self.id = f"bow-v1-d{dim}-l{max_tokens}" + ("-rotary" if word_order == "rotary" else "")
        self._cache: dict[str, torch.Tensor] = {}
        self._angles = None
        if word_order == "rotary":
            freq = 10000.0 ** (-torch.arange(0, dim, 2, dtype=torch.float64) / dim)  # [dim/2]
            self._angles = torch.arange(max_tokens, dtype=torch.float64)[:, None] * freq  # [L, dim/2]

    def _rotate(self, v: torch.Tensor, j: int) -> torch.Tensor:
        cos, sin = self._angles[j].cos().float(), self._angles[j].sin().float()
        x, y = v[0::2], v[1::2]
        out = torch.empty_like(v)
        out[0::2], out[1::2] = x * cos - y * sin, x * sin + y * cos
        return out

    def count_tokens(self, prompt: str) -> int:
        return len(tokenize(prompt))

    def why_unencodable(self, prompt: str) -> str | None:
        if tokenize(prompt):
            return None
        return (f"the bag-of-words encoder (text.encoder=bow) knows only words of ASCII letters and digits "
                f"(other than {', '.join(sorted(_STOP))})")

    def word_vector(self, word: str) -> torch.Tensor:
        v = self._cache.get(word)
        if v is None:
            seed = int.from_bytes(hashlib.blake2b(word.encode(), digest_size=8).digest(), "little") % (2**63)
            g = torch.Generator().manual_seed(seed)
            v = torch.randn(self.dim, generator=g) / self.dim**0.5
            self._cache[word] = v
        return v

    def encode(self, prompts: list[str]) -> TextCond:
        b, l, d = len(prompts), self.max_tokens, self.dim
        tokens = torch.zeros(b, l, d)
        mask = torch.zeros(b, l, dtype=torch.bool)
        for i, p in enumerate(prompts):
            words = tokenize(p)
            if not words:
                why = "it is empty" if not p.strip() else self.why_unencodable(p) + " and it has none"
                raise DataError(f"prompt {p!r} cannot be encoded: {why}; describe the object in such words, "
                                "e.g. 'a red cube'")
            for j, w in enumerate(words[:l]):
                v = self.word_vector(w)
                tokens[i, j] = self._rotate(v, j) if self._angles is not None else v
                mask[i, j] = True
        # Pooled: the sum of word vectors, normalised to unit expected norm per word count.
        pooled = tokens.sum(1) / mask.sum(1, keepdim=True).clamp(min=1).sqrt()
        return TextCond(pooled=pooled, tokens=tokens, mask=mask)
