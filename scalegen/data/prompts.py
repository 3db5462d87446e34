"""Prompt corpora in memory and a resumable, rank-sharded prompt sampler.

The reference samples prompts with ``random.sample`` each step, so a resumed run sees different
batches. Here the order is a pure function of (seed, epoch, rank): every epoch is a permutation
of the corpus seeded by (seed, epoch), rank r of W takes positions r, r+W, ...; the sampler's
position (epoch, cursor) is saved in checkpoints and restored exactly.
"""
from __future__ import annotations

import csv
import io
import json
from pathlib import Path

import torch

from scalegen.data.sampler import Batch, Sampler
from scalegen.errors import DataError


def normalise(prompt: str) -> str:
    return " ".join(prompt.split())


def read_corpus(path: str | Path, split: str = "train", column: str = "prompt", split_flag: str = "data.split") -> list[str]:
    """Prompts of one split from ScaleDreamer JSON (``{"train": [...], ...}``), JSON lines, plain text
    (one prompt per line) or CSV (column ``column``). Whitespace is normalised; empty lines dropped."""
    prompts = [x for x, _ in read_corpus_lines(path, split, column, split_flag)]
    if not prompts:
        raise DataError(f"corpus '{path}' (split {split!r}) holds no prompts")
    return prompts


def _text(p: Path) -> str:
    """The file as UTF-8 text (a byte-order mark is allowed); undecodable bytes are a one-line error
    naming the line."""
    raw = p.read_bytes()
    try:
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line = raw[:e.start].count(b"\n") + 1
        raise DataError(f"{p}:{line}: not UTF-8 text (byte {e.start}); re-encode the file as UTF-8") from None


def _json(p: Path):
    try:
        return json.loads(_text(p))
    except json.JSONDecodeError as e:
        raise DataError(f"{p}:{e.lineno}:{e.colno}: invalid JSON ({e.msg}); fix the file and retry") from None
    except (RecursionError, ValueError) as e:
        raise DataError(f"{p}: unreadable JSON ({e.__class__.__name__}); fix the file and retry") from None


def _check_file(path: str | Path) -> Path:
    p = Path(path)
    if p.is_dir():
        raise DataError(f"corpus '{path}' is a folder; give a .json, .jsonl, .txt or .csv prompt file")
    if not p.is_file():
        raise DataError(f"corpus '{path}' does not exist; give a .json, .jsonl, .txt or .csv prompt file")
    return p


def corpus_splits(path: str | Path) -> list[str]:
    """Splits a corpus file offers: the keys of a ScaleDreamer JSON mapping, else just ``train``."""
    p = _check_file(path)
    if p.suffix.lower() == ".json":
        data = _json(p)
        if isinstance(data, dict):
            if not data:
                raise DataError(f"corpus '{path}' is an empty mapping; expected splits of prompts, e.g. "
                                '{"train": ["a red car", ...]}')
            return [str(k) for k in data]
    return ["train"]


def read_corpus_lines(path: str | Path, split: str = "train", column: str = "prompt",
                      split_flag: str = "data.split") -> list[tuple[str, int]]:
    """(normalised prompt, source line or item number) pairs, empty prompts dropped, duplicates kept.
    Anything malformed (bytes that are not UTF-8, invalid JSON, a wrong shape, a bad CSV row) raises a
    ``DataError`` naming the file and the line or item, never a traceback. ``split_flag`` is how the
    caller's user chooses the split (``data.split`` in a config, ``--split`` on a command line)."""
    p = _check_file(path)
    suffix = p.suffix.lower()
    out: list[tuple[str, int]] = []
    if suffix == ".json":
        data = _json(p)
        if isinstance(data, list):
            items = data
        elif isinstance(data, dict):
            if not data:
                raise DataError(f"corpus '{path}' is an empty mapping; expected splits of prompts, e.g. "
                                '{"train": ["a red car", ...]}')
            if split not in data:
                raise DataError(f"corpus '{path}' has no split {split!r} (it has {', '.join(map(repr, data))}); "
                                f"choose one of them ({split_flag})")
            items = data[split]
            if not isinstance(items, list):
                raise DataError(f"{path}: split {split!r} must be a list of prompt strings, not "
                                f"{type(items).__name__}")
        else:
            raise DataError(f"corpus '{path}' must be a JSON list of prompts or a mapping of splits to lists, not "
                            f"{type(data).__name__}")
        for i, it in enumerate(items):
            if not isinstance(it, str):
                raise DataError(f"{locate(path, split, i + 1)}: not a string: {_short(it)}; every prompt must be a JSON string")
            out.append((normalise(it), i + 1))
    elif suffix == ".jsonl":
        for n, line in enumerate(_text(p).splitlines(), 1):
            if not line.strip():
                continue
            try:
                it = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{path}:{n}:{e.colno}: invalid JSON line ({e.msg}); fix or delete that line") from None
            except (RecursionError, ValueError) as e:
                raise DataError(f"{path}:{n}: unreadable JSON line ({e.__class__.__name__}); fix or delete it") from None
            if isinstance(it, dict):
                it = it.get(column)
            if not isinstance(it, str):
                raise DataError(f"{path}:{n}: expected a string or an object with a '{column}' string")
            out.append((normalise(it), n))
    elif suffix == ".csv":
        reader = csv.DictReader(io.StringIO(_text(p), newline=""), strict=True)
        try:
            if reader.fieldnames is None or column not in reader.fieldnames:
                raise DataError(f"{path}: no column '{column}' (columns: {_short(reader.fieldnames)}); name the "
                                "prompt column with --column")
            width = len(reader.fieldnames)
            for row in reader:
                if None in row or any(v is None for v in row.values()):
                    n = len(row) - (None in row) + len(row.get(None, []))
                    raise DataError(f"{path}:{reader.line_num}: malformed CSV row ({n} fields, the header has "
                                    f"{width}); quote prompts that contain commas")
                out.append((normalise(row[column]), reader.line_num))
        except csv.Error as e:
            raise DataError(f"{path}:{reader.line_num}: malformed CSV ({e}); fix that line") from None
    else:
        out = [(normalise(line), n) for n, line in enumerate(_text(p).splitlines(), 1)]
    return [(x, n) for x, n in out if x]


