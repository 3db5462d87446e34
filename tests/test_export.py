"""Mesh export: a generator fitted to a red sphere exports a GLB whose vertex colours are red."""
import subprocess
import sys

import numpy as np
import pytest
import torch
import trimesh

from conftest import TINY
from scalegen.config import load_config
from scalegen.export.mesh import export_prompt, extract_mesh
from scalegen.train.checkpoint import save_checkpoint
from scalegen.train.model import build_model

RED = np.array([0.85, 0.18, 0.15])


@pytest.fixture(scope="module")
def red_run(tmp_path_factory):
    """A run directory whose generator was fitted (directly, at 3D points) to 'a large red sphere'
    of radius 0.35 - the shape and colour the exported mesh must show."""
    torch.manual_seed(0)
    cfg = load_config(None, TINY)
    text_encoder, model = build_model(cfg)
    cond = text_encoder.encode(["a large red sphere"])
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(300):
        pts = (torch.rand(1, 4096, 3) * 2 - 1) * cfg.render.bound
        field, _ = model(cond)
        sdf, rgb = field.query(pts)
        loss = (sdf - (pts.norm(dim=-1) - 0.35)).pow(2).mean() + (rgb - torch.tensor(RED).float()).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    run = tmp_path_factory.mktemp("red")
    (run / "config.yaml").write_text(cfg.to_yaml())
    state = {f"model.{k}": v for k, v in model.state_dict().items()}
    save_checkpoint(run, 1, state, opt.state_dict(), {"data": {"0": {"epoch": 0, "cursor": 0}}}, {})
    return run, cfg, text_encoder, model.eval()


def test_cli_exports_glb_with_prompt_colour(red_run, tmp_path):
    run = red_run[0]
    out = tmp_path / "red.glb"
    r = subprocess.run([sys.executable, "-m", "scalegen.cli", "generate", "--ckpt", str(run), "--prompt",
                        "a large red sphere", "--out", str(out), "--resolution", "64"], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert " s " in r.stdout or " s (" in r.stdout  # prints the time taken
    scene = trimesh.load(out)
    mesh = scene.to_geometry() if hasattr(scene, "to_geometry") else scene.dump(concatenate=True)
    colours = np.asarray(mesh.visual.vertex_colors)[:, :3] / 255.0
    assert np.abs(colours.mean(0) - RED).max() < 0.05
    # y-up sphere of radius ~0.35 centred at the origin.
    radii = np.linalg.norm(mesh.vertices, axis=1)
    assert abs(radii.mean() - 0.35) < 0.03 and np.abs(mesh.vertices.mean(0)).max() < 0.03


@pytest.mark.parametrize("suffix", [".obj", ".ply"])
def test_other_formats(red_run, tmp_path, suffix):
    _, cfg, te, model = red_run
    info = export_prompt(model, te, "a large red sphere", tmp_path / f"a{suffix}", cfg.render.bound, 48)
    m = trimesh.load(info["path"], force="mesh")
    assert len(m.faces) == info["faces"] > 100


def test_empty_shape_is_an_error_not_an_empty_file(red_run, tmp_path):
    from scalegen.errors import ExportError

    class Empty:
        n_prompts = 1

        def sdf(self, p):
            return torch.ones(1, p.shape[1])

    with pytest.raises(ExportError, match="empty"):
        extract_mesh(Empty(), 0.75, 32)


@pytest.mark.parametrize("args,needle", [
    (["--prompt", "  ", "--out", "{tmp}/a.glb"], "--prompt is empty"),
    (["--prompt", "a red cube", "--out", "{tmp}/no/such/dir/a.glb"], "does not exist"),
    (["--prompt", "a red cube", "--out", "{tmp}/a.txt"], ".glb"),
])
def test_generate_bad_input(red_run, tmp_path, args, needle):
    args = [a.replace("{tmp}", str(tmp_path)) for a in args]
    r = subprocess.run([sys.executable, "-m", "scalegen.cli", "generate", "--ckpt", str(red_run[0]), *args],
                       capture_output=True, text=True)
    assert r.returncode == 2 and needle in r.stderr and "Traceback" not in r.stderr
    assert not list(tmp_path.glob("*.glb"))


def test_floaters_are_dropped_but_real_parts_kept():
    from scalegen.export.mesh import extract_mesh

    class TwoBallsAndDust:
        """Two equal balls (a two-part object) and a speck far away."""

        n_prompts = 1

        def sdf(self, p):
            d1 = (p - torch.tensor([0.3, 0, 0])).norm(dim=-1) - 0.2
            d2 = (p + torch.tensor([0.3, 0, 0])).norm(dim=-1) - 0.2
            d3 = (p - torch.tensor([0, 0.6, 0.6])).norm(dim=-1) - 0.03
            return torch.minimum(torch.minimum(d1, d2), d3)

        def query(self, p):
            return self.sdf(p), torch.ones(*p.shape[:2], 3)

    v, f, _ = extract_mesh(TwoBallsAndDust(), 0.75, 64)
    assert np.abs(v[:, 1]).max() < 0.3  # the speck at y = 0.6 is gone
    assert v[:, 0].min() < -0.4 and v[:, 0].max() > 0.4  # both balls stay
    v_all, _, _ = extract_mesh(TwoBallsAndDust(), 0.75, 64, min_fragment=0)
    assert np.abs(v_all[:, 1]).max() > 0.5
