"""Shards: real corpora round-trip, exact resume (any worker count), disjoint ranks, bad input."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import TINY, shared_path
from scalegen.data.compose import ACTIVITIES, SUBJECTS, compose_corpus
from scalegen.data.prompts import read_corpus
from scalegen.data.shards import build_shards, check_encoder, load_manifest, prompt_key, write_manifest
from scalegen.data.stream import ShardStream, read_shard
from scalegen.errors import DataError
from scalegen.text.bow import BagOfWordsEncoder

ROOT = Path(__file__).resolve().parents[1]


def _build(corpus, out, encoder=None, **kw):
    res = build_shards(str(corpus), out, encoder, log=lambda m: None, **kw)
    write_manifest(str(corpus), out, res["plans"], res["report"], res["encoder"])
    return res


def _all(stream):
    keys, prompts = [], []
    for b in stream:
        keys += b.keys
        prompts += b.prompts
    return keys, prompts


@pytest.mark.parametrize("name", ["magic3d_15", "dreamfusion_415", "att3d_2520"])
def test_real_corpora_round_trip(name, tmp_path):
    corpus = shared_path("corpora", f"{name}_prompt_library.json")
    raw = json.loads(corpus.read_text())
    _build(corpus, tmp_path, shard_size=200)
    manifest, _ = load_manifest(tmp_path)
    assert set(manifest["splits"]) == set(raw)
    for split, items in raw.items():
        want = list(dict.fromkeys(" ".join(x.split()) for x in items))
        assert manifest["splits"][split]["count"] == len(want)
        assert manifest["report"][split]["duplicates"] == len(items) - len(want)
        keys, prompts = _all(ShardStream(str(tmp_path), split, batch_size=64, mode="eval"))
        assert sorted(prompts) == sorted(want) and keys == [prompt_key(p) for p in prompts]
    if name == "att3d_2520":  # the 56 unseen combinations survive as their own split
        assert manifest["splits"]["val"]["count"] == 56
        assert not set(raw["val"]) & set(raw["train"])


@pytest.fixture(scope="module")
def corpus_shards(tmp_path_factory):
    d = tmp_path_factory.mktemp("shards")
    corpus = d / "c.json"
    corpus.write_text(json.dumps(compose_corpus(n_train=1000, n_val=50, seed=1)))
    _build(corpus, d / "out", BagOfWordsEncoder(16, 8), shard_size=64, store="plain")
    return d / "out"


def _batches(stream, n):
    return [stream.next_batch().keys for _ in range(n)]


def test_resume_gives_the_same_batches_with_any_worker_count(corpus_shards):
    kw = dict(split="train", batch_size=24, seed=3, shuffle_shards=3)
    full = _batches(ShardStream(str(corpus_shards), **kw), 60)  # 1440 samples: past one epoch (1000)
    assert len({k for b in full[:41] for k in b}) == 984  # every sample once per epoch (41 full batches)
    assert _batches(ShardStream(str(corpus_shards), num_workers=2, **kw), 60) == full
    first = ShardStream(str(corpus_shards), **kw)
    _batches(first, 37)
    state = json.loads(json.dumps(first.state_dict()))  # through the checkpoint's JSON
    resumed = ShardStream(str(corpus_shards), num_workers=3, **kw)
    resumed.load_state_dict(state)
    assert _batches(resumed, 23) == full[37:]


def test_reading_through_workers_leaves_the_run_rng_alone(corpus_shards):
    """Starting the worker DataLoader must not draw from the global RNG: a resumed run starts it at another
    point of its random stream than the uninterrupted run did, so a draw there shifts every later step's
    noise and timesteps (found by `bench paper-step` on conv3d_asd_cp100k_shards)."""
    torch.manual_seed(5)
    ShardStream(str(corpus_shards), split="train", batch_size=4, num_workers=2).next_batch()
    after = torch.rand(3)
    torch.manual_seed(5)
    assert torch.equal(after, torch.rand(3))


def test_cached_embeddings_match_the_encoder(corpus_shards):
    b = ShardStream(str(corpus_shards), batch_size=8).next_batch()
    ref = BagOfWordsEncoder(16, 8).encode(b.prompts)
    assert torch.equal(b.cond.mask, ref.mask)
    assert torch.allclose(b.cond.tokens, ref.tokens, atol=2e-3) and torch.allclose(b.cond.pooled, ref.pooled, atol=2e-3)


def test_pipe_urls_and_encoder_mismatch(corpus_shards):
    s = ShardStream(str(corpus_shards), "val", batch_size=16, mode="eval", url="pipe:cat {base}/{name}")
    assert len(_all(s)[0]) == 50
    check_encoder(s.manifest, BagOfWordsEncoder(16, 8), "x")
    with pytest.raises(DataError, match="text encoder 'bow-v1-d16-l8' but this run uses 'bow-v1-d32-l8'"):
        check_encoder(s.manifest, BagOfWordsEncoder(32, 8), "x")


def test_two_ranks_split_an_epoch_disjointly(corpus_shards, tmp_path):
    """Two processes (gloo): in one epoch the ranks see disjoint prompts whose union is the split."""
    script = tmp_path / "ranks.py"
    script.write_text(f"""
