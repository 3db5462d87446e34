"""A seeded fuzz of the whole command line (issue 25): random mixes of valid and invalid flags, values,
overrides and stray words for every subcommand, each run in-process in a fresh folder.

For every case: no exception escapes ``scalegen.cli.main`` but SystemExit 0 or 2; a case holding an
invalid element exits 2 with one ``error:`` line on stderr and no traceback; a refused command leaves
the folder exactly as it was (no output, no staging folder, no temporary file). Commands that would
train or load real models are only drawn with at least one invalid element (or ``--print-config``), so
every case fails fast or is one of the cheap commands (info, data build/compose, --print-config) that
may legitimately succeed.
"""
from __future__ import annotations

import random
import shutil
import traceback
from pathlib import Path

import pytest
import torch

from scalegen.cli import main

# flag -> (valid values, invalid values); None as the only valid value marks a store_true flag
SUBCOMMANDS: dict[str, dict] = {
    "train": {
        "cheap": False, "overrides": True,
        "flags": {"--config": (["cfg.yaml"], ["adir", "missing.yaml", "bad.yaml"]),
                  "--out": (["run"], ["afile", "afile/sub"]),
                  "--resume": ([None, "auto"], []),
                  "--print-config": ([None], [])},
    },
    "eval": {
        "cheap": False, "overrides": False,
        "flags": {"--ckpt": ([], ["adir", "afile", "missing"]), "--json": (["e.json"], ["adir", "no/such/e.json"]),
                  "--baseline": ([None], []), "--max-prompts": (["2"], ["0", "-1", "two"])},
    },
    "eval clip": {
        "cheap": False, "overrides": False, "base": ["--images", "views", "--corpus", "c.txt", "--out", "ev"],
        "flags": {"--ckpt": ([], ["adir", "afile"]), "--corpus": (["c.json"], ["missing.txt", "adir"]),
                  "--protocol": (["scaledreamer", "triplaneturbo"], ["nope"]),
                  "--model": (["openai/clip-vit-base-patch32", "ViT-B-32:openai", "hf-hub:laion/x"], ["adir"]),
                  "--views": (["4"], ["0", "-2", "361", "many"]), "--resolution": (["64"], ["0", "5000"]),
                  "--elevation": (["15"], ["91", "nan"]), "--distance": (["2.5"], ["0", "-1", "inf"]),
                  "--fovy": (["40"], ["0", "180"]), "--crop": (["left"], ["right"]), "--resize": (["bicubic"], ["box"]),
                  "--clipscore-w": (["2.5"], ["0", "-1"]), "--distractors": (["9"], ["0"]),
                  "--seed": (["3"], ["-1", "1.5"]), "--json": (["s.json"], ["adir"]), "--cache": (["cache"], ["afile"]),
                  "--batch": (["8"], ["0", "-1"]), "--contact": (["0", "4"], ["-1"]), "--glob": (["*.png"], []),
                  "--save-views": ([None], []), "--overwrite": ([None], []), "--cpu": ([None], []),
                  "--no-progress": ([None], []), "--split": (["test"], [])},
    },
    "eval train-clip": {
        "cheap": False, "overrides": True, "base": ["--out", "clipdir"],
        "flags": {"--world": (["cfg.yaml"], ["missing.yaml", "adir", "bad.yaml"]),
                  "--json": (["t.json"], ["adir"]), "--out": ([], ["afile", "afile/sub"])},
    },
    "eval make-tiny-clip": {
        "cheap": False, "overrides": False, "base": ["--out", "tiny"],
        "flags": {"--backend": (["open_clip"], ["jax"]), "--seed": (["1"], ["-5", "x"]), "--out": ([], ["afile"])},
    },
    "generate": {
        "cheap": False, "overrides": False, "base": ["--ckpt", "adir", "--prompt", "a red cube", "--out", "a.glb"],
        "flags": {"--ckpt": ([], ["afile", "missing"]), "--prompts": (["c.txt", "c.json"], ["adir", "missing.txt"]),
                  "--prompt": (["a blue sphere"], [" "]), "--split": (["train", "nosplit"], []),
                  "--out": (["assets", "b.obj"], ["afile/x.glb"]),
                  "--format": (["glb", "ply"], ["fbx"]), "--resolution": (["32"], ["0", "4", "5000"]),
                  "--level": (["0.01"], ["nan", "x"]), "--simplify": (["1000"], ["0"]), "--texture": ([None], []),
                  "--texture-size": (["256"], ["0", "9000"]), "--turntable": ([None], []),
                  "--frames": (["12"], ["0", "-1"]), "--turntable-size": (["64"], ["8", "0"]),
                  "--batch": (["4"], ["0"]), "--threads": (["0"], ["-1"]), "--overwrite": ([None], []),
                  "--keep-fragments": ([None], [])},
    },
    "export-pretrained": {
        "cheap": False, "overrides": False, "base": ["--ckpt", "adir", "--out", "exp"],
        "flags": {"--ckpt": ([], ["afile", "missing"]), "--out": ([], ["afile", "afile/x"]),
                  "--eval-json": ([], ["missing.json", "adir"]), "--no-eval": ([None], []),
                  "--no-gallery": ([None], []), "--repo-id": (["someone/model"], [])},
    },
    "demo": {  # its --ckpt is never a model here, so no case starts a server
        "cheap": False, "overrides": False, "base": ["--ckpt", "adir"],
        "flags": {"--ckpt": ([], ["afile", "missing"]), "--port": (["7861"], ["0", "70000", "x"]),
                  "--threads": (["1"], ["-1"])},
    },
    "refine": {
        "cheap": False, "overrides": True, "base": ["--prompt", "a small red sphere", "--out", "rf"],
        "flags": {"--representation": (["ingp"], ["nerf"]), "--distill": (["asd", "vsd"], ["dds"]),
                  "--init-from": (["sphere", "nan.ply"], ["missing.ply", "afile"]), "--up": (["z"], ["x"]),
                  "--fit": ([None], []), "--config": (["cfg.yaml"], ["adir", "missing.yaml"]),
                  "--out": ([], ["afile"]), "--resume": ([None], []), "--mesh-resolution": (["64"], ["0", "2000"]),
                  "--json": (["r.json"], ["adir"]), "--print-config": ([None], [])},
    },
    "gallery": {
        "cheap": False, "overrides": False, "base": ["adir", "--out", "site"],
        "flags": {"--prompts": (["c.txt"], ["missing.txt"]), "--split": (["test"], []),
                  "--max-prompts": (["0", "3"], ["-1"]), "--resolution": (["32"], ["0"]), "--texture": ([None], []),
                  "--frames": (["4"], ["0"]), "--turntable-size": (["32"], ["0"]), "--batch": (["2"], ["0"]),
                  "--threads": (["0"], ["-2"]), "--viewer": ([], ["missing.js", "adir"]), "--overwrite": ([None], []),
                  "--out": ([], ["afile"])},
    },
    "info": {
        "cheap": True, "overrides": True,
        "flags": {"--config": (["cfg.yaml"], ["missing.yaml", "adir", "bad.yaml"]),
                  "--json": (["i.json"], ["adir", "no/such/i.json"])},
    },
    "prior make-tiny": {
        "cheap": False, "overrides": False, "base": ["--out", "sd"],
        "flags": {"--seed": (["2"], ["-1", "x"]), "--out": ([], ["afile"])},
    },
    "prior make-tiny-mvdream": {
        "cheap": False, "overrides": False, "base": ["--out", "m.safetensors"],
        "flags": {"--seed": (["2"], ["-1"]), "--context-dim": (["16"], ["0", "x"]), "--out": ([], ["adir", "m.bin"])},
    },
    "prior train-learned": {
        "cheap": False, "overrides": True, "base": ["--out", "lp"],
        "flags": {"--world": (["cfg.yaml"], ["missing.yaml", "adir", "bad.yaml"]),
                  "--json": (["t.json"], ["adir", "no/such/t.json"]), "--out": ([], ["afile", "afile/sub"])},
    },
    "prior score-learned": {
        "cheap": False, "overrides": False, "base": ["--model", "adir"],
        "flags": {"--model": ([], ["afile", "missing"]), "--t": (["50", "999"], ["1000", "-1", "x"]),
                  "--per-prompt": (["2"], ["0", "-1"]), "--ddim-steps": (["10"], ["0", "1001"]),
                  "--cfg": (["7.5"], ["-1", "nan"]), "--json": (["s.json"], ["adir"]), "--sheet": (["sheets"], ["afile"]),
                  "--no-exact": ([None], [])},
    },
    "prior convert-mvdream": {
        "cheap": False, "overrides": False, "base": ["afile", "conv"],
        "flags": {"--text-from": (["adir"], []), "--head-channels": (["32"], ["0"]), "--half": ([None], [])},
    },
    "data build": {
        "cheap": True, "overrides": True, "base": ["--corpus", "c.txt", "--out", "sh"],
        "flags": {"--corpus": (["c.json", "c.csv", "bad.txt"], ["missing.txt", "adir", "empty.json"]),
                  "--out": (["sh2"], ["afile", "afile/x"]), "--encoder": (["none", "bow"], ["t5"]),
                  "--store": (["none"], ["all"]), "--compress": (["zlib"], ["gzip"]),
                  "--shard-size": (["1", "2"], ["0", "-3", "x"]), "--column": (["prompt"], []),
                  "--batch-size": (["1", "4"], ["0", "-3"]), "--cpu": ([None], []), "--overwrite": ([None], [])},
    },
    "data check": {
        "cheap": True, "overrides": False, "base": ["adir"],
        "flags": {"--url": (["file://x"], [])},
    },
    "data compose": {
        "cheap": True, "overrides": True, "base": ["--out", "comp.json", "--n", "40", "--n-val", "8"],
        "flags": {"--world": (["att3d"], ["mars"]), "--config": ([], ["missing.yaml"]),
                  "--n": (["20"], ["0", "-5", "x"]), "--unseen-pairs": (["2"], ["0"]), "--n-val": (["4"], ["0"]),
                  "--seed": (["7"], ["-1"]), "--out": ([], ["adir", "no/such/c.json"])},
    },
    "bench": {
        "cheap": False, "overrides": True, "base": ["toy2d"],
        "flags": {"--json": (["b.json"], ["adir"]), "--out": (["bruns"], ["afile"])},
    },
}
VALID_OVERRIDES = {"train": ["train.max_steps=1", "text.dim=16", "optim.lr=0.001"],
                   "refine": ["train.max_steps=1"], "info": ["text.dim=16", "data.prompts_per_step=2"],
                   "data build": ["text.dim=16"], "data compose": [], "bench": [],
                   "prior train-learned": ["learned.steps=1", "learned.size=tiny", "text.dim=16"],
                   "eval train-clip": ["clip.steps=1", "clip.size=tiny"]}
