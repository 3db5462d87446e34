"""What the training loop reads its prompts from: the ``Sampler`` interface and its ``Batch``.

Two samplers implement it: ``prompts.PromptSampler`` (a corpus in memory) and ``stream.ShardStream``
(webdataset shards, optionally carrying precomputed text embeddings). The loop never asks which one
it has: both return a ``Batch`` and resume exactly from ``state_dict``.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from scalegen.text.base import TextCond


@dataclass
class Batch:
    """One rank's prompts for one step. ``keys`` name the samples (shard keys; a corpus's line
    positions for the in-memory sampler); ``cond`` and ``variants`` are set only when the source
    carries embeddings (shards built with an encoder)."""

    prompts: list[str]
    keys: list[str]
    cond: Optional[TextCond] = None  # the plain prompt's embeddings (fp32)
    variants: Optional[torch.Tensor] = None  # [B, V, L, D] tokens of prompt + view variants ("views" store)


class Sampler:
    """Endless (train) or finite (eval pass) batches for one rank of ``world_size``, exactly resumable.

    ``info`` is the manifest's encoder entry of the embeddings its batches carry (None: none carried,
    the loop encodes the prompts itself)."""

    info: Optional[dict] = None

    def next_batch(self) -> Optional[Batch]:
        """The next batch, or None after the last one of a finite pass (never in training)."""
        raise NotImplementedError

    def state_dict(self) -> dict:
        """The exact data position (JSON-serialisable)."""
        raise NotImplementedError

    def load_state_dict(self, state: dict) -> None:
        raise NotImplementedError

    def remap(self, states: dict[str, dict], old_world: int) -> str:
        """Continue from the positions ``states`` (rank -> ``state_dict``) of ``old_world`` ranks on this
        sampler's number of ranks; returns what was done, in a sentence (printed by the loop)."""
        raise NotImplementedError
