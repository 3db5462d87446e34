"""CLIP evaluation: metric arithmetic on constructed embeddings, the protocols, tiny random CLIPs in
both libraries' layouts, resume, --images folders, the oracle world's R@1, and the CLI end to end."""
from __future__ import annotations

import csv
import dataclasses
import json
import os
import random
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import TINY, run_cli, shared_path
from scalegen.errors import DataError, ScalegenError, WeightsError
from scalegen.eval.clip import (PROTOCOLS, FolderViews, Pool, Protocol, clip_pixels, evaluate_clip, folder_name,
                                make_protocol, prompt_rows, read_pool)
from scalegen.eval.clip_models import ClipModel, load_clip, make_tiny_clip_model
from scalegen.eval.retrieval import clip_score, distractors, r_at_1

pytest.importorskip("transformers")
pytest.importorskip("open_clip")


# --- arithmetic --------------------------------------------------------------------------------
def test_r_at_1_exact_values_and_ties():
    eye = torch.eye(5)
    assert torch.equal(r_at_1(eye, torch.arange(5)), torch.ones(5, dtype=torch.float64))  # own candidate strictly best: 1
    assert torch.equal(r_at_1(torch.zeros(3, 7), torch.tensor([0, 3, 6])), torch.full((3,), 1 / 7, dtype=torch.float64))  # all tie: 1/K
    s = torch.tensor([[0.5, 0.5, 0.1, 0.2],    # own (0) tied with one other at the max: 1/2
                      [0.1, 0.5, 0.5, 0.5],    # own (0) below the max: 0
                      [0.3, 0.3, 0.3, 0.9]])   # own (3) alone at the max: 1
    assert r_at_1(s, torch.tensor([0, 0, 3])).tolist() == [0.5, 0.0, 1.0]
    perm = torch.tensor([2, 0, 3, 1])  # the order of the candidates does not matter
    inv = torch.argsort(perm)
    assert torch.equal(r_at_1(s[:, perm], inv[torch.tensor([0, 0, 3])]), r_at_1(s, torch.tensor([0, 0, 3])))


def test_clip_score_formula():
    cos = torch.tensor([-0.3, 0.0, 0.2, 1.0])
    assert torch.allclose(clip_score(cos), torch.tensor([0.0, 0.0, 0.5, 2.5]))
    assert torch.allclose(clip_score(cos, w=1.0), torch.tensor([0.0, 0.0, 0.2, 1.0]))