import json, os, sys, torch.distributed as dist
from scalegen.data.stream import ShardStream
dist.init_process_group("gloo")
r, w = dist.get_rank(), dist.get_world_size()
out = {{}}
s = ShardStream({str(corpus_shards)!r}, "train", batch_size=10, seed=5, rank=r, world_size=w, mode="eval")
out["eval"] = [k for b in s for k in b.keys]
s = ShardStream({str(corpus_shards)!r}, "train", batch_size=10, seed=5, rank=r, world_size=w)
n = sum(s.counts[i] for i in s.plan.shards(0))  # this rank's share of epoch 0
keys = []
while len(keys) < n:
    keys += s.next_batch().keys
out["train"] = keys[:n]
got = [None] * w
dist.all_gather_object(got, out)
if r == 0:
    json.dump(got, open({str(tmp_path / 'got.json')!r}, "w"))
dist.destroy_process_group()
""")
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_port=29533",
                    str(script)], check=True, env=env, cwd=tmp_path, capture_output=True, timeout=120)
    got = json.loads((tmp_path / "got.json").read_text())
    split = {prompt_key(p) for p in read_corpus(corpus_shards.parent / "c.json", "train")}
    a, b = set(got[0]["eval"]), set(got[1]["eval"])
    assert not a & b and a | b == split and len(got[0]["eval"]) + len(got[1]["eval"]) == len(split)
    a, b = set(got[0]["train"]), set(got[1]["train"])  # shuffled training epoch 0
    assert not a & b and a | b == split and len(got[0]["train"]) + len(got[1]["train"]) == len(split)


test_two_ranks_split_an_epoch_disjointly = pytest.mark.distributed(test_two_ranks_split_an_epoch_disjointly)


def test_corrupt_shards_fail_or_are_skipped(corpus_shards, tmp_path, caplog):
    import shutil

    d = tmp_path / "copy"
    shutil.copytree(corpus_shards, d)
    bad = d / "train" / "shard-000002.tar"
    bad.write_bytes(bad.read_bytes()[:5000])  # truncated mid-member
    with pytest.raises(DataError, match="shard-000002.tar' is corrupt or truncated.*data.on_corrupt=skip"):
        _all(ShardStream(str(d), batch_size=50, mode="eval"))
    s = ShardStream(str(d), batch_size=50, mode="eval", on_corrupt="skip")
    assert len(_all(s)[0]) == 1000 - 64 and s.n_corrupt == 1
    # Rerunning the build rewrites only the damaged shard, and the result matches the original.
    res = build_shards(str(corpus_shards.parent / "c.json"), d, BagOfWordsEncoder(16, 8), shard_size=64,
                       store="plain", log=lambda m: None)
    assert res["written"] == 1
    m = write_manifest(str(corpus_shards.parent / "c.json"), d, res["plans"], res["report"], res["encoder"])
    assert m["splits"] == load_manifest(corpus_shards)[0]["splits"]


def test_build_in_two_processes_equals_one(corpus_shards, tmp_path):
    corpus = str(corpus_shards.parent / "c.json")
    for p in (1, 0):
        res = build_shards(corpus, tmp_path, BagOfWordsEncoder(16, 8), shard_size=64, store="plain",
                           process_index=p, num_processes=2, log=lambda m: None)
        assert 0 < res["written"] < 17
    m = write_manifest(corpus, tmp_path, res["plans"], res["report"], res["encoder"])
    assert m["splits"] == load_manifest(corpus_shards)[0]["splits"]


def test_bad_corpus_lines_are_named(tmp_path):
    j = tmp_path / "c.json"
    j.write_text('{"train": [\n "a",\n "b" "c"\n]}')
    with pytest.raises(DataError, match=r"c.json:3:6: invalid JSON"):  # line and column
        read_corpus(j)
    c = tmp_path / "c.csv"
    c.write_text('id,prompt\n1,a red cube\n2,a blue, sphere\n')
    with pytest.raises(DataError, match=r"c.csv:3: malformed CSV row"):
        read_corpus(c)
    t = tmp_path / "c.txt"
    t.write_text("a red cube\n\n  a   red cube \na blue sphere\n")
    res = build_shards(str(t), tmp_path / "o", BagOfWordsEncoder(16, 1), shard_size=10, log=lambda m: None)
    r = res["report"]["splits"]["train"]
    assert (r["read"], r["kept"], r["duplicates"], r["over_limit"]) == (3, 2, 1, 2)
    assert r["duplicate_examples"][0]["line"] == 3


def test_compose_is_deterministic_with_unseen_pairs():
    a = compose_corpus(n_train=100_000, n_val=500, seed=7)
    assert len(set(a["train"])) == 100_000 and a == compose_corpus(n_train=100_000, n_val=500, seed=7)
    assert a["train"][:50] != compose_corpus(n_train=100_000, n_val=500, seed=8)["train"][:50]
    held = [tuple(x.split(" | ")) for x in a["unseen_pairs"]]
    assert len(held) == 20 and not set(a["val"]) & set(a["train"])
    seen_text = "\n".join(a["train"])
    for s, act in held:
        assert f"{s} {act}" not in seen_text  # the pair never co-occurs in training ...
        assert f" {s} " in seen_text and act in seen_text  # ... while both parts do
    assert all(any(f"{s} {act}" in p for s, act in held) for p in a["val"])
    assert {s for s in SUBJECTS if f" {s} " in seen_text} == set(SUBJECTS)
    assert all(act in seen_text for act in ACTIVITIES)


def test_training_on_shards_resumes_exactly_with_other_workers(tmp_path, monkeypatch):
    """The loop reads cached embeddings from shards and --resume continues with the next batches."""
    from scalegen.config import load_config
    from scalegen.priors import build_world
    import scalegen.train.loop as loop

    world = build_world(load_config(None, TINY))
    corpus = tmp_path / "seen.txt"
    corpus.write_text("\n".join(world.seen))
    _build(corpus, tmp_path / "sh", BagOfWordsEncoder(32, 16), shard_size=3, store="plain")
    seen, real = [], loop.BatchEncoder.__call__

    def spy(self, batch):
        assert batch.cond is not None  # cached embeddings, not recomputed
        seen.append(batch.prompts)
        return real(self, batch)

    monkeypatch.setattr(loop.BatchEncoder, "__call__", spy)
    extra = TINY + ["train.ckpt_every=2", "train.val_every=1000", f"data.shards={tmp_path / 'sh'}",
                    "data.shuffle_shards=2", "train.max_steps=4"]
    loop.train(load_config(None, extra), tmp_path / "full")
    full, seen[:] = list(seen), []
    loop.train(load_config(None, extra + ["train.max_steps=2"]), tmp_path / "part")
    loop.train(load_config(None, extra + ["data.num_workers=1"]), tmp_path / "part", resume=True)
    assert seen == full
    with pytest.raises(DataError, match="bow-v1-d32-l16' but this run uses 'bow-v1-d64-l16"):
        loop.train(load_config(None, extra + ["text.dim=64"]), tmp_path / "other")


def test_prompt_only_shards_compute_embeddings_in_a_bounded_lru(corpus_shards, tmp_path):
    from types import SimpleNamespace

    from scalegen.train.loop import BatchEncoder

    _build(corpus_shards.parent / "c.json", tmp_path, shard_size=100)
    s = ShardStream(str(tmp_path), batch_size=16)
    enc = BagOfWordsEncoder(16, 8)
    cfg = SimpleNamespace(data=SimpleNamespace(embed_cache=40))
    prior = SimpleNamespace(text_embeddings=lambda ps: torch.arange(len(ps)))
    be = BatchEncoder(cfg, enc, prior, "cpu", s)
    for _ in range(5):
        b = s.next_batch()
        assert b.cond is None
        prompts, cond, _ = be(b)
        assert torch.equal(cond.tokens, enc.encode(prompts).tokens)
    assert len(be.cache) == 40 and be.n_encoded == 80  # 80 distinct prompts, memory bounded


def _flip_inside_a_record(shard):
    """Flip one byte in the middle of the first embedding record's payload (not a tar header)."""
    from scalegen.data.stream import tar_members

    raw = bytearray(shard.read_bytes())
    name, start, size = next(m for m in tar_members(bytes(raw)) if m[0].endswith(".emb"))
    raw[start + size // 2] ^= 0x40
    shard.write_bytes(bytes(raw))


def test_data_check_catches_a_flipped_byte_inside_a_record(corpus_shards, tmp_path, capsys):
    """The tar stays valid and the record keeps its size, so only the manifest's sha256 can tell: the
    check names the shard and exits 1; training with on_corrupt=fail stops naming it; skip counts it."""
    import shutil

    from scalegen.cli import main

    n = sum(len(sp["shards"]) for sp in load_manifest(corpus_shards)[0]["splits"].values())
    assert main(["data", "check", str(corpus_shards)]) == 0
    assert f"{n} of {n} shard(s) match" in capsys.readouterr().out
    d = tmp_path / "copy"
    shutil.copytree(corpus_shards, d)
    _flip_inside_a_record(d / "train" / "shard-000003.tar")
    assert read_shard(str(d / "train" / "shard-000003.tar"), 64, load_manifest(d)[0]["encoder"])  # still decodes
    assert main(["data", "check", str(d)]) == 1
    out = capsys.readouterr().out.splitlines()
    assert [line for line in out if line.startswith("BAD")] == [
        f"BAD {d / 'train' / 'shard-000003.tar'}: its sha256 differs from the manifest's (the file changed after it "
        "was built)"]
    with pytest.raises(DataError, match="shard-000003.tar' is corrupt or truncated .*sha256"):
        _all(ShardStream(str(d), batch_size=50, mode="eval"))
    s = ShardStream(str(d), batch_size=50, mode="eval", on_corrupt="skip")
    assert len(_all(s)[0]) == 1000 - 64 and s.n_corrupt == 1


def test_training_stops_on_a_flipped_byte_naming_the_shard(tmp_path):
    from scalegen.config import load_config
    from scalegen.priors import build_world
    from scalegen.train.loop import train

    world = build_world(load_config(None, TINY))
    corpus = tmp_path / "seen.txt"
    corpus.write_text("\n".join(world.seen))
    _build(corpus, tmp_path / "sh", BagOfWordsEncoder(32, 16), shard_size=3, store="plain")
    shards = sorted((tmp_path / "sh" / "train").glob("*.tar"))
    for sh in shards:
        _flip_inside_a_record(sh)
    cfg = load_config(None, TINY + [f"data.shards={tmp_path / 'sh'}", "train.max_steps=2"])
    with pytest.raises(DataError, match=r"shard '.*shard-0000\d\d.tar' is corrupt or truncated \(its sha256"):
        train(cfg, tmp_path / "run")
