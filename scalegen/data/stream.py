"""Streaming, exactly resumable prompt batches from webdataset shards.

Order (a pure function of seed, epoch and rank, never of the number of dataloader workers):

* epoch ``e`` of rank ``r`` of ``W``: train mode permutes the split's shards with a generator
  seeded by (seed, e) and takes ``perm[r::W]``, so in one epoch the ranks read disjoint shards
  whose union is the split; eval mode takes ``shards[r::W]`` in order, once, unshuffled.
* the shuffle buffer is a *group* of ``shuffle_shards`` consecutive shards of that list: their
  samples are permuted together by (seed, e, r, group). Memory is bounded by one group plus the
  workers' prefetch, whatever the corpus size (shards are key-sorted, so each one is already a
  random slice of the corpus).
* train mode is infinite (epoch after epoch, each reshuffled; our deterministic take on
  webdataset's ``resampled``: every sample once per epoch instead of shards drawn with
  replacement, which could not promise disjoint ranks or coverage).

Position: (epoch, group, offset) of the next sample. ``--resume`` restarts the reader at that
group (skipping earlier shards by the manifest's counts, without reading them), re-reads the
group, applies the same permutation and drops ``offset`` samples. Workers read whole shards:
worker ``w`` of ``K`` reads the ``w``-th, ``(w+K)``-th ... shard from the resume point and yields
one item per shard; the DataLoader returns items round-robin, i.e. in plan order, so the batches
are the same for any ``K``.

Shards come from local paths or any webdataset URL (``pipe:CMD`` streams a command's stdout,
e.g. ``data.shard_url='pipe:aws s3 cp s3://bucket/corpus/{name} -'``).
"""
from __future__ import annotations

import hashlib
import logging
import zlib
from pathlib import Path

import numpy as np
import torch

from scalegen.data.sampler import Batch, Sampler
from scalegen.data.shards import emb_layout, load_manifest
from scalegen.errors import DataError
from scalegen.text.base import TextCond

log = logging.getLogger("scalegen.data")


class ShardCorrupt(Exception):
    pass


def open_url(url: str):
    from webdataset.gopen import gopen  # noqa: PLC0415

    return gopen(url, "rb")


def read_shard(url: str, expected: int, info: dict | None, sha256: str | None = None) -> dict:
    """All samples of one shard as arrays: keys, prompts and (if stored) lens [n, V] int16,
    pooled [n, V, D] fp16, tokens [n, V, L, D] fp16. Raises ``ShardCorrupt`` when the bytes differ
    from the manifest's ``sha256`` (a flipped byte inside a record decodes as data otherwise), on a
    broken tar, or on a sample count or record size that differs from the manifest."""
    keys, prompts, embs = [], [], []
    try:
        stream = open_url(url)
    except Exception as e:  # noqa: BLE001 - missing file, failed command
        raise ShardCorrupt(f"cannot open: {e}") from None
    try:
        raw = stream.read()
    except OSError as e:
        raise ShardCorrupt(f"{e.__class__.__name__}: {e}") from None
    finally:
        try:
            stream.close()
        except Exception:  # noqa: BLE001, S110 - a pipe: command that failed reports on close
            pass
    if sha256 is not None and hashlib.sha256(raw).hexdigest() != sha256:
        raise ShardCorrupt("its sha256 differs from the manifest's (the file changed after it was built)")
    try:
        members = tar_members(raw)
        for name, start, size in members:
            key, _, ext = name.partition(".")
            if ext == "txt":
                keys.append(key)
                prompts.append(raw[start:start + size].decode())
            elif ext == "emb":
                embs.append((start, size))
            elif ext == "embz":
                embs.append(zlib.decompress(raw[start:start + size]))
    except (ShardCorrupt, zlib.error, UnicodeDecodeError, ValueError) as e:
        raise ShardCorrupt(f"{e.__class__.__name__}: {e}") from None
    if len(keys) != expected or (info is not None and len(embs) != expected):
        raise ShardCorrupt(f"{len(keys)} prompts and {len(embs)} embeddings, manifest says {expected}")
    out = {"keys": keys, "prompts": prompts}
    if info is not None and expected:
        v, d, ln, has_tok = emb_layout(info)
        width = 2 * (v + v * d + (v * ln * d if has_tok else 0))
        rows = np.empty((expected, width), np.uint8)  # one copy of the records, no intermediates
        src = np.frombuffer(raw, np.uint8)
        for i, e in enumerate(embs):
            if isinstance(e, bytes):
                if len(e) != width:
                    raise ShardCorrupt(f"embedding record {i} has {len(e)} bytes, expected {width}")
                rows[i] = np.frombuffer(e, np.uint8)
            else:
                if e[1] != width:
                    raise ShardCorrupt(f"embedding record {i} has {e[1]} bytes, expected {width}")
                rows[i] = src[e[0]:e[0] + width]
        out["lens"] = torch.from_numpy(rows[:, :2 * v].view(np.int16))
        out["pooled"] = torch.from_numpy(rows[:, 2 * v:2 * v * (1 + d)].view(np.float16)).unflatten(1, (v, d))
        if has_tok:
            out["tokens"] = torch.from_numpy(rows[:, 2 * v * (1 + d):].view(np.float16)).unflatten(1, (v, ln, d))
    return out


