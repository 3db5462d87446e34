"""Prompt corpora in memory and a resumable, rank-sharded prompt sampler.

The reference samples prompts with ``random.sample`` each step, so a resumed run sees different
batches. Here the order is a pure function of (seed, epoch, rank): every epoch is a permutation
of the corpus seeded by (seed, epoch), rank r of W takes positions r, r+W, ...; the sampler's
position (epoch, cursor) is saved in checkpoints and restored exactly.
"""
from __future__ import annotations

import csv
import json
from pathlib import Path

import torch

from scalegen.errors import DataError


def normalise(prompt: str) -> str:
    return " ".join(prompt.split())


def read_corpus(path: str | Path, split: str = "train", column: str = "prompt") -> list[str]:
    """Prompts of one split from ScaleDreamer JSON (``{"train": [...], ...}``), plain text (one
    prompt per line) or CSV (column ``column``). Whitespace is normalised; empty lines dropped."""
    p = Path(path)
    if not p.is_file():
        raise DataError(f"corpus '{path}' does not exist; give a .json, .txt or .csv prompt file")
    suffix = p.suffix.lower()
    if suffix == ".json":
        try:
            data = json.loads(p.read_text())
        except json.JSONDecodeError as e:
            raise DataError(f"{path}:{e.lineno}: invalid JSON ({e.msg}); fix the file and retry") from None
        if isinstance(data, list):
            items = data
        elif isinstance(data, dict):
            if split not in data:
                raise DataError(f"corpus '{path}' has no split '{split}' (it has {', '.join(data)}); "
                                "set data.split to one of them")
            items = data[split]
        else:
            raise DataError(f"corpus '{path}' must be a JSON list or a mapping of splits to lists")
        for i, it in enumerate(items):
            if not isinstance(it, str):
                raise DataError(f"{path}: item {i} of split '{split}' is not a string: {it!r}")
        prompts = [normalise(x) for x in items]
    elif suffix == ".csv":
        with p.open(newline="") as f:
            reader = csv.DictReader(f)
            if reader.fieldnames is None or column not in reader.fieldnames:
                raise DataError(f"{path}: no column '{column}' (columns: {reader.fieldnames}); name the prompt column")
            prompts = [normalise(row[column] or "") for row in reader]
    else:
        prompts = [normalise(line) for line in p.read_text().splitlines()]
    prompts = [x for x in prompts if x]
    if not prompts:
        raise DataError(f"corpus '{path}' (split '{split}') holds no prompts")
    return prompts


class PromptSampler:
    """Endless, exactly resumable batches of prompts for one rank."""

    def __init__(self, prompts: list[str], batch_size: int, seed: int = 0, rank: int = 0, world_size: int = 1):
        if not prompts:
            raise DataError("no prompts to train on")
        self.prompts, self.batch_size = list(prompts), batch_size
        self.seed, self.rank, self.world_size = seed, rank, world_size
        self.epoch, self.cursor = 0, 0
        self._order = self._epoch_order(0)

    def _epoch_order(self, epoch: int) -> list[int]:
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
        perm = torch.randperm(len(self.prompts), generator=g).tolist()
        mine = perm[self.rank::self.world_size]
        return mine if mine else perm[: 1]  # more ranks than prompts: every rank still gets one

    def next_batch(self) -> list[str]:
        out = []
        while len(out) < self.batch_size:
            if self.cursor >= len(self._order):
                self.epoch, self.cursor = self.epoch + 1, 0
                self._order = self._epoch_order(self.epoch)
            take = self._order[self.cursor:self.cursor + self.batch_size - len(out)]
            out += [self.prompts[i] for i in take]
            self.cursor += len(take)
        return out

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "cursor": self.cursor}

    def load_state_dict(self, state: dict) -> None:
        self.epoch, self.cursor = int(state["epoch"]), int(state["cursor"])
        self._order = self._epoch_order(self.epoch)
