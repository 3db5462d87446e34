"""Offline token-hash bag-of-words encoder for the oracle world.

Each lower-cased word maps to a fixed Gaussian vector seeded by a stable hash of the word, so
the encoder needs no weights, is identical on every machine, and can express prompts never seen
in training (an unseen attribute combination is the sum of seen words). Articles are dropped so
"a red cube" and "red cube" agree.
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
    def __init__(self, dim: int = 128, max_tokens: int = 16):
        self.dim = dim
        self.max_tokens = max_tokens
        self.id = f"bow-v1-d{dim}-l{max_tokens}"
        self._cache: dict[str, torch.Tensor] = {}

    def count_tokens(self, prompt: str) -> int:
        return len(tokenize(prompt))

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
                raise DataError(f"prompt {p!r} has no words to encode; give a non-empty prompt such as 'a red cube'")
            for j, w in enumerate(words[:l]):
                tokens[i, j] = self.word_vector(w)
                mask[i, j] = True
        # Pooled: the sum of word vectors, normalised to unit expected norm per word count.
        pooled = tokens.sum(1) / mask.sum(1, keepdim=True).clamp(min=1).sqrt()
        return TextCond(pooled=pooled, tokens=tokens, mask=mask)
