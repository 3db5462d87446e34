"""The text-condition container and the encoder interface."""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass
class TextCond:
    """Frozen text condition of a batch of prompts.

    ``pooled`` [B, D] is the global embedding (Hyper-iNGP, 3DConv-Net); ``tokens`` [B, L, D] the
    per-token embeddings (Triplane-Transformer, cross-attention) with ``mask`` [B, L] (True = real).
    """

    pooled: Tensor
    tokens: Tensor
    mask: Tensor

    def __len__(self) -> int:
        return self.pooled.shape[0]

    def to(self, device) -> "TextCond":
        return TextCond(self.pooled.to(device), self.tokens.to(device), self.mask.to(device))

    def index(self, idx) -> "TextCond":
        return TextCond(self.pooled[idx], self.tokens[idx], self.mask[idx])

    @staticmethod
    def cat(conds: list["TextCond"]) -> "TextCond":
        return TextCond(torch.cat([c.pooled for c in conds]), torch.cat([c.tokens for c in conds]),
                        torch.cat([c.mask for c in conds]))


class TextEncoder:
    """Interface: ``encode(prompts) -> TextCond``; ``dim`` (embedding width); ``max_tokens`` (longer
    prompts are truncated); ``id`` (stable identifier, recorded in shard manifests);
    ``count_tokens(prompt)`` (to report prompts over the limit)."""

    dim: int
    max_tokens: int
    id: str

    def encode(self, prompts: list[str]) -> TextCond:  # pragma: no cover - interface
        raise NotImplementedError

    def count_tokens(self, prompt: str) -> int:  # pragma: no cover - interface
        raise NotImplementedError

    def why_unencodable(self, prompt: str) -> str | None:
        """None when ``prompt`` can be encoded, else the reason (a clause naming what the encoder reads).
        Tokenizers with byte fallbacks (CLIP's) encode any text."""
        return None


# View-dependent prompting (DreamFusion / threestudio): the prior sees "<prompt>, <view> view".
VIEWS = ("front", "side", "back", "overhead")


def view_prompt(prompt: str, view: str) -> str:
    """The view-dependent variant of ``prompt`` for ``view`` in ``VIEWS``."""
    return f"{prompt}, {view} view"


class LRU:
    """A bounded prompt -> value cache (least recently used evicted first): text embeddings computed
    on the fly stay in memory for repeated prompts without growing with the corpus."""

    def __init__(self, capacity: int):
        from collections import OrderedDict  # noqa: PLC0415

        self.capacity, self._d = capacity, OrderedDict()

    def __contains__(self, key) -> bool:
        return key in self._d

    def __len__(self) -> int:
        return len(self._d)

    def get(self, key):
        v = self._d.get(key)
        if v is not None:
            self._d.move_to_end(key)
        return v

    def put(self, key, value) -> None:
        self._d[key] = value
        self._d.move_to_end(key)
        while len(self._d) > self.capacity:
            self._d.popitem(last=False)
