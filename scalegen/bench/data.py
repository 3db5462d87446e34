"""Shard building and streaming at 1k / 10k / 100k prompts: ``scalegen bench data [--json FILE]``.

For every corpus size: compose an ATT3D-style corpus, build shards with cached embeddings (offline
bag-of-words; tiny random CLIP), then stream a fixed number of prompts through the training-side
loader (``ShardStream``, train mode, 0 workers: everything in the measured process) in a fresh
subprocess per size, which reports prompts/s and its peak RSS (``ru_maxrss``). A last part writes
random fp16 embeddings of the real SD 2.1 shapes (pooled 1024 + 77 x 1024) and streams them the
same way, and measures the store / recompute / compress trade-off. Every stream is measured twice:
with each shard's sha256 checked against the manifest (what training does) and without, so the
cost of the check is its own column.

Options: ``DataOptions`` (``bench.sizes=[1000,10000] bench.stream=50000 ...``).
"""
from __future__ import annotations

import json
import resource
import shutil
import subprocess
import sys
import time
import zlib
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch


@dataclass
class DataOptions:
    sizes: list[int] = field(default_factory=lambda: [1000, 10000, 100000])  # corpora with bag-of-words shards
    clip_sizes: list[int] = field(default_factory=lambda: [1000, 10000, 100000])  # ... with tiny-CLIP shards
    sd_sizes: list[int] = field(default_factory=lambda: [2000, 16000])  # random SD 2.1-shaped embeddings
    stream: int = 200_000  # prompts streamed per measurement
    sd_stream: int = 4000
    batch: int = 64
    shard_size: int = 250
    repeats: int = 3  # streams per case, verified and unverified alternately; medians reported (load from other jobs)
    workdir: str = ""  # default: OUT/data (--out)
    keep: bool = False  # keep the shards afterwards


def stream_in_subprocess(shards: str, n: int, batch: int, shuffle_shards: int = 4, verify: bool = True) -> dict:
    """Peak RSS and prompts/s of a fresh process that streams ``n`` prompts (``verify``: each shard's
    sha256 checked against the manifest, as training does)."""
    cmd = [sys.executable, "-m", "scalegen.bench.data", shards, str(n), str(batch), str(shuffle_shards), str(int(verify))]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True, env=_env()).stdout
    return json.loads(out.strip().splitlines()[-1])