INVALID_OVERRIDES = ["trian.max_steps=3", "train.max_steps=-1", "optim.lr=abc", "train.nope=1", "camera.resolution=0",
                     "text.dim=0", "=3", "train.max_steps"]
STRAYS = ["--bogus", "stray", "-x"]


def _fixture_folder(root: Path) -> Path:
    """The files every case starts with (copied into each case's fresh folder)."""
    import numpy as np
    import trimesh
    from PIL import Image

    root.mkdir()
    (root / "c.txt").write_text("a red cube\na blue sphere\na small green cone\n")
    (root / "c.json").write_text('{"train": ["a red cube", "a blue sphere"], "test": ["a green cone"]}')
    (root / "c.csv").write_text("id,prompt\n1,a red cube\n2,a blue sphere\n")
    (root / "bad.txt").write_text("a red cube\n!!!\n")
    (root / "empty.json").write_text("{}")
    (root / "cfg.yaml").write_text("train:\n  max_steps: 1\n")
    (root / "bad.yaml").write_text("train: [unclosed\n")
    (root / "afile").write_text("not a folder")
    (root / "adir").mkdir()
    (root / "views" / "a red cube").mkdir(parents=True)
    Image.new("RGB", (24, 24)).save(root / "views" / "a red cube" / "0.png")
    pts = np.zeros((8, 3))
    pts[0] = np.nan
    trimesh.PointCloud(pts).export(root / "nan.ply")
    return root


