"""Prompt ids and the UNet text embeddings behind them, shared by the latent-diffusion priors
(Stable Diffusion, MVDream).

A prior hands distillers integer ids (``Prior.text_embeddings``); the embeddings of an id are the
text tower's per-token outputs of K strings (the prompt itself and, for view-dependent prompting, its
variants), computed once per prompt in one encoder call for all missing prompts, and kept on the
device in an LRU of ``size`` prompts. An evicted prompt is re-encoded on its next use; precomputed
embeddings (from shards) enter through ``put``.
"""
from __future__ import annotations

from collections import OrderedDict
from typing import Callable

from torch import Tensor


class PromptTable:
    def __init__(self, encode: Callable[[list[str]], Tensor], variants: Callable[[str], list[str]], size: int):
        """``encode(strings) -> [len(strings), L, D]`` on the device; ``variants(prompt)`` the K strings
        behind a prompt id."""
        self.encode, self.variants, self.size = encode, variants, size
        self.cache: OrderedDict[int, Tensor] = OrderedDict()  # id -> [K, L, D]
        self._ids: dict[str, int] = {}
        self._prompts: list[str] = []
        self.n_encodes = 0  # prompts encoded (cache misses), for tests and logs

    def ids(self, prompts: list[str]) -> list[int]:
        """The id of each prompt (new prompts get the next free id; nothing is encoded here)."""
        out = []
        for p in prompts:
            if p not in self._ids:
                self._ids[p] = len(self._prompts)
                self._prompts.append(p)
            out.append(self._ids[p])
        return out

    def prompt_of(self, text_id: int) -> str:
        return self._prompts[text_id]

    def put(self, ids: list[int], tokens: Tensor) -> None:
        """Precomputed embeddings [B, K, L, D] of ``ids`` (already on the device, in the prior's dtype)."""
        for i, t in zip(ids, tokens):
            self.cache[i] = t
            self.cache.move_to_end(i)
        self._evict()

    def lookup(self, ids: list[int]) -> dict[int, Tensor]:
        """{id: [K, L, D]} for ``ids``, encoding the missing prompts in one text-encoder call."""
        need = list(dict.fromkeys(ids))
        missing = [i for i in need if i not in self.cache]
        if missing:
            strings = [s for i in missing for s in self.variants(self._prompts[i])]
            tok = self.encode(strings)
            k = len(strings) // len(missing)
            self.n_encodes += len(missing)
            for j, i in enumerate(missing):
                self.cache[i] = tok[j * k:(j + 1) * k]
        out = {}
        for i in need:
            self.cache.move_to_end(i)
            out[i] = self.cache[i]
        self._evict()
        return out

    def _evict(self) -> None:
        while len(self.cache) > self.size:
            self.cache.popitem(last=False)