def _streams(shards: str, n: int, batch: int, repeats: int) -> tuple[dict, dict]:
    """(verified, unverified) stream measurements, run alternately ``repeats`` times each so load from
    other jobs hits both alike; each is the run with the median prompts/s."""
    on, off = [], []
    for _ in range(max(repeats, 1)):
        on.append(stream_in_subprocess(shards, n, batch))
        off.append(stream_in_subprocess(shards, n, batch, verify=False))
    med = lambda runs: sorted(runs, key=lambda r: r["prompts_per_s"])[len(runs) // 2]  # noqa: E731
    return {**med(on), "prompts_per_s_runs": [r["prompts_per_s"] for r in on]}, \
        {**med(off), "prompts_per_s_runs": [r["prompts_per_s"] for r in off]}


def _env() -> dict:
    import os  # noqa: PLC0415

    root = str(Path(__file__).resolve().parents[2])
    return {**os.environ, "PYTHONPATH": root + ":" + os.environ.get("PYTHONPATH", ""), "OMP_NUM_THREADS": "1"}


def _stream_main(shards: str, n: int, batch: int, shuffle_shards: int, verify: bool) -> None:
    from scalegen.data.stream import ShardStream  # noqa: PLC0415

    torch.set_num_threads(1)
    rss0 = _hwm_mb()
    s = ShardStream(shards, "train", batch_size=batch, seed=0, shuffle_shards=shuffle_shards, verify=verify)
    s.next_batch()  # warm-up: imports, first group
    got, t0 = 0, time.perf_counter()
    checksum = 0.0
    while got < n:
        b = s.next_batch()
        got += len(b.prompts)
        if b.cond is not None:
            checksum += float(b.cond.pooled[0, 0])  # touch the data
    dt = time.perf_counter() - t0
    print(json.dumps({"prompts_per_s": got / dt, "peak_rss_mb": _hwm_mb(), "rss_before_loader_mb": rss0,
                      "streamed": got, "seconds": dt}))


def _hwm_mb() -> float:
    """Peak RSS of this process (VmHWM). Not ``ru_maxrss``: Linux carries that across fork + exec, so
    a child started from a big parent would report the parent's size."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _build(corpus: Path, out: Path, encoder, store: str, shard_size: int, compress: str = "none") -> dict:
    from scalegen.data.shards import build_shards, write_manifest  # noqa: PLC0415

    t0 = time.perf_counter()
    res = build_shards(str(corpus), out, encoder, shard_size=shard_size, splits=["train"], store=store,
                       compress=compress, log=lambda m: None)
    m = write_manifest(str(corpus), out, res["plans"], res["report"], res["encoder"])
    dt = time.perf_counter() - t0
    n = m["splits"]["train"]["count"]
    nbytes = sum(s["bytes"] for s in m["splits"]["train"]["shards"])
    return {"build_prompts_per_s": n / dt, "bytes_per_prompt": nbytes / n, "disk_mb": nbytes / 2**20}


def _sd_shards(out: Path, n: int, shard_size: int = 64) -> dict:
    """Random fp16 embeddings of SD 2.1's text tower (pooled 1024, tokens 77 x 1024), plain store."""
    from scalegen.data.compose import compose_corpus  # noqa: PLC0415
    from scalegen.data.shards import FORMAT, write_shard  # noqa: PLC0415

    info = {"id": "random-sd21-shapes", "dim": 1024, "tokens": 77, "store": "plain", "views": [],
            "compress": "none", "dtype": "float16", "config_hash": "random"}
    prompts = sorted(compose_corpus(n_train=n, n_val=10)["train"])
    out.mkdir(parents=True, exist_ok=True)
    (out / "train").mkdir(exist_ok=True)
    rng = np.random.default_rng(0)
    shards = []
    t0 = time.perf_counter()
    for i in range(0, n, shard_size):
        ps = prompts[i:i + shard_size]
        rec = [np.full(1, 77, np.int16).tobytes() + rng.standard_normal(1024 + 77 * 1024).astype(np.float16).tobytes()
               for _ in ps]
        path = out / "train" / f"shard-{i // shard_size:06d}.tar"
        side = write_shard(path, ps, rec, info)
        shards.append({"name": f"train/{path.name}", "count": len(ps), "bytes": side["bytes"], "sha256": side["sha256"]})
    (out / "manifest.json").write_text(json.dumps({"format": FORMAT, "corpus": "composed", "encoder": info,
                                                   "splits": {"train": {"count": n, "shards": shards}}}))
    nbytes = sum(s["bytes"] for s in shards)
    return {"write_s": time.perf_counter() - t0, "bytes_per_prompt": nbytes / n, "disk_mb": nbytes / 2**20}


def _tradeoff(clip_dir: Path) -> dict:
    """Bytes per prompt by store choice at SD 2.1 shapes (exact layout arithmetic), zlib ratios
    measured on tiny-CLIP and random fp16 embeddings, and the cost of recomputing with tiny CLIP."""
    from scalegen.data.shards import emb_nbytes  # noqa: PLC0415
    from scalegen.text.clip import CLIPTextEncoder  # noqa: PLC0415

    sizes = {s: emb_nbytes({"store": s, "dim": 1024, "tokens": 77}) for s in ("pooled", "plain", "views")}
    enc = CLIPTextEncoder(str(clip_dir))
    prompts = [f"a {c} robot holding a {o}" for c in ("red", "blue", "green", "gold") for o in ("cup", "book", "lamp", "shovel")]
    toks = enc.encode(prompts).tokens.half().numpy()
    ratio_clip = len(zlib.compress(toks.tobytes(), 1)) / toks.nbytes
    rnd = np.random.default_rng(0).standard_normal(toks.size).astype(np.float16)
    ratio_rand = len(zlib.compress(rnd.tobytes(), 1)) / rnd.nbytes
    t0 = time.perf_counter()
    for _ in range(3):
        enc.encode(prompts * 4)
    recompute = (time.perf_counter() - t0) / (3 * 64)
    t0 = time.perf_counter()
    for _ in range(20):
        zlib.decompress(zlib.compress(toks.tobytes(), 1))
    return {"bytes_per_prompt_sd21": sizes, "gb_per_100k": {k: v * 1e5 / 1e9 for k, v in sizes.items()},
            "zlib_ratio_tiny_clip": ratio_clip, "zlib_ratio_random": ratio_rand,
            "tiny_clip_encode_ms_per_string": recompute * 1000}


def bench_data(opts: DataOptions, overrides: list[str], out_root: str = "runs/bench") -> dict:
    from scalegen.data.compose import compose_corpus  # noqa: PLC0415
    from scalegen.text.bow import BagOfWordsEncoder  # noqa: PLC0415
    from scalegen.text.clip import CLIPTextEncoder, make_tiny_clip  # noqa: PLC0415

    if overrides:
        from scalegen.errors import ConfigError  # noqa: PLC0415

        raise ConfigError(f"`scalegen bench data` runs no training config, so '{overrides[0]}' means nothing here; "
                          "its options are bench.<name>=value (scalegen/bench/data.py DataOptions)")
    o = asdict(opts)
    o["workdir"] = o["workdir"] or str(Path(out_root) / "data")
    work = Path(o["workdir"])
    work.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(1)
    res: dict = {"machine": "2-core CPU, shared with other jobs", "options": o}
    corpus = work / "corpus.json"
    clip_dir = work / "tiny-clip"
    if not (clip_dir / "text_encoder").is_dir():
        make_tiny_clip(clip_dir)
    clip = CLIPTextEncoder(str(clip_dir))
    rows = []
    for n in sorted(set(o["sizes"]) | set(o["clip_sizes"])):
        corpus.write_text(json.dumps({"train": compose_corpus(n_train=n, n_val=10)["train"]}))
        for name, enc, store, sizes in (("bow", BagOfWordsEncoder(), "plain", o["sizes"]),
                                        ("tiny-clip", clip, "views", o["clip_sizes"])):
            if n not in sizes:
                continue
            d = work / f"{name}-{n}"
            if d.exists():
                shutil.rmtree(d)
            b = _build(corpus, d, enc, store, shard_size=o["shard_size"])
            s, s_off = _streams(str(d), o["stream"], o["batch"], o["repeats"])
            r = {"prompts": n, "encoder": name, "store": store, **b, **s,
                 "prompts_per_s_unverified": s_off["prompts_per_s"]}
            rows.append(r)
            if name == "bow":
                res[str(n)] = {"peak_rss_mb": s["peak_rss_mb"], "prompts_per_s": s["prompts_per_s"],
                               "prompts_per_s_unverified": s_off["prompts_per_s"],
                               "build_prompts_per_s": b["build_prompts_per_s"], "disk_mb": b["disk_mb"]}
            if not o["keep"]:
                shutil.rmtree(d)
    res["rows"] = rows
    sd_rows = []
    for n in o["sd_sizes"]:
        d = work / f"sd21-{n}"
        if d.exists():
            shutil.rmtree(d)
        w = _sd_shards(d, n)
        s, s_off = _streams(str(d), o["sd_stream"], 8, o["repeats"])
        sd_rows.append({"prompts": n, **w, **s, "prompts_per_s_unverified": s_off["prompts_per_s"]})
        if not o["keep"]:
            shutil.rmtree(d)
    res["sd21_shapes"] = sd_rows
    res["tradeoff"] = _tradeoff(clip_dir)

    from scalegen.eval.report import format_table as _table  # noqa: PLC0415

    print(_table([[r["encoder"], r["prompts"], r["store"], r["build_prompts_per_s"], r["bytes_per_prompt"],
                   r["prompts_per_s"], r["prompts_per_s_unverified"], r["peak_rss_mb"], r["rss_before_loader_mb"]]
                  for r in rows],
                 ["encoder", "prompts", "store", "build prompts/s", "bytes/prompt", "stream prompts/s",
                  "without sha256", "peak RSS MB", "RSS before loader"]))
    print(_table([["random SD 2.1 shapes", r["prompts"], r["disk_mb"], r["prompts_per_s"],
                   r["prompts_per_s_unverified"], r["peak_rss_mb"], r["rss_before_loader_mb"]] for r in sd_rows],
                 ["embeddings", "prompts", "disk MB", "stream prompts/s", "without sha256", "peak RSS MB",
                  "RSS before loader"]))
    t = res["tradeoff"]
    print(_table([[k, v, t["gb_per_100k"][k]] for k, v in t["bytes_per_prompt_sd21"].items()],
                 ["store (SD 2.1 shapes)", "bytes/prompt", "GB per 100k prompts"]))
    print(f"zlib level 1 keeps {t['zlib_ratio_tiny_clip']:.0%} of tiny-CLIP fp16 tokens and {t['zlib_ratio_random']:.0%} "
          f"of random fp16; tiny CLIP re-encodes a string in {t['tiny_clip_encode_ms_per_string']:.2f} ms on this CPU")
    return res


if __name__ == "__main__":
    _stream_main(sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]), bool(int(sys.argv[5])))
