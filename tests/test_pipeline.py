"""The Python API (``TextTo3DPipeline``) and the Hugging Face folder layout (``export-pretrained``):
the README's example runs, an exported folder reproduces the run's assets to the bit, loads from a
Hub-style cache offline, and its model card parses with huggingface_hub's own parser."""
from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import pytest
import torch

from conftest import TINY, fit_to_sphere
from scalegen.cli import main
from scalegen.config import load_config
from scalegen.train.checkpoint import save_checkpoint
from scalegen.train.model import build_model

REPO = Path(__file__).resolve().parents[1]
BLUE = [0.15, 0.25, 0.85]
WORLD = ["world.shapes=[sphere, torus]", "world.colors=[red, blue]"]


@pytest.fixture(autouse=True)
def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def torus_run(tmp_path_factory):
    """A run whose generator was fitted to a blue ball for 'a small blue torus' (a known shape, no
    distillation), checkpointed as `scalegen train` does."""
    torch.manual_seed(0)
    cfg = load_config(None, [*TINY, *WORLD])
    text_encoder, model = build_model(cfg)
    opt = fit_to_sphere(model, text_encoder.encode(["a small blue torus"]), cfg.render.bound, 0.35, BLUE, steps=120,
                        points=2048)
    run = tmp_path_factory.mktemp("torus") / "run"
    run.mkdir()
    (run / "config.yaml").write_text(cfg.to_yaml())
    save_checkpoint(run, 7, {f"model.{k}": v for k, v in model.state_dict().items()}, opt.state_dict(),
                    {"data": {"0": {"epoch": 0, "cursor": 0}}}, {})
    return run


@pytest.fixture(scope="module")
def exported(torus_run, tmp_path_factory):
    out = tmp_path_factory.mktemp("export") / "tiny-torus"
    assert main(["export-pretrained", "--ckpt", str(torus_run), "--out", str(out)]) == 0
    return out