def _json_item_positions(text: str, split: str | None) -> list[tuple[int, int]]:
    """(line, column) of every item of a JSON corpus's list (``split``'s list for a mapping), both
    1-based: for messages only, so the text is walked again with the standard decoder's ``raw_decode``."""
    dec = json.JSONDecoder()

    def ws(i: int) -> int:
        while i < len(text) and text[i] in " \t\r\n":
            i += 1
        return i

    def items(i: int) -> list[int]:  # offsets of the items of the list starting at text[i] == "["
        out, i = [], ws(i + 1)
        while i < len(text) and text[i] != "]":
            out.append(i)
            _, i = dec.raw_decode(text, i)
            i = ws(i)
            i = ws(i + 1) if i < len(text) and text[i] == "," else i
        return out

    i = ws(1 if text.startswith("\ufeff") else 0)
    offsets: list[int] = []
    if text[i:i + 1] == "[":
        offsets = items(i)
    elif text[i:i + 1] == "{":
        i = ws(i + 1)
        while i < len(text) and text[i] != "}":
            key, i = dec.raw_decode(text, i)
            i = ws(ws(i) + 1)  # the colon
            if key == split and text[i:i + 1] == "[":
                offsets = items(i)  # the last occurrence of a repeated key wins, as in json.loads
            _, i = dec.raw_decode(text, i)
            i = ws(i)
            i = ws(i + 1) if i < len(text) and text[i] == "," else i
    return [(text.count("\n", 0, o) + 1, o - (text.rfind("\n", 0, o) + 1) + 1) for o in offsets]


def locate(path: str | Path, split: str, n: int, column: str = "prompt") -> str:
    """Where prompt ``n`` (the number ``read_corpus_lines`` gives: a line, or a JSON item) of a corpus
    is, for messages: ``c.txt:7``, ``c.csv:7:2 (column 'prompt')``, ``c.json:12:5 (item 3 of 'train')``."""
    p = Path(path)
    suffix = p.suffix.lower()
    if suffix == ".json":
        try:
            pos = _json_item_positions(_text(p), split)
        except (ValueError, IndexError, RecursionError):
            pos = []
        where = f"{path}:{pos[n - 1][0]}:{pos[n - 1][1]}" if 0 < n <= len(pos) else f"{path}"
        return f"{where} (item {n} of {split!r})"
    if suffix == ".csv":
        header = next(csv.reader(io.StringIO(_text(p), newline="")), [])
        col = header.index(column) + 1 if column in header else 0
        return f"{path}:{n}:{col} (column {column!r})" if col else f"{path}:{n}"
    return f"{path}:{n}"


def check_encodable(path: str | Path, lines: list[tuple[str, int]], encoder, split: str = "train",
                    column: str = "prompt") -> None:
    """Refuse, naming the file and line, the first prompt ``encoder`` cannot encode (a bag of words has
    no word of some prompts): checked before any work, so a build or a run never stops half-way on it."""
    for prompt, n in lines:
        why = encoder.why_unencodable(prompt)
        if why is not None:
            raise DataError(f"{why}; the prompt {_short(prompt)} at {locate(path, split, n, column)} has none: "
                            "reword or delete it")


def _short(x, n: int = 60) -> str:
    r = repr(x)
    return r if len(r) <= n else r[:n] + "..."