def test_distractors_fixed_by_seed_and_uniform():
    a = distractors(7, 1000, 99, seed=0)
    assert a == distractors(7, 1000, 99, seed=0)
    assert a != distractors(7, 1000, 99, seed=1) and a != distractors(8, 1000, 99, seed=0)
    assert len(a) == len(set(a)) == 99 and 7 not in a and all(0 <= j < 1000 for j in a)
    assert distractors(2, 5, 99, seed=0) == [0, 1, 3, 4]  # small pool: every other prompt
    counts = torch.zeros(50)
    for i in range(2000):
        for j in distractors(i % 50, 50, 10, seed=i // 50):
            counts[j] += 1
    expected = 2000 * 10 / 49
    assert (counts - expected).abs().max() < 0.25 * expected  # no index favoured (Floyd: uniform subsets)


class OneHotClip(ClipModel):
    """A fake CLIP with known embeddings: text j = e_j (j = position in the sorted pool); an image whose
    pixels all equal j/255 = e_j; ``same_text`` makes every text embedding identical."""

    backend = "test"

    def __init__(self, n: int, same_text: bool = False):
        super().__init__("onehot", f"onehot-{n}-{same_text}", 8, (0.0, 0.0, 0.0), (1.0, 1.0, 1.0), "cpu")
        self.n, self.same_text = n, same_text

    def encode_text(self, texts):
        idx = torch.tensor([int(t.split()[-1]) for t in texts])
        return torch.ones(len(texts), self.n) / self.n ** 0.5 if self.same_text else torch.eye(self.n)[idx]

    def encode_images(self, pixels):
        return torch.eye(self.n)[(pixels[:, 0, 0, 0] * 255).round().long()]


def _views(j: int, v: int = 4) -> torch.Tensor:
    return torch.full((v, 3, 8, 8), j, dtype=torch.uint8)


def _prompts(n: int) -> list[str]:
    return [f"prompt {j}" for j in range(n)]  # sorted order == j for n <= 10


def test_prompt_rows_on_constructed_embeddings():
    n, proto = 6, make_protocol("scalegen", distractors=3)
    text, clip = OneHotClip(n).encode_text(_prompts(n)), OneHotClip(n)
    rows = prompt_rows([_views(0), _views(1)], [0, 1], text, _prompts(n), clip, proto, batch=3)
    for r in rows:  # every view is its own prompt's image: similarity 1, CLIPScore 2.5, R@1 1
        assert (r["clip_similarity"], r["clip_score"], r["r_at_1_all"], r["r_at_1_distractors"]) == (1.0, 2.5, 1.0, 1.0)
    mixed = torch.cat([_views(2, 1), _views(5, 3)])  # prompt 2: 1 of 4 views right, 3 show prompt 5
    (r,) = prompt_rows([mixed], [2], text, _prompts(n), clip, proto, batch=3)
    assert r["r_at_1_all"] == 0.25 and r["clip_similarity"] == 0.25 and r["clip_score"] == 2.5 * 0.25
    assert r["retrieved"] == "prompt 5"
    shuffled = mixed[torch.tensor([3, 0, 2, 1])]  # invariance to view order
    (r2,) = prompt_rows([shuffled], [2], text, _prompts(n), clip, proto, batch=3)
    assert r2 == r
    blind = OneHotClip(n, same_text=True)  # every caption identical: all candidates tie, exactly chance
    (r3,) = prompt_rows([_views(1)], [1], blind.encode_text(_prompts(n)), _prompts(n), blind, proto, batch=8)
    assert r3["r_at_1_all"] == 1 / 6 and r3["r_at_1_distractors"] == 1 / 4


def test_clip_pixels_crops_like_the_references():
    grid = torch.zeros(1, 3, 16, 64, dtype=torch.uint8)  # ScaleDreamer saves [rgb | normal | opacity | depth]
    grid[:, 0, :, :16] = 255
    grid[:, 2, :, 16:] = 255
    left = clip_pixels(grid, 8, "left", "bilinear", (0, 0, 0), (1, 1, 1))
    assert left.shape == (1, 3, 8, 8) and torch.all(left[:, 0] == 1) and torch.all(left[:, 2] == 0)
    center = clip_pixels(grid, 8, "center", "bicubic", (0, 0, 0), (1, 1, 1))
    assert torch.all(center[:, 2] == 1) and torch.all(center[:, 0] == 0)  # the grid's middle, not its RGB panel
    img = torch.full((2, 3, 10, 10), 51, dtype=torch.uint8)
    norm = clip_pixels(img, 4, "center", "bicubic", (0.2, 0.2, 0.2), (0.5, 0.5, 0.5))
    assert torch.allclose(norm, torch.zeros_like(norm), atol=1e-6)  # (51/255 - 0.2) / 0.5


# --- tiny CLIPs in both layouts ------------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny_clips(tmp_path_factory):
    root = tmp_path_factory.mktemp("clips")
    return {b: make_tiny_clip_model(root / b, backend=b) for b in ("transformers", "open_clip")}


@pytest.mark.parametrize("backend", ["transformers", "open_clip"])
def test_tiny_clip_loads_through_the_real_loader(tiny_clips, backend, tmp_path):
    clip = load_clip(str(tiny_clips[backend]))
    assert clip.backend == backend and clip.image_size == 32
    t = clip.encode_text(["a red cube", "a blue sphere", "a red cube"])
    i = clip.encode_images(torch.randn(2, 3, 32, 32))
    assert t.shape == (3, 16) and i.shape == (2, 16)
    assert torch.allclose(t.norm(dim=-1), torch.ones(3)) and torch.allclose(t[0], t[2], atol=1e-6)
    assert not torch.allclose(t[0], t[1])
    # A re-saved model gets another id: the text cache never serves another model's features.
    other = make_tiny_clip_model(tmp_path / "other", backend=backend, seed=1)
    assert load_clip(str(other)).model_id != clip.model_id


def test_model_spec_errors_are_one_sentence(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(WeightsError, match="huggingface-cli download openai/clip-vit-large-patch14"):
        load_clip("openai/clip-vit-large-patch14")
    with pytest.raises(WeightsError, match="NAME:PRETRAINED"):
        load_clip(str(tmp_path / "nothing"))
    (tmp_path / "bad").mkdir()
    with pytest.raises(WeightsError, match="neither a transformers CLIP"):
        load_clip(str(tmp_path / "bad"))
    with pytest.raises(WeightsError, match="does not exist"):
        load_clip("ViT-B-32:/no/such/file.bin")


def test_protocol_presets_hold_the_reference_facts():
    sd, tt = PROTOCOLS["scaledreamer"], PROTOCOLS["triplaneturbo"]
    assert (sd.model, sd.views, sd.elevation, sd.resolution, sd.crop, sd.caption_prefix) == \
        ("openai/clip-vit-large-patch14", 120, 15.0, 512, "left", "")
    from scalegen.eval.clip import azimuth_degrees

    assert azimuth_degrees(sd)[0] == 0.0 and azimuth_degrees(sd)[-1] == 360.0  # linspace(0, 360, 120)
    assert (tt.model, tt.views, tt.resolution, tt.caption_prefix, tt.clipscore_w) == \
        ("ViT-B-32-quickgelu:openai", 4, 512, "A photo depicts", 2.5)
    assert (tt.view_source, tt.distance, tt.fovy, tt.mesh_bound) == ("mesh", 3.0, 50.0, 0.9)  # kire's defaults
    assert azimuth_degrees(tt) == [0.0, 90.0, 180.0, 270.0]
    p = make_protocol("scaledreamer", views=4, resolution=64, model="x")
    assert (p.views, p.resolution, p.model, p.crop) == (4, 64, "x", "left")
    with pytest.raises(ScalegenError, match="unknown protocol"):
        make_protocol("dreamfusion")
    with pytest.raises(ScalegenError, match="at least 1"):
        make_protocol("scalegen", views=0)


# --- corpora and image folders -------------------------------------------------------------------
def test_read_pool_splits_seen_unseen_and_fallback(tmp_path):
    corpus = tmp_path / "c.json"
    corpus.write_text(json.dumps({"train": ["a", "b", "c"], "val": ["d", "a"], "test": ["a", "b", "c"]}))
    pool = read_pool(str(corpus), ["test", "val"])
    assert pool.prompts == ["a", "b", "c", "d"] and pool.seen == [True, True, True, False]
    no_test = tmp_path / "v.json"
    no_test.write_text(json.dumps({"train": ["a"], "val": ["x", "y"]}))
    assert read_pool(str(no_test), ["test"]).prompts == ["x", "y"]  # ScaleDreamer: test falls back to val
    with pytest.raises(DataError, match="has none of the splits"):
        read_pool(str(corpus), ["holdout"])
    txt = tmp_path / "p.txt"
    txt.write_text("one\ntwo\none\n")
    assert read_pool(str(txt), ["test"]) == Pool(["one", "two"], None, ["train"])
    from scalegen.cli import main  # a shard folder (`scalegen data build`) reads like its corpus

    assert main(["data", "build", "--corpus", str(corpus), "--out", str(tmp_path / "shards"), "--shard-size", "2"]) == 0
    shards = read_pool(str(tmp_path / "shards"), ["test", "val"])
    assert sorted(shards.prompts) == sorted(pool.prompts) and dict(zip(shards.prompts, shards.seen)) == \
        dict(zip(pool.prompts, pool.seen))


def test_scaledreamer_result_folders_match_the_corpus(tmp_path):
    corpus = shared_path("corpora", "magic3d_15_prompt_library.json")
    pool = read_pool(str(corpus), ["test"])
    from PIL import Image

    root = tmp_path / "it50000-test"
    for p in pool.prompts[:3]:
        d = root / p.replace(",", "").replace(".", "").replace(" ", "_")  # their test_step naming
        d.mkdir(parents=True)
        Image.new("RGB", (64, 16), (200, 10, 10)).save(d / "0.png")
    (root / (folder_name(pool.prompts[0]) + ".mp4")).write_bytes(b"")  # their videos sit beside the folders
    src = FolderViews(str(root), pool)
    assert sorted(src.folders) == sorted(pool.prompts[:3]) and len(src.missing) == 12
    assert src.views([pool.prompts[0]])[0].shape == (1, 3, 16, 64)
    assert folder_name(pool.prompts[0]) == src.folders[pool.prompts[0]].name
    (root / "a_prompt_not_in_the_corpus").mkdir()
    Image.new("RGB", (8, 8)).save(root / "a_prompt_not_in_the_corpus" / "0.png")
    with pytest.raises(DataError, match="match no prompt"):
        FolderViews(str(root), pool)


def _random_views(root: Path, prompts: list[str], v: int = 3, seed: int = 0) -> None:
    from PIL import Image

    g = torch.Generator().manual_seed(seed)
    for p in prompts:
        d = root / folder_name(p)
        d.mkdir(parents=True)
        for j in range(v):
            img = torch.randint(0, 256, (24, 24, 3), generator=g, dtype=torch.uint8)
            Image.fromarray(img.numpy()).save(d / f"{j}.png")


def _rows(out: Path) -> dict[str, dict]:
    with (out / "per_prompt.csv").open() as f:
        return {r["prompt"]: r for r in csv.DictReader(f)}


def test_distractor_sets_depend_on_prompts_and_seed_not_file_order(tiny_clips, tmp_path):
    prompts = [f"a {c} {s}" for c in ("red", "green", "blue", "gold", "grey") for s in ("cube", "cone", "torus")]
    _random_views(tmp_path / "views", prompts)
    clip = load_clip(str(tiny_clips["open_clip"]))
    res = {}
    for name, order, seed in (("a", prompts, 0), ("b", random.Random(1).sample(prompts, len(prompts)), 0),
                              ("c", prompts, 5)):
        (tmp_path / f"{name}.txt").write_text("\n".join(order) + "\n")
        pool = read_pool(str(tmp_path / f"{name}.txt"), ["test"])
        proto = make_protocol("scalegen", distractors=4, seed=seed)
        evaluate_clip(FolderViews(str(tmp_path / "views"), pool), pool, proto, clip, tmp_path / f"out-{name}",
                      tmp_path / "cache", progress=False)
        res[name] = _rows(tmp_path / f"out-{name}")
    key = lambda rows: {p: (r["r_at_1_distractors"], r["clip_similarity"]) for p, r in rows.items()}  # noqa: E731
    assert key(res["a"]) == key(res["b"])
    assert [r["r_at_1_distractors"] for r in res["a"].values()] != [r["r_at_1_distractors"] for r in res["c"].values()]


class CountingViews(FolderViews):
    """FolderViews that counts the prompts it serves and can fail after ``fail_after`` prompts."""

    def __init__(self, *a, fail_after: int | None = None, **k):
        super().__init__(*a, **k)
        self.served, self.fail_after = [], fail_after

    def views(self, prompts):
        if self.fail_after is not None and len(self.served) >= self.fail_after:
            raise KeyboardInterrupt
        self.served += prompts
        return super().views(prompts)


def test_resume_skips_finished_prompts_and_matches_an_uninterrupted_run(tiny_clips, tmp_path):
    prompts = [f"a {c} {s}" for c in ("red", "green", "blue") for s in ("cube", "cone", "torus")]
    _random_views(tmp_path / "views", prompts)
    (tmp_path / "c.txt").write_text("\n".join(prompts) + "\n")
    pool = read_pool(str(tmp_path / "c.txt"), ["test"])
    clip = load_clip(str(tiny_clips["transformers"]))
    proto = make_protocol("scalegen", distractors=3)
    full = evaluate_clip(FolderViews(str(tmp_path / "views"), pool), pool, proto, clip, tmp_path / "full",
                         tmp_path / "cache", batch=16, progress=False)  # 2 prompts per group (batch 16 / 8)
    src = CountingViews(str(tmp_path / "views"), pool, fail_after=4)
    with pytest.raises(KeyboardInterrupt):
        evaluate_clip(src, pool, proto, clip, tmp_path / "cut", tmp_path / "cache", batch=16, progress=False)
    part = tmp_path / "cut" / "progress" / "part-0.jsonl"
    assert len(part.read_text().splitlines()) == 4
    with part.open("a") as f:
        f.write('{"index": 8, "prompt": "a blue t')  # a crash mid-line: that prompt is scored again
    again = CountingViews(str(tmp_path / "views"), pool)
    resumed = evaluate_clip(again, pool, proto, clip, tmp_path / "cut", tmp_path / "cache", batch=16, progress=False)
    assert sorted(again.served) == sorted(prompts[4:])  # the 4 finished prompts were not scored again
    for k in ("clip_similarity", "clip_score", "r_at_1_all", "r_at_1_distractors", "n_prompts", "n_images"):
        assert resumed[k] == pytest.approx(full[k], abs=1e-9), k
    assert _rows(tmp_path / "cut") == _rows(tmp_path / "full")
    other = make_protocol("scalegen", distractors=5)  # another protocol never mixes with stored results
    with pytest.raises(ScalegenError, match="another evaluation"):
        evaluate_clip(FolderViews(str(tmp_path / "views"), pool), pool, other, clip, tmp_path / "cut",
                      tmp_path / "cache", progress=False)


# --- a run, end to end through the CLI -----------------------------------------------------------
@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    from scalegen.config import load_config
    from scalegen.train.loop import train

    run = tmp_path_factory.mktemp("run") / "r"
    train(load_config(None, TINY + ["train.max_steps=1"]), run)
    return run


def _cli(*args, env=None, cwd=None):
    return run_cli(*args, env=env, cwd=cwd)


def test_eval_clip_cli_end_to_end_with_a_transformers_folder(tiny_run, tiny_clips, tmp_path):
    corpus = tmp_path / "c.json"
    corpus.write_text(json.dumps({"train": ["a red cube", "a blue sphere", "a small green cone"],
                                  "val": ["a red sphere", "a blue cube"],
                                  "test": ["a red cube", "a blue sphere", "a small green cone"]}))
    out_json = tmp_path / "clip.json"
    r = _cli("eval", "clip", "--ckpt", tiny_run, "--corpus", corpus, "--model", tiny_clips["transformers"],
             "--views", 4, "--resolution", 64, "--json", out_json, "--cache", tmp_path / "cache", "--save-views",
             "--out", tmp_path / "out")
    assert r.returncode == 0, r.stderr
    s = json.loads(out_json.read_text())
    for k in ("clip_similarity", "clip_score", "r_at_1_all", "r_at_1_distractors", "n_prompts", "protocol"):
        assert k in s, k
    assert s["n_prompts"] == 5 and s["seen"]["n_prompts"] == 3 and s["unseen"]["n_prompts"] == 2
    assert s["n_images"] == 20 and -1 <= s["clip_similarity"] <= 1 and 0 <= s["r_at_1_all"] <= 1
    fields = {f.name for f in dataclasses.fields(Protocol)}
    assert fields <= set(s["protocol"]) and {"model_id", "backend", "image_size", "mean", "std", "azimuth_degrees",
                                             "distance", "fovy", "render_samples", "checkpoint", "ties"} <= set(s["protocol"])
    assert s["protocol"]["views"] == 4 and s["protocol"]["resolution"] == 64 and s["protocol"]["backend"] == "transformers"
    out = tmp_path / "out"
    assert (out / "summary.md").read_text().count("|") > 20 and (out / "contact_sheet.png").stat().st_size > 1000
    assert len(_rows(out)) == 5
    # The saved views, scored as another system's renders, give the same numbers (8-bit renders both ways).
    r = _cli("eval", "clip", "--images", out / "views", "--corpus", corpus, "--model", tiny_clips["transformers"],
             "--cache", tmp_path / "cache", "--out", tmp_path / "again", "--no-progress")
    assert r.returncode == 0, r.stderr
    a, b = _rows(out), _rows(tmp_path / "again")
    assert {p: x["clip_similarity"] for p, x in a.items()} == {p: x["clip_similarity"] for p, x in b.items()}


@pytest.mark.parametrize("args,needle", [
    (["eval", "clip", "--corpus", "c.txt"], "exactly one of --ckpt"),
    (["eval", "clip", "--images", ".", "--corpus", "c.txt", "--views", "4", "--out", "o"], "--views shapes the renders"),
    (["eval", "clip", "--images", ".", "--corpus", "missing.txt", "--out", "o"], "does not exist"),
    (["eval", "clip", "--images", "views", "--corpus", "c.txt", "--out", "o", "--model",
      "openai/clip-vit-large-patch14"], "huggingface-cli download"),
    (["eval", "clip", "--images", "views", "--corpus", "c.txt", "--out", "o", "--batch", "0"], "argument --batch: must be at least 1, got 0"),
    (["eval", "clip", "--ckpt", "no/such/run", "--corpus", "c.txt"], "does not exist"),
    (["eval"], "needs --ckpt"),
])
def test_eval_clip_bad_input_is_one_line(args, needle, tmp_path):
    (tmp_path / "c.txt").write_text("a red cube\na blue sphere\n")
    _random_views(tmp_path / "views", ["a red cube"])
    r = _cli(*args, cwd=tmp_path, env={"HF_HUB_OFFLINE": "1"})
    assert r.returncode == 2 and needle in r.stderr and "Traceback" not in r.stderr, r.stderr
    assert len(r.stderr.strip().splitlines()) == 1, r.stderr


# --- the oracle world's R@1 ----------------------------------------------------------------------
def test_oracle_r_at_1_known_answers(tiny_cfg):
    from scalegen.eval.oracle import eval_cameras, ground_truth_gallery, retrieval_r_at_1
    from scalegen.priors import build_ground_truth

    truth = build_ground_truth(tiny_cfg)
    world = truth.world
    gt_rgb, _ = ground_truth_gallery(truth, eval_cameras(tiny_cfg))
    own = torch.arange(len(world.prompts))
    assert torch.equal(retrieval_r_at_1(gt_rgb, gt_rgb, own), torch.ones(len(own), dtype=torch.float64))  # ground truth: exactly 1
    blind = gt_rgb[:1].expand_as(gt_rgb) * 0 + 0.5  # the same grey picture for every prompt
    hits = retrieval_r_at_1(blind, gt_rgb, own)
    assert hits.mean().item() == pytest.approx(1 / len(own))  # one prompt wins each view: exactly chance


def test_eval_json_reports_r_at_1_per_split(tiny_run, tmp_path):
    out = tmp_path / "e.json"
    r = _cli("eval", "--ckpt", tiny_run, "--json", out)
    assert r.returncode == 0, r.stderr
    res = json.loads(out.read_text())
    for split in ("seen", "unseen"):  # the tiny world: 3 colours x 2 shapes x 2 sizes
        assert 0.0 <= res[split]["r_at_1"] <= 1.0 and res[split]["r_at_1_chance"] == 1 / 12


@pytest.mark.distributed
def test_two_processes_split_the_prompts_and_gather(tiny_clips, tmp_path):
    prompts = [f"a {c} {s}" for c in ("red", "green", "blue") for s in ("cube", "cone")]
    _random_views(tmp_path / "views", prompts)
    (tmp_path / "c.txt").write_text("\n".join(prompts) + "\n")
    common = ["--images", tmp_path / "views", "--corpus", tmp_path / "c.txt", "--model", tiny_clips["open_clip"],
              "--cache", tmp_path / "cache", "--no-progress", "--cpu"]
    r = _cli("eval", "clip", *common, "--out", tmp_path / "one", "--json", tmp_path / "one.json")
    assert r.returncode == 0, r.stderr
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
                        str(29500 + os.getpid() % 1000), "-m", "scalegen.cli", "eval", "clip", *map(str, common),
                        "--out", str(tmp_path / "two"), "--json", str(tmp_path / "two.json")],
                       capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert r.returncode == 0, r.stderr[-2000:]
    parts = sorted((tmp_path / "two" / "progress").glob("part-*.jsonl"))
    assert [len(p.read_text().splitlines()) for p in parts] == [3, 3]  # each rank scored half
    one, two = json.loads((tmp_path / "one.json").read_text()), json.loads((tmp_path / "two.json").read_text())
    for k in ("clip_similarity", "clip_score", "r_at_1_all", "r_at_1_distractors", "n_prompts"):
        assert two[k] == pytest.approx(one[k], abs=1e-6), k


def test_triplaneturbo_protocol_builds_the_quickgelu_vit_b_32():
    """TriplaneTurbo scores with ``clip.load("ViT-B/32")``, whose layers use QuickGELU (x sigmoid(1.702 x)); the
    protocol's open_clip spec must build that architecture (random weights here: no download), where plain
    ``ViT-B-32`` builds exact-GELU layers (open_clip #771)."""
    import open_clip

    from scalegen.eval.clip_models import _parse_open_clip, random_open_clip

    name, pretrained, _ = _parse_open_clip(PROTOCOLS["triplaneturbo"].model)
    assert pretrained == "openai"
    assert "openai" in open_clip.list_pretrained_tags_by_model(name)

    def activations(model):
        return {type(m).__name__ for blk in [*model.visual.transformer.resblocks, *model.transformer.resblocks]
                for m in blk.mlp.modules() if not isinstance(m, (torch.nn.Linear, torch.nn.Sequential))}

    ours = random_open_clip(name).model
    assert activations(ours) == {"QuickGELU"}
    assert ours.visual.image_size[0] == 224 and ours.visual.conv1.kernel_size == (32, 32)
    x = torch.linspace(-3, 3, 7)
    assert torch.allclose(ours.visual.transformer.resblocks[0].mlp.gelu(x), x * torch.sigmoid(1.702 * x))
    assert activations(random_open_clip("ViT-B-32").model) == {"GELU"}  # the spec the protocol used to give


def _face_coloured_cube(half: float):
    """A cube [-half, half]^3 with 4 vertices per face, so each face has one flat colour: +x red, -x green,
    the other faces blue."""
    verts, faces, colours = [], [], []
    for axis in range(3):
        for sign in (1.0, -1.0):
            u, v = [a for a in range(3) if a != axis]
            base = len(verts)
            for a, b in ((-1, -1), (1, -1), (1, 1), (-1, 1)):
                p = [0.0, 0.0, 0.0]
                p[axis], p[u], p[v] = sign * half, a * half, b * half
                verts.append(p)
            faces += [[base, base + 1, base + 2], [base, base + 2, base + 3]]
            c = [1.0, 0.0, 0.0] if (axis, sign) == (0, 1.0) else [0.0, 1.0, 0.0] if axis == 0 else [0.0, 0.0, 1.0]
            colours += [c] * 4
    return torch.tensor(verts), torch.tensor(faces), torch.tensor(colours)


def test_mesh_views_cover_the_analytic_extent_of_a_cube():
    """A unit cube fitted to the protocol's box ([-0.9, 0.9]^3) and seen by the triplaneturbo cameras (radius 3,
    fovy 50, 512 px) head-on: its near face covers exactly the pixel centres within focal * 0.9 / (3 - 0.9) of
    the image centre, in the near face's colour (the z-buffer hides the far face), white elsewhere."""
    import math

    from scalegen.eval.clip import fit_to_box, protocol_cameras
    from scalegen.render.raster import shade_unlit

    p = dataclasses.replace(PROTOCOLS["triplaneturbo"], elevation=0.0, views=4)
    verts, faces, colours = _face_coloured_cube(0.5)
    fitted = fit_to_box(verts + torch.tensor([0.3, -0.2, 0.1]), p.mesh_bound)  # off-centre in, centred out
    assert torch.allclose(fitted.amin(0), torch.full((3,), -0.9))
    assert torch.allclose(fitted.amax(0), torch.full((3,), 0.9))
    cams = protocol_cameras(p, p.distance, p.fovy)
    rgb, alpha = shade_unlit(fitted, faces, colours, cams)
    assert rgb.shape == (4, 3, 512, 512) and alpha.shape == (4, 1, 512, 512)
    focal = 256 / math.tan(math.radians(25.0))
    half = focal * 0.9 / (3.0 - 0.9)  # projected half-width of the near face, pixels
    centres = torch.arange(512) + 0.5
    inside_1d = (centres - 256).abs() <= half
    want = inside_1d[:, None] & inside_1d[None, :]
    assert 0 < half < 256 and int(inside_1d.sum()) == 2 * math.floor(half + 0.5)
    for view in range(4):
        assert torch.equal(alpha[view, 0] > 0, want), view
    # azimuth 0 looks from +x: the red face, never the green one behind it; azimuth 180 sees the green one
    n = int(want.sum())
    assert torch.allclose(rgb[0][:, want], torch.tensor([1.0, 0.0, 0.0])[:, None].expand(3, n), atol=1e-5)
    assert torch.allclose(rgb[2][:, want], torch.tensor([0.0, 1.0, 0.0])[:, None].expand(3, n), atol=1e-5)
    assert (rgb[:, :, ~want] == 1.0).all()  # white background


def test_triplaneturbo_ckpt_scores_the_exported_mesh(tiny_run, tiny_clips, tmp_path, capsys):
    """``eval clip --protocol triplaneturbo --ckpt RUN`` renders the run's exported mesh unlit on white (the
    view source the summary records), and --view-source field switches back to the run's own renders."""
    from scalegen.cli import main

    corpus = tmp_path / "c.json"
    corpus.write_text(json.dumps({"test": ["a red cube", "a blue sphere"]}))
    common = ["eval", "clip", "--ckpt", str(tiny_run), "--corpus", str(corpus), "--protocol", "triplaneturbo",
              "--model", str(tiny_clips["open_clip"]), "--resolution", "64", "--cache", str(tmp_path / "cache"),
              "--save-views", "--no-progress", "--cpu"]
    assert main([*common, "--out", str(tmp_path / "mesh"), "--json", str(tmp_path / "mesh.json")]) == 0
    s = json.loads((tmp_path / "mesh.json").read_text())
    assert s["protocol"]["source"] == "ckpt_mesh" and s["protocol"]["distance"] == 3.0 and s["protocol"]["fovy"] == 50.0
    from PIL import Image

    views = sorted((tmp_path / "mesh" / "views").rglob("*.png"))
    assert len(views) == 8
    img = torch.from_numpy(np.asarray(Image.open(views[0]).convert("RGB")).copy())
    assert (img[:4, :4] == 255).all() and (img[28:36, 28:36] != 255).any()  # white around, the shape in the middle
    assert main([*common, "--view-source", "field", "--out", str(tmp_path / "field")]) == 0
    capsys.readouterr()