def test_readme_example_writes_a_valid_glb_of_the_prompt(torus_run, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    from scalegen import TextTo3DPipeline

    pipe = TextTo3DPipeline.from_pretrained(torus_run)
    asset = pipe(["a small blue torus"])[0]
    path = asset.save("torus.glb")
    mesh = asset.mesh
    assert path.stat().st_size > 1000 and len(mesh.faces) > 100
    # the fitted ball of radius 0.35, blue: the asset is the field's shape and colour
    assert abs(mesh.bounding_box.extents.max() / 2 - 0.35) < 0.05
    rgb = mesh.visual.vertex_colors[:, :3].mean(0) / 255
    assert rgb[2] > 0.6 and rgb[0] < 0.35, rgb
    if shutil.which("node") and (REPO / "node_modules" / "gltf-validator").is_dir():
        r = subprocess.run(["node", str(REPO / "tests" / "js" / "validate_gltf.js"), str(path.resolve())], capture_output=True,
                           text=True, cwd=REPO)
        assert r.returncode == 0, r.stderr
        report = json.loads(r.stdout.splitlines()[0])
        assert report["errors"] == 0 and report["warnings"] == 0, report
    else:
        pytest.skip("the Khronos glTF validator is not installed (npm ci; .ci/run does); the GLB was checked by trimesh")


def test_exported_folder_reproduces_the_runs_generate_output_to_the_bit(torus_run, exported, tmp_path):
    assert sorted(p.name for p in exported.iterdir()) == ["README.md", "config.json", "gallery.png",
                                                          "model.safetensors"]
    outs = []
    for source in (torus_run, exported):
        out = tmp_path / f"{len(outs)}.glb"
        assert main(["generate", "--ckpt", str(source), "--prompt", "a small blue torus", "--out", str(out),
                     "--resolution", "48"]) == 0
        outs.append(out.read_bytes())
    assert outs[0] == outs[1]
    from safetensors.torch import load_file

    weights = load_file(str(exported / "model.safetensors"))
    assert not any(k.startswith(("optimizer", "model.")) for k in weights)  # generator + background only
    meta = json.loads((exported / "config.json").read_text())
    assert meta["config"]["generator"]["name"] == "hyper_ingp" and meta["text_encoder"]["kind"] == "bow"
    assert "a <size> <color> <shape>" in meta["prompts"] and meta["training"]["steps"] == 7


def test_model_card_metadata_parses_with_huggingface_hub(exported):
    from huggingface_hub import ModelCard

    card = ModelCard.load(exported / "README.md")
    assert card.data.library_name == "scalegen" and card.data.pipeline_tag == "text-to-3d"
    assert card.data.license == "apache-2.0"
    assert {"text-to-3d", "hyper_ingp", "prior-oracle"} <= set(card.data.tags)
    text = card.text
    assert "| seen |" in text and "scalegen eval --ckpt" in text  # the run's numbers with their command
    assert "![samples](gallery.png)" in text and "TextTo3DPipeline.from_pretrained" in text
    assert "oracle world (single), seen split" in text


def test_a_hub_id_loads_from_the_local_cache_offline(exported, tmp_path, monkeypatch):
    cache = tmp_path / "hub"
    snap = cache / "models--someone--tiny-torus" / "snapshots" / "0123456789abcdef"
    shutil.copytree(exported, snap)
    (cache / "models--someone--tiny-torus" / "refs").mkdir()
    (cache / "models--someone--tiny-torus" / "refs" / "main").write_text("0123456789abcdef")
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.chdir(tmp_path)
    import huggingface_hub.constants as hc

    monkeypatch.setattr(hc, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(hc, "HF_HUB_OFFLINE", True)
    from scalegen import TextTo3DPipeline

    a = TextTo3DPipeline.from_pretrained("someone/tiny-torus")(["a small blue torus"], resolution=32)[0]
    b = TextTo3DPipeline.from_pretrained(exported)(["a small blue torus"], resolution=32)[0]
    assert (a.surface.verts == b.surface.verts).all() and (a.surface.colours == b.surface.colours).all()


def test_a_missing_hub_id_is_one_line_with_the_download_command(tmp_path, monkeypatch, capsys):
    import huggingface_hub.constants as hc

    monkeypatch.setattr(hc, "HF_HUB_CACHE", str(tmp_path / "empty"))
    monkeypatch.setattr(hc, "HF_HUB_OFFLINE", True)
    monkeypatch.chdir(tmp_path)
    rc = main(["generate", "--ckpt", "nobody/nothing", "--prompt", "a small blue torus", "--out", "x.glb"])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and len(err.splitlines()) == 1
    assert "huggingface-cli download nobody/nothing" in err
    assert list(tmp_path.iterdir()) == []


def test_a_changed_byte_in_exported_weights_is_named(exported, tmp_path, capsys):
    broken = tmp_path / "broken"
    shutil.copytree(exported, broken)
    w = broken / "model.safetensors"
    data = bytearray(w.read_bytes())
    data[len(data) // 2] ^= 0x01
    w.write_bytes(bytes(data))
    rc = main(["generate", "--ckpt", str(broken), "--prompt", "a small blue torus", "--out", str(tmp_path / "x.glb")])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and str(w) in err and "sha256" in err
    assert not (tmp_path / "x.glb").exists()


def test_export_refuses_a_folder_that_is_not_empty(torus_run, tmp_path, capsys):
    (tmp_path / "keep.txt").write_text("mine")
    rc = main(["export-pretrained", "--ckpt", str(torus_run), "--out", str(tmp_path), "--no-eval", "--no-gallery"])
    assert rc == 2 and "not an empty folder" in capsys.readouterr().err
    assert [p.name for p in tmp_path.iterdir()] == ["keep.txt"]


def test_seed_draws_reproducible_noise_and_none_keeps_the_mean(torus_run):
    from scalegen import TextTo3DPipeline

    pipe = TextTo3DPipeline.from_pretrained(torus_run)
    assert pipe.noise(2, None) is None
    assert pipe.noise(2, 3) is None  # Hyper-iNGP takes no noise: the seed cannot change its output
    pipe.model.generator.noise_dim = lambda: 4  # a generator that does take noise
    z1, z2, z3 = pipe.noise(2, 3), pipe.noise(2, 3), pipe.noise(2, 4)
    assert z1.shape == (2, 4) and torch.equal(z1, z2) and not torch.equal(z1, z3)


def test_renders_come_with_the_assets_when_asked(torus_run):
    from scalegen import TextTo3DPipeline

    pipe = TextTo3DPipeline.from_pretrained(torus_run)
    asset = pipe("a small blue torus", resolution=24, renders=2, render_size=16)[0]
    assert asset.renders.shape == (2, 16, 16, 3) and asset.renders.dtype.name == "uint8"
    centre = asset.renders[:, 6:10, 6:10].reshape(-1, 3).mean(0)
    assert centre[2] > centre[0]  # the blue ball fills the middle of the frame