class PromptSampler(Sampler):
    """Endless, exactly resumable batches of prompts for one rank.

    Epoch e is a permutation ``perm_e`` of the corpus (seeded by (seed, e)); rank r of W reads the
    positions r, r + W, ... of it. A run resumed on another number of processes continues the
    current epoch with the positions nobody has read yet (``remap``): ``skip`` holds the positions
    of epoch ``skip_epoch`` already read (a prefix length and the few read beyond it)."""

    info = None  # the encoder entry of embeddings its batches carry (ShardStream's manifest entry): none

    def __init__(self, prompts: list[str], batch_size: int, seed: int = 0, rank: int = 0, world_size: int = 1):
        if not prompts:
            raise DataError("no prompts to train on")
        self.prompts, self.batch_size = list(prompts), batch_size
        self.seed, self.rank, self.world_size = seed, rank, world_size
        self.epoch, self.cursor = 0, 0
        self.skip_epoch, self.skip_prefix, self.skip_extra = -1, 0, []
        self._order = self._epoch_order(0)

    def _perm(self, epoch: int) -> list[int]:
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
        return torch.randperm(len(self.prompts), generator=g).tolist()

    def _positions(self, epoch: int, rank: int, world: int, skip: tuple[int, int, list[int]]) -> list[int]:
        """Positions in ``perm_epoch`` that ``rank`` of ``world`` reads in ``epoch``."""
        skip_epoch, prefix, extra = skip
        n = len(self.prompts)
        if epoch == skip_epoch:
            gone = set(extra)
            remaining = [j for j in range(prefix, n) if j not in gone]
        else:
            remaining = list(range(n))
        mine = remaining[rank::world]
        if not mine and epoch != skip_epoch:
            mine = remaining[:1]  # more ranks than prompts: every rank still gets one
        return mine

    def _epoch_order(self, epoch: int) -> list[int]:
        perm = self._perm(epoch)
        skip = (self.skip_epoch, self.skip_prefix, self.skip_extra)
        return [perm[j] for j in self._positions(epoch, self.rank, self.world_size, skip)]

    def next_batch(self) -> Batch:
        out: list[int] = []
        while len(out) < self.batch_size:
            if self.cursor >= len(self._order):
                self.epoch, self.cursor = self.epoch + 1, 0
                self._order = self._epoch_order(self.epoch)
                continue
            take = self._order[self.cursor:self.cursor + self.batch_size - len(out)]
            out += take
            self.cursor += len(take)
        return Batch([self.prompts[i] for i in out], [str(i) for i in out])

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "cursor": self.cursor, "skip_epoch": self.skip_epoch,
                "skip_prefix": self.skip_prefix, "skip_extra": list(self.skip_extra)}

    def load_state_dict(self, state: dict) -> None:
        self.epoch, self.cursor = int(state["epoch"]), int(state["cursor"])
        self.skip_epoch = int(state.get("skip_epoch", -1))
        self.skip_prefix, self.skip_extra = int(state.get("skip_prefix", 0)), list(state.get("skip_extra", []))
        self._order = self._epoch_order(self.epoch)

    def remap(self, states: dict[str, dict], old_world: int) -> str:
        """Continue from the positions ``states`` of ``old_world`` ranks on this sampler's
        ``world_size``: the current epoch (the earliest any old rank is in) goes on with exactly the
        positions no old rank has read; later epochs start afresh, so the few prompts of the next epoch
        that ranks which had wrapped already read are read again. Returns what was done, in a sentence."""
        olds = [states[str(r)] for r in range(old_world)]
        e = min(int(st["epoch"]) for st in olds)
        n = len(self.prompts)
        read: set[int] = set()
        ahead = 0
        for r, st in enumerate(olds):
            skip = (int(st.get("skip_epoch", -1)), int(st.get("skip_prefix", 0)), list(st.get("skip_extra", [])))
            if skip[0] == e:
                read |= set(range(skip[1])) | set(skip[2])
            mine = self._positions(e, r, old_world, skip)
            read |= set(mine if int(st["epoch"]) > e else mine[:int(st["cursor"])])
            if int(st["epoch"]) > e:
                ahead += int(st["cursor"])
        prefix = 0
        while prefix < n and prefix in read:
            prefix += 1
        self.epoch, self.cursor = e, 0
        self.skip_epoch, self.skip_prefix, self.skip_extra = e, prefix, sorted(j for j in read if j >= prefix)
        self._order = self._epoch_order(e)
        return (f"data position mapped from {old_world} to {self.world_size} process(es): epoch {e} continues with "
                f"the {n - len(read)} of its {n} prompts no process has read yet"
                + (f"; {ahead} prompt(s) of epoch {e + 1} already read by processes that had wrapped will be read "
                   "again" if ahead else ""))


