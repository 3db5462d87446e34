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


pytestmark = pytest.mark.usefixtures("one_thread")


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


# --- the demo ----------------------------------------------------------------------------------
def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def demo_url(torus_run):
    pytest.importorskip("gradio", reason='the demo is an optional extra: pip install "scalegen[demo]"')
    from scalegen import TextTo3DPipeline
    from scalegen.pipeline.demo import launch

    port = _free_port()
    demo = launch(TextTo3DPipeline.from_pretrained(torus_run), port=port, block=False)
    yield f"http://127.0.0.1:{port}/"
    demo.close()


def test_requests_that_arrive_together_share_one_generator_call(torus_run, tmp_path):
    from scalegen import TextTo3DPipeline
    from scalegen.pipeline.demo import generate_batch

    pipe = TextTo3DPipeline.from_pretrained(torus_run)
    calls = []
    real = pipe.__call__

    class Counting(TextTo3DPipeline):
        def __call__(self, prompts, **kw):
            calls.append(list(prompts))
            return real(prompts, **kw)

    pipe.__class__ = Counting
    prompts = ["a small blue torus", "a large red sphere", "a purple dragon", "a small red torus"]
    views, downloads, status = generate_batch(pipe, prompts, [-1, -1, -1, 5], [48, 48, 48, 48], tmp_path)
    assert calls == [["a small blue torus", "a large red sphere"], ["a small red torus"]]  # by (seed, resolution)
    assert views == downloads and views[2] is None and status[2].startswith("error:") and "oracle world" in status[2]
    assert all(Path(v).read_bytes()[:4] == b"glTF" for v in (views[0], views[1], views[3]))
    assert "one call for 2 requests" in status[0]


def test_demo_answers_through_gradio_client(demo_url, tmp_path):
    from gradio_client import Client

    client = Client(demo_url, download_files=str(tmp_path), verbose=False)
    view, download, info = client.predict("a small blue torus", -1, 64, api_name="/generate")
    assert Path(view).read_bytes()[:4] == b"glTF" and Path(download).read_bytes() == Path(view).read_bytes()
    assert "faces in" in info
    view, download, info = client.predict("a purple dragon", -1, 64, api_name="/generate")
    assert view is None and info.startswith("error:")


@pytest.mark.slow
def test_demo_draws_the_model_and_downloads_it_in_headless_chromium(demo_url, tmp_path):
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if chromium is None:
        pytest.skip("chromium is not installed (apt-get install chromium; .ci/run installs it where it can)")
    if shutil.which("node") is None or not (REPO / "node_modules" / "puppeteer-core").is_dir():
        pytest.skip("node or puppeteer-core is missing: install Node.js and run `npm ci` (.ci/run does)")
    import os

    shot = tmp_path / "demo.png"
    r = subprocess.run(["node", str(REPO / "tests" / "js" / "drive_demo.js"), demo_url, "a small blue torus",
                        str(tmp_path), str(shot)], capture_output=True, text=True, cwd=REPO, timeout=240,
                       env={**os.environ, "CHROMIUM": chromium})
    assert r.returncode == 0, r.stderr + r.stdout
    page = json.loads(r.stdout.strip().splitlines()[-1])
    assert not page["page_errors"], page
    assert page["object_pixels"] > 0.01, page  # the viewer drew a model
    assert page["info"].startswith(tuple("0123456789")) and "faces in" in page["info"], page
    glbs = [p for p in tmp_path.iterdir() if p.suffix == ".glb"]
    assert len(glbs) == 1 and glbs[0].read_bytes()[:4] == b"glTF"  # the download button gave the file


# --- 3D assets at validation ---------------------------------------------------------------------
def test_validation_writes_meshes_turntables_and_metrics_into_the_run(tmp_path):
    run = tmp_path / "run"
    assert main(["train", "--out", str(run), *TINY, "train.max_steps=2", "train.val_every=2", "train.ckpt_every=2",
                 "train.val_assets=2"]) == 0
    folder = run / "val" / "step_0000002"
    glbs = sorted(folder.glob("*.glb"))
    videos = sorted(p for p in folder.iterdir() if p.suffix in (".mp4", ".gif"))
    assert len(glbs) == len(videos) == 2  # train.val_assets
    assert all(p.read_bytes()[:4] == b"glTF" for p in glbs)
    val = [json.loads(x) for x in (run / "val" / "metrics.jsonl").read_text().splitlines()]
    assert len(val) == 1 and val[0]["step"] == 2 and 0 < val[0]["val/unseen/iou"] <= 1
    assert all("loss" in json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines())
    off = tmp_path / "off"
    assert main(["train", "--out", str(off), *TINY, "train.max_steps=1", "train.val_assets=0"]) == 0
    assert not list((off / "val").glob("step_*/*.glb"))


def test_an_offline_wandb_run_holds_the_validation_meshes_as_object3d(tmp_path, monkeypatch):
    pytest.importorskip("wandb", reason='W&B logging is an optional extra: pip install "scalegen[wandb]"')
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    run = tmp_path / "run"
    assert main(["train", "--out", str(run), *[o for o in TINY if not o.startswith("train.logger")],
                 "train.logger=wandb", "train.max_steps=2", "train.val_every=2", "train.val_assets=2"]) == 0
    media = list(run.glob("wandb/offline-run-*/files/media/object3D/val/mesh/*.glb"))
    assert len(media) == 2, sorted(str(p) for p in run.rglob("*") if p.is_file())
    assert all(p.read_bytes()[:4] == b"glTF" for p in media)
    videos = list(run.glob("wandb/offline-run-*/files/media/videos/val/turntable/*.*"))
    assert len(videos) == 2