def _draw(rng: random.Random) -> tuple[list[str], bool, bool]:
    """(argv, holds an invalid element, may legitimately succeed)."""
    if rng.random() < 0.03:
        return rng.choice([[], ["--verbose"], ["data"], ["prior"], ["nope"]]), True, False
    name = rng.choice(sorted(SUBCOMMANDS))
    spec = SUBCOMMANDS[name]
    argv, invalid = name.split(), False
    base = list(spec.get("base", []))
    i = 0
    while i < len(base):  # a required item is dropped now and then: the command must say what is missing
        item = base[i:i + 2] if base[i].startswith("--") else base[i:i + 1]
        if name == "data compose" and item[0] != "--out" or rng.random() < 0.93:  # compose's --n stays small
            argv += item
        else:
            invalid = True
        i += len(item)
    flags = rng.sample(sorted(spec["flags"]), k=min(len(spec["flags"]), rng.randint(0, 4)))
    for flag in flags:
        good, bad = spec["flags"][flag]
        if bad and (not good or rng.random() < 0.3):
            argv += [flag, rng.choice(bad)]
            invalid = True
        else:
            v = rng.choice(good)
            argv += [flag] if v is None else [flag, v]
    if spec["overrides"]:
        for _ in range(rng.randint(0, 2)):
            if VALID_OVERRIDES.get(name) and rng.random() < 0.6:
                argv.append(rng.choice(VALID_OVERRIDES[name]))
            else:
                argv.append(rng.choice(INVALID_OVERRIDES))
                invalid = True
    if rng.random() < 0.08:
        argv.insert(rng.randint(len(name.split()), len(argv)), rng.choice(STRAYS))
        invalid = True
    if rng.random() < 0.05:
        argv.insert(rng.randint(0, len(argv)), "--verbose")
    cheap = spec["cheap"] or "--print-config" in argv
    if not invalid and not cheap:  # never train, render or load a model for real: add one invalid element
        bad = [(f, b) for f, (_, bs) in spec["flags"].items() for b in bs]
        f, b = rng.choice(bad)
        argv += [f, b]
        invalid = True
    return argv, invalid, cheap