def tar_members(raw: bytes):
    """(name, start, size) of the regular files in a tar held in memory. Python's ``tarfile`` spends
    ~80 us per member on header parsing, which alone caps a loader at ~10k prompts/s; this walks
    ustar/pax headers directly, and verifies all header checksums at once with numpy."""
    pos, n, long_name = 0, len(raw), None
    out, heads, chks = [], [], []
    while pos + 512 <= n:
        if raw[pos] == 0 and raw.count(0, pos, pos + 512) == 512:
            break  # end-of-archive block
        try:
            size = int(raw[pos + 124:pos + 136].split(b"\0", 1)[0].strip() or b"0", 8)
            chks.append(int(raw[pos + 148:pos + 156].split(b"\0", 1)[0].strip() or b"0", 8))
        except ValueError:
            raise ShardCorrupt(f"unreadable tar header at byte {pos}") from None
        heads.append(pos)
        kind = raw[pos + 156]
        start, hdr, pos = pos + 512, pos, pos + 512 + (size + 511) // 512 * 512
        if start + size > n:
            raise ShardCorrupt(f"member at byte {start} runs past the end of the file (truncated)")
        if kind == 120:  # "x": pax header, may carry a long path for the next member
            for rec in raw[start:start + size].split(b"\n"):
                if b" path=" in rec:
                    long_name = rec.split(b" path=", 1)[1].decode()
            continue
        if kind == 76:  # "L": GNU long name
            long_name = raw[start:start + size].rstrip(b"\0").decode()
            continue
        if kind not in (48, 0):  # not a regular file
            long_name = None
            continue
        name = long_name or raw[hdr:hdr + 100].split(b"\0", 1)[0].decode()
        if long_name is None and raw[hdr + 257:hdr + 262] == b"ustar" and raw[hdr + 345]:
            name = raw[hdr + 345:hdr + 500].split(b"\0", 1)[0].decode() + "/" + name
        long_name = None
        out.append((name, start, size))
    else:
        raise ShardCorrupt("file ends inside a tar header (truncated)" if n % 512 else
                           "no end-of-archive marker (truncated)" if n else "empty file")
    if heads:
        blocks = np.frombuffer(raw, np.uint8, count=n // 512 * 512).reshape(-1, 512)[np.array(heads) // 512]
        got = blocks.sum(1, dtype=np.int64) - blocks[:, 148:156].sum(1, dtype=np.int64) + 256
        bad = np.nonzero(got != np.array(chks))[0]
        if len(bad):
            raise ShardCorrupt(f"bad tar header checksum at byte {heads[bad[0]]}")
    return out


class _Plan:
    """The shard sequence of one rank from a position on: (epoch, group, j, shard index)."""

    def __init__(self, n_shards: int, seed: int, rank: int, world_size: int, group: int, train: bool):
        if n_shards < world_size:
            raise DataError(f"{n_shards} shard(s) cannot be split over {world_size} ranks; rebuild with a smaller "
                            "--shard-size (at least one shard per rank)")
        self.n, self.seed, self.rank, self.world, self.group, self.train = n_shards, seed, rank, world_size, group, train
        self.skip_epoch = -1  # after a remap: the epoch whose already-read shards are skipped ...
        self.skip: set[int] = set()  # ... and those shards

    def shards(self, epoch: int, rank: int | None = None, world: int | None = None) -> list[int]:
        rank = self.rank if rank is None else rank
        world = self.world if world is None else world
        if not self.train:
            return list(range(self.n))[rank::world]
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
        perm = torch.randperm(self.n, generator=g).tolist()
        if epoch == self.skip_epoch:
            perm = [s for s in perm if s not in self.skip]
        return perm[rank::world]

    def groups(self, epoch: int, rank: int | None = None, world: int | None = None) -> list[list[int]]:
        s = self.shards(epoch, rank, world)
        return [s[i:i + self.group] for i in range(0, len(s), self.group)]

    def items(self, epoch: int, group: int):
        while True:
            gs = self.groups(epoch)
            for gi in range(group, len(gs)):
                for j, s in enumerate(gs[gi]):
                    yield epoch, gi, j, s
            if not self.train:
                return
            epoch, group = epoch + 1, 0

    def permutation(self, epoch: int, group: int, n: int) -> torch.Tensor:
        if not self.train:
            return torch.arange(n)
        g = torch.Generator().manual_seed(((self.seed * 1_000_003 + epoch) * 10_007 + self.rank) * 1_000_033 + group)
        return torch.randperm(n, generator=g)


class _Reader(torch.utils.data.IterableDataset):
    """Reads the plan's shards; worker w of K takes items w, w + K, ... (one output item each)."""

    def __init__(self, plan: _Plan, urls: list[str], counts: list[int], shas: list[str | None], info: dict | None,
                 start: tuple[int, int]):
        self.plan, self.urls, self.counts, self.shas, self.info, self.start = plan, urls, counts, shas, info, start

    def __iter__(self):
        wi = torch.utils.data.get_worker_info()
        w, k = (wi.id, wi.num_workers) if wi is not None else (0, 1)
        for i, (epoch, group, j, s) in enumerate(self.plan.items(*self.start)):
            if i % k != w:
                continue
            try:
                data, err = read_shard(self.urls[s], self.counts[s], self.info, self.shas[s]), None
            except ShardCorrupt as e:
                data, err = None, str(e)
            yield {"epoch": epoch, "group": group, "j": j, "shard": s, "data": data, "error": err}


def _cat(parts: list[dict], info: dict | None) -> dict:
    out = {"keys": [k for p in parts for k in p["keys"]], "prompts": [x for p in parts for x in p["prompts"]]}
    for name in ("lens", "pooled", "tokens"):
        if parts and name in parts[0]:
            out[name] = torch.cat([p[name] for p in parts])
    return out


class ShardStream(Sampler):
    """Batches of ``batch_size`` prompts for one rank; ``next_batch()`` / iteration, ``state_dict()``.

    ``mode="train"``: infinite, shuffled, ranks disjoint within an epoch. ``mode="eval"``: one
    exact pass over this rank's shards in order (the last batch may be short)."""

    def __init__(self, source: str, split: str = "train", batch_size: int = 8, seed: int = 0, rank: int = 0,
                 world_size: int = 1, mode: str = "train", shuffle_shards: int = 4, num_workers: int = 0,
                 on_corrupt: str = "fail", url: str | None = None, verify: bool = True):
        if mode not in ("train", "eval"):
            raise DataError(f"stream mode must be train or eval, not '{mode}'")
        if on_corrupt not in ("fail", "skip"):
            raise DataError(f"data.on_corrupt must be fail or skip, not '{on_corrupt}'")
        self.source = source
        self.manifest, base = load_manifest(source)
        splits = self.manifest["splits"]
        if split not in splits:
            raise DataError(f"shards in '{source}' have no split {split!r} (they have {', '.join(map(repr, splits))}); "
                            "set data.split (--split on a command line) to one of them")
        shards = splits[split]["shards"]
        self.info = self.manifest.get("encoder")
        self.count = splits[split]["count"]
        self.counts = [s["count"] for s in shards]
        # every shard's bytes are checked against the manifest as they stream (verify=False: benchmarks only)
        self.shas = [s["sha256"] if verify else None for s in shards]
        self.urls = [url.format(name=s["name"], split=split, base=base) if url else str(Path(base) / s["name"])
                     for s in shards]
        self.batch_size, self.num_workers, self.on_corrupt = batch_size, num_workers, on_corrupt
        self.plan = _Plan(len(shards), seed, rank, world_size, max(1, shuffle_shards), mode == "train")
        self.epoch = self.group = self.offset = 0
        self.n_corrupt = 0  # shards skipped (on_corrupt=skip)
        self._items = None
        self._cur: dict | None = None  # the current group, permuted
        self._cur_pos: tuple[int, int] | None = None
        self._pending = None  # an item read ahead (first shard of the next group)

    # --- position ---------------------------------------------------------------------------
    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "group": self.group, "offset": self.offset, "n_corrupt": self.n_corrupt,
                "skip_epoch": self.plan.skip_epoch, "skip_shards": sorted(self.plan.skip)}

    def load_state_dict(self, state: dict) -> None:
        if "group" not in state:
            raise DataError("the checkpoint's data position is from the in-memory prompt sampler, not from shards; "
                            "resume with the data settings the run started with")
        self.epoch, self.group, self.offset = int(state["epoch"]), int(state["group"]), int(state["offset"])
        self.n_corrupt = int(state.get("n_corrupt", 0))
        self.plan.skip_epoch, self.plan.skip = int(state.get("skip_epoch", -1)), set(state.get("skip_shards", []))
        self._reset()

    def remap(self, states: dict[str, dict], old_world: int) -> str:
        """Continue from the positions ``states`` of ``old_world`` ranks on this stream's world size:
        the current epoch (the earliest any old rank is in) goes on with the shards no old rank has
        finished (a shard group an old rank was in the middle of is read again from its start; no shard
        is skipped); later epochs start afresh. Returns what was done, in a sentence."""
        olds = [states[str(r)] for r in range(old_world)]
        e = min(int(st["epoch"]) for st in olds)
        done: set[int] = set()
        partial = 0
        for r, st in enumerate(olds):
            self.plan.skip_epoch = int(st.get("skip_epoch", -1))
            self.plan.skip = set(st.get("skip_shards", []))
            if self.plan.skip_epoch == e:
                done |= self.plan.skip
            groups = self.plan.groups(e, r, old_world)
            finished = groups if int(st["epoch"]) > e else groups[:int(st["group"])]
            done |= {s for g in finished for s in g}
            if int(st["epoch"]) == e and int(st["offset"]) > 0:
                partial += int(st["offset"])
        self.plan.skip_epoch, self.plan.skip = e, done
        self.epoch, self.group, self.offset = e, 0, 0
        self.n_corrupt = sum(int(st.get("n_corrupt", 0)) for st in olds)
        self._reset()
        left = self.plan.n - len(done)
        return (f"data position mapped from {old_world} to {self.plan.world} process(es): epoch {e} continues with "
                f"the {left} of its {self.plan.n} shards no process had finished"
                + (f"; {partial} sample(s) of shard groups that processes were in the middle of will be read again"
                   if partial else ""))

    def _reset(self) -> None:
        self._items, self._cur, self._cur_pos, self._pending = None, None, None, None

    # --- reading ----------------------------------------------------------------------------
    def _start_items(self):
        reader = _Reader(self.plan, self.urls, self.counts, self.shas, self.info, (self.epoch, self.group))
        if self.num_workers > 0:
            # Its own generator: a DataLoader otherwise draws its workers' base seed from the run's RNG when
            # it starts, which a resumed run does at another point of the stream (the reader needs no seed).
            loader = torch.utils.data.DataLoader(reader, batch_size=None, num_workers=self.num_workers,
                                                 prefetch_factor=2, persistent_workers=False,
                                                 generator=torch.Generator().manual_seed(0))
            return iter(loader)
        return iter(reader)

    def _next_item(self):
        if self._pending is not None:
            it, self._pending = self._pending, None
            return it
        return next(self._items, None)

    def _load_group(self) -> bool:
        """Read the group at (epoch, group) into ``_cur``; False at the end of an eval pass."""
        if self._items is None:
            self._items = self._start_items()
        parts = []
        want = None
        while True:
            it = self._next_item()
            if it is None:
                break
            pos = (int(it["epoch"]), int(it["group"]))
            if want is None:
                want = pos
            elif pos != want:
                self._pending = it
                break
            if it["error"] is not None:
                msg = f"shard '{self.urls[int(it['shard'])]}' is corrupt or truncated ({it['error']})"
                if self.on_corrupt == "fail":
                    raise DataError(f"{msg}; rerun the same `scalegen data build` to rewrite it, or set "
                                    "data.on_corrupt=skip to skip bad shards")
                self.n_corrupt += 1
                log.warning("%s: skipped (%d corrupt shard(s) skipped so far)", msg, self.n_corrupt)
                continue
            parts.append(it["data"])
        if want is None:
            return False
        data = _cat(parts, self.info) if parts else {"keys": [], "prompts": []}
        perm = self.plan.permutation(*want, len(data["keys"]))
        order = perm.tolist()
        self._cur = {"keys": [data["keys"][i] for i in order], "prompts": [data["prompts"][i] for i in order],
                     **{k: data[k][perm] for k in ("lens", "pooled", "tokens") if k in data}}
        if want != (self.epoch, self.group):  # the previous group was finished: start at this one
            self.epoch, self.group = want
            self.offset = 0
        self._cur_pos = want
        return True

    def next_batch(self) -> Batch | None:
        """The next batch, or None after the last one of an eval pass."""
        chunks = []
        need = self.batch_size
        empty = 0  # groups in a row that held nothing (all their shards skipped as corrupt)
        while need > 0:
            if self._cur is None or self.offset >= len(self._cur["keys"]):
                if self._cur is not None:  # move past the finished group
                    self._cur = None
                    self.offset = 0
                    gs = self.plan.groups(self.epoch)
                    if self.group + 1 < len(gs):
                        self.group += 1
                    elif self.plan.train:
                        self.epoch, self.group = self.epoch + 1, 0
                    else:
                        self.group += 1
                if not self._load_group():
                    break
                empty = empty + 1 if not self._cur["keys"] else 0
                if empty > len(self.plan.groups(self.epoch)):
                    raise DataError(f"every shard of this rank in '{self.source}' is corrupt; rebuild the shards")
                continue
            take = min(need, len(self._cur["keys"]) - self.offset)
            sl = slice(self.offset, self.offset + take)
            chunks.append({k: v[sl] for k, v in self._cur.items()})
            self.offset += take
            need -= take
        if not chunks:
            return None
        return self._collate(chunks)

    def _collate(self, chunks: list[dict]) -> Batch:
        prompts = [p for c in chunks for p in c["prompts"]]
        keys = [k for c in chunks for k in c["keys"]]
        cond = variants = None
        if self.info is not None:
            pooled = torch.cat([c["pooled"] for c in chunks]).float()
            lens = torch.cat([c["lens"] for c in chunks]).long()
            v, d, ln, has_tok = emb_layout(self.info)
            if has_tok:
                tokens = torch.cat([c["tokens"] for c in chunks]).float()
            else:  # pooled-only shards: one token (the pooled vector) for cross-attention consumers
                tokens = pooled[:, :, None, :]
            mask = torch.arange(tokens.shape[2])[None, :] < lens[:, :1]
            cond = TextCond(pooled=pooled[:, 0].contiguous(), tokens=tokens[:, 0].contiguous(), mask=mask)
            if has_tok and v > 1:
                variants = tokens
        return Batch(prompts, keys, cond, variants)

    def __iter__(self):
        while True:
            b = self.next_batch()
            if b is None:
                return
            yield b

    def first_prompts(self, n: int) -> list[str]:
        """The first ``n`` prompts of the split's first shard (validation grids), without moving."""
        data = read_shard(self.urls[0], self.counts[0], None)
        return data["prompts"][:n]


def check_shards(source: str, url: str | None = None) -> tuple[int, list[tuple[str, str]]]:
    """Verify every shard of a ``scalegen data build`` folder against its manifest: the file's
    sha256, its record count, and every record decoding with the manifest's shapes. Returns
    (shards checked, [(shard url, what is wrong)])."""
    manifest, base = load_manifest(source)
    info = manifest.get("encoder")
    bad, n = [], 0
    for split, sp in manifest["splits"].items():
        for sh in sp["shards"]:
            n += 1
            where = url.format(name=sh["name"], split=split, base=base) if url else str(Path(base) / sh["name"])
            try:
                data = read_shard(where, sh["count"], info, sh["sha256"])
            except ShardCorrupt as e:
                bad.append((where, str(e)))
                continue
            if info is not None and sh["count"]:
                _, _, ln, has_tok = emb_layout(info)
                lens = data["lens"].long()
                if (lens < 0).any() or (lens > ln).any():
                    bad.append((where, f"token counts outside [0, {ln}]"))
    return n, bad