def _listing(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*"))


def _fuzz(n: int, seed: int, tmp_path: Path, monkeypatch, capsys) -> dict:
    template = _fixture_folder(tmp_path / "template")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf-empty"))  # no cached models: hub loads fail at once
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    monkeypatch.setenv("WANDB_MODE", "disabled")
    threads = torch.get_num_threads()
    rng = random.Random(seed)
    counts = {"refused": 0, "succeeded": 0}
    for i in range(n):
        argv, invalid, cheap = _draw(rng)
        case = tmp_path / f"case{i}"
        shutil.copytree(template, case)
        monkeypatch.chdir(case)
        before = _listing(case)
        try:
            rc = main(argv)
        except SystemExit as e:
            rc = e.code if isinstance(e.code, int) else (0 if e.code is None else 2)
        except BaseException:  # noqa: BLE001 - the point: report the case that escaped
            pytest.fail(f"case {i}: scalegen {' '.join(argv)} raised:\n{traceback.format_exc()}")
        finally:
            torch.set_num_threads(threads)
        out = capsys.readouterr()
        what = f"case {i}: scalegen {' '.join(argv)} -> {rc}\nstdout: {out.out[-800:]}\nstderr: {out.err[-800:]}"
        assert "Traceback" not in out.err + out.out, what
        assert rc in (0, 2), what
        if argv in (["--help"], ["-h"]) or "--help" in argv:
            continue
        if invalid:
            assert rc == 2, what
        if rc == 2:
            lines = out.err.strip().splitlines()
            assert lines and lines[-1].startswith("error: ") and len(lines) == 1, what
            assert _listing(case) == before, what + f"\nleft behind: {sorted(set(_listing(case)) - set(before))}"
            counts["refused"] += 1
        else:
            assert cheap, what
            counts["succeeded"] += 1
        shutil.rmtree(case)
    return counts


def test_cli_fuzz_fast(tmp_path, monkeypatch, capsys):
    counts = _fuzz(50, seed=25, tmp_path=tmp_path, monkeypatch=monkeypatch, capsys=capsys)
    assert counts["refused"] > 25 and counts["refused"] + counts["succeeded"] == 50


@pytest.mark.slow
def test_cli_fuzz_many(tmp_path, monkeypatch, capsys):
    counts = _fuzz(400, seed=2025, tmp_path=tmp_path, monkeypatch=monkeypatch, capsys=capsys)
    assert counts["refused"] > 200 and counts["succeeded"] > 10
