"""Per-prompt refinement: the starts (a run's field, asset files, 3DGS PLY), the command end to end,
exact resume with densification, and bad input."""
import json
from pathlib import Path

import numpy as np
import pytest
import torch
import trimesh

from conftest import TINY, fit_to_sphere, run_cli
from scalegen.config import load_config, load_yaml
from scalegen.errors import ScalegenError
from scalegen.export.gaussian_ply import read_gaussian_ply, write_gaussian_ply
from scalegen.refine import PRESETS, refine_config
from scalegen.refine.start import start_state
from scalegen.train.checkpoint import load_weights, resolve_checkpoint, save_checkpoint
from scalegen.train.model import build_model

ROOT = Path(__file__).resolve().parents[1]
RED = [0.85, 0.18, 0.15]
PROMPT = "a large red sphere"  # radius 0.45 in the oracle world
SMALL = ["camera.resolution=16", "camera.eval_resolution=16", "generator.gaussians.n_init=300", "train.threads=1",
         "train.logger=none", "train.progress=false", "prior.oracle.n_uncond=2",
         "generator.gaussians.start_fit_steps=10"]  # the fit's path, short (its effect: its own test)


@pytest.fixture(scope="module")
def red_run(tmp_path_factory):
    """An amortized run (tiny Hyper-iNGP) whose field for PROMPT was fitted directly to the world's sphere."""
    torch.manual_seed(0)
    cfg = load_config(None, TINY + ["generator.sdf_radius=0.45"])  # the start sphere is the prompt's sphere
    text_encoder, model = build_model(cfg)
    fit_to_sphere(model, text_encoder.encode([PROMPT]), cfg.render.bound, 0.45, RED, steps=60, points=2048)
    run = tmp_path_factory.mktemp("red")
    (run / "config.yaml").write_text(cfg.to_yaml())
    state = {f"model.{k}": v for k, v in model.state_dict().items()}
    save_checkpoint(run, 1, state, {"generator": None, "distiller": None}, {"data": {"0": {"epoch": 0, "cursor": 0}}}, {})
    return run, model.eval(), text_encoder


def test_gaussians_start_on_the_run_surface(red_run):
    run, _, _ = red_run
    cfg = refine_config(PROMPT, "gaussians", "vdm", str(run), None, SMALL + ["generator.gaussians.start_fit_steps=0"])
    assert cfg.world.colors == ["red", "green", "blue"] and cfg.generator.hash_levels == 4  # the run's own config
    state, info = start_state(cfg, str(run))
    assert info["start"] == "run"
    means = state["generator.means"]
    assert len(means) == 300
    assert (means.norm(dim=-1) - 0.45).abs().max() < 0.03  # on the fitted sphere
    rgb = state["generator.sh_dc"] * 0.28209479177387814 + 0.5
    assert torch.allclose(rgb.mean(0), torch.tensor(RED), atol=0.05)
    # discs tangent to the surface: the short axis is the normal
    from scalegen.render.gaussians import quaternion_to_matrix

    axis = quaternion_to_matrix(state["generator.quats"])[..., 2]
    assert (axis * torch.nn.functional.normalize(means, dim=-1)).sum(-1).abs().min() > 0.95
    assert torch.equal(state["background.out.3.weight"], red_run[1].background.state_dict()["out.3.weight"])


def test_fitting_the_start_to_the_run_renders_brings_it_closer(red_run):
    """The discs fitted to the run's own renders (start_fit_steps) render nearer to the run on the held-out
    evaluation orbit than the discs as placed; the background stays the run's."""
    from scalegen.eval.oracle import eval_cameras
    from scalegen.render import build_renderer
    from scalegen.train.model import load_run

    run, model, text_encoder = red_run
    run_cfg, _, _, _ = load_run(run)
    cond = text_encoder.encode([PROMPT])
    cams = eval_cameras(load_config(None, SMALL))
    with torch.no_grad():
        field, bg = model(cond)
        target = build_renderer(run_cfg)(field, cams, background=bg)
    err, infos = [], []
    for steps in (0, 40):
        cfg = refine_config(PROMPT, "gaussians", "vdm", str(run), None,
                            SMALL + [f"generator.gaussians.start_fit_steps={steps}", "train.max_steps=100",
                                     "generator.gaussians.densify_every=10", "generator.gaussians.densify_grad=1e-9",
                                     "generator.gaussians.densify_until=1.0"])  # distillation would densify
        state, info = start_state(cfg, str(run))
        _, scene = build_model(cfg)
        scene.load_state_dict(state)
        with torch.no_grad():
            f, b = scene.eval()(cond)
            out = build_renderer(cfg)(f, cams, background=b)
        err.append(float((out.rgb - target.rgb).pow(2).mean() + (out.opacity - target.opacity).pow(2).mean()))
        infos.append(info)
        assert torch.equal(state["background.out.3.weight"], model.background.state_dict()["out.3.weight"])
    assert "fit_steps" not in infos[0] and infos[1]["fit_steps"] == 40
    assert infos[1]["fit_loss_last"] < infos[1]["fit_loss_first"]
    assert infos[1]["gaussians"] == len(state["generator.means"]) == 300  # converged, not densified
    assert err[1] < 0.7 * err[0], err


def test_a_run_start_keeps_the_runs_background_and_gaussians(red_run):
    """Refinement from a run does not train the world's background it copied, nor densify the discs fitted to
    the run; a sphere start (which has no background to copy and no surface yet) still learns and grows."""
    run, _, _ = red_run
    from_run = refine_config(PROMPT, "gaussians", "vdm", str(run), None, SMALL)
    assert from_run.optim.lr_background == 0.0 and from_run.generator.gaussians.densify_until == 0.0
    sphere = refine_config(PROMPT, "gaussians", "vdm", None, None, SMALL, base_run=str(run))
    assert sphere.optim.lr_background == PRESETS["gaussians"]["optim"]["lr_background"] > 0
    assert sphere.generator.gaussians.densify_until > 0  # a sphere has to grow
    again = refine_config(PROMPT, "gaussians", "vdm", str(run), None, SMALL + ["optim.lr_background=1e-4"])
    assert again.optim.lr_background == 1e-4  # the user's override still wins


def test_ingp_start_is_exactly_the_amortized_field(red_run):
    run, model, text_encoder = red_run
    cfg = refine_config(PROMPT, "ingp", "asd", str(run), None, SMALL)
    state, _ = start_state(cfg, str(run))
    _, single = build_model(cfg)
    single.load_state_dict(state)
    cond = text_encoder.encode([PROMPT])
    pts = (torch.rand(1, 2000, 3) * 2 - 1) * 0.75
    with torch.no_grad():
        a, b = model(cond)[0].query(pts), single(cond)[0].query(pts)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])


def _cli(*args):
    return run_cli(*args, cwd=ROOT)


@pytest.mark.slow
def test_refine_command_end_to_end(red_run, tmp_path):
    """`scalegen refine` from a run: a report with the amortized / start / refined scores, a 3DGS PLY, a
    mesh; `scalegen eval` scores the prompt; `--resume` continues it."""
    run, _, _ = red_run
    out = tmp_path / "refined"
    r = _cli("refine", "--prompt", PROMPT, "--distill", "vdm", "--init-from", str(run), "--out", str(out),
             "--mesh-resolution", "48", *SMALL, "generator.gaussians.n_init=1000", "camera.eval_resolution=32",
             "train.max_steps=4", "train.ckpt_every=2",
             "generator.gaussians.densify_every=2", "generator.gaussians.densify_grad=1e-9",
             "generator.gaussians.densify_until=0.6")  # a run start does not densify unless asked
    assert r.returncode == 0, r.stderr
    assert "amortized generator" in r.stdout and "refined" in r.stdout
    rep = json.loads((out / "refine.json").read_text())
    assert set(rep["metrics"]) == {"amortized", "start", "refined"} and rep["distill"] == "vdm"
    assert rep["metrics"]["amortized"]["iou"] > 0.9 and rep["metrics"]["start"]["iou"] > 0.85  # the same sphere
    g = read_gaussian_ply(out / "gaussians.ply")
    assert len(g["means"]) == rep["gaussians"] > 1000  # densified
    mesh = trimesh.load(out / "mesh.glb", force="mesh")
    assert len(mesh.faces) > 100
    weights = load_weights(resolve_checkpoint(out))
    for k, v in red_run[1].background.state_dict().items():  # the run's background, copied and kept
        assert torch.equal(weights[f"model.background.{k}"], v), k
    r = _cli("eval", "--ckpt", str(out))
    assert r.returncode == 0 and "seen" in r.stdout, r.stderr
    r = _cli("refine", "--out", str(out), "--resume", "train.max_steps=6", "--mesh-resolution", "48")
    assert r.returncode == 0, r.stderr
    assert json.loads((out / "refine.json").read_text())["checkpoint"].endswith("step_0000006")
    from scalegen import TextTo3DPipeline  # the Python API loads the refined scene and writes its Gaussians

    asset = TextTo3DPipeline.from_pretrained(out)([PROMPT], resolution=32)[0]
    asset.save(tmp_path / "scene.ply")
    ours, written = read_gaussian_ply(tmp_path / "scene.ply"), read_gaussian_ply(out / "gaussians.ply")
    assert all(torch.equal(ours[k], written[k]) for k in written)
    r = _cli("generate", "--ckpt", str(out), "--prompt", "a small blue cube", "--out", str(tmp_path / "x.glb"))
    assert r.returncode == 2 and "per-prompt scene" in r.stderr


def test_resume_with_densification_is_exact(tmp_path, monkeypatch):
    """A refinement killed after a densification (its checkpoint holds more Gaussians than the start, and
    the densification statistics gathered since) continues to the same weights as one that ran through."""
    import scalegen.train.loop as loop

    over = TINY + SMALL + ["data.prompts_per_step=1", "train.max_steps=6", "train.ckpt_every=3",
                           "generator.gaussians.densify_every=2", "generator.gaussians.densify_until=6.0",
                           "generator.gaussians.densify_grad=1e-9", "generator.gaussians.max_gaussians=2000"]
    cfg = refine_config("a small blue cube", "gaussians", "sds", None, None, over)
    loop.train(cfg, tmp_path / "through")
    real, calls = loop.sample_train_cameras, []

    def crash(*a, **k):  # killed during step 5: the last checkpoint is step 3, after the step-2 densification
        calls.append(1)
        if len(calls) == 5:
            raise KeyboardInterrupt
        return real(*a, **k)

    monkeypatch.setattr(loop, "sample_train_cameras", crash)
    with pytest.raises(KeyboardInterrupt):
        loop.train(cfg, tmp_path / "cut")
    monkeypatch.setattr(loop, "sample_train_cameras", real)
    assert load_weights(resolve_checkpoint(tmp_path / "cut"))["model.generator.means"].shape[0] > 300
    loop.train(cfg, tmp_path / "cut", resume=True)
    a = load_weights(resolve_checkpoint(tmp_path / "through"))
    b = load_weights(resolve_checkpoint(tmp_path / "cut"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_start_from_asset_files(tmp_path):
    """A y-up GLB mesh (as `scalegen generate` writes) and a 3DGS PLY (as `scalegen refine` writes)."""
    cfg = refine_config(PROMPT, "gaussians", "sds", None, None, TINY + SMALL + ["data.prompts_per_step=1"])
    sphere = trimesh.creation.icosphere(subdivisions=3, radius=0.3)
    sphere.apply_translation([0.0, 0.1, 0.0])  # y-up: up by 0.1
    sphere.visual.vertex_colors = np.tile([20, 200, 40, 255], (len(sphere.vertices), 1))
    glb = tmp_path / "s.glb"
    sphere.export(glb)
    state, info = start_state(cfg, str(glb))
    m = state["generator.means"]
    assert info["start"] == "file" and len(m) == 300
    assert abs(float(m[:, 2].mean()) - 0.1) < 0.02  # z-up now
    assert ((m - torch.tensor([0, 0, 0.1])).norm(dim=-1) - 0.3).abs().max() < 0.01
    assert torch.allclose(state["generator.sh_dc"].mean(0) * 0.28209479177387814 + 0.5,
                          torch.tensor([20, 200, 40]) / 255.0, atol=0.01)
    # a 3DGS PLY starts as exactly its Gaussians
    g = {"means": m, "log_scales": state["generator.log_scales"], "quats": state["generator.quats"],
         "opacity_logits": state["generator.opacity_logits"], "sh": state["generator.sh_dc"][:, None]}
    ply = write_gaussian_ply(tmp_path / "g.ply", **g)
    again, _ = start_state(cfg, str(ply))
    assert torch.equal(again["generator.means"], m) and torch.equal(again["generator.quats"], g["quats"])
    # too large for the scene box unless fitted
    sphere.apply_scale(4.0)
    sphere.export(glb)
    with pytest.raises(ScalegenError, match="--fit"):
        start_state(cfg, str(glb))
    fitted, _ = start_state(cfg, str(glb), fit=True)
    assert float(fitted["generator.means"].abs().max()) <= cfg.generator.sdf_radius + 1e-5


@pytest.mark.parametrize("args,needle", [
    (["--prompt", "a purple dragon"], "not in the oracle world"),
    (["--prompt", PROMPT, "--init-from", "nowhere/at/all"], "does not exist"),
    (["--prompt", PROMPT, "--representation", "ingp", "--init-from", "{glb}"], "asset file starts Gaussians"),
    (["--prompt", PROMPT, "--init-from", "{txt}"], "must be .ply"),
    (["--resume", "--prompt", PROMPT], "--resume continues"),
    (["--prompt", PROMPT, "generator.gaussians.n_init=0"], "must be >= 1"),
    (["--prompt", PROMPT, "generator.gaussians.sh_degree=4"], "must be <= 3"),
])
def test_bad_input_is_one_line(tmp_path, args, needle):
    glb, txt = tmp_path / "m.glb", tmp_path / "m.txt"
    trimesh.creation.box().export(glb)
    txt.write_text("x")
    args = [a.format(glb=glb, txt=txt) for a in args]
    flags = [a for a in args if "=" not in a]
    overrides = [a for a in args if "=" in a]  # last, so they win over SMALL's
    r = _cli("refine", "--out", str(tmp_path / "o"), *flags, *SMALL, "train.max_steps=1", *overrides)
    assert r.returncode == 2 and needle in r.stderr and "Traceback" not in r.stderr, r.stderr
    assert sum(line.startswith("error:") for line in r.stderr.splitlines()) == 1


def test_preset_files_match_the_code():
    for name, preset in PRESETS.items():
        assert load_yaml(ROOT / "configs" / "refine" / f"{name}.yaml") == preset, name


def test_start_from_obj_mesh_and_point_cloud_ply(tmp_path):
    """An OBJ mesh (face colours) starts as discs on its surface; a plain PLY point cloud (no 3DGS fields)
    as isotropic Gaussians at its points, with their colours."""
    cfg = refine_config(PROMPT, "gaussians", "sds", None, None, TINY + SMALL + ["data.prompts_per_step=1"])
    box = trimesh.creation.box(extents=[0.4, 0.4, 0.4])
    box.visual.face_colors = np.tile([200, 30, 30, 255], (len(box.faces), 1))
    obj = tmp_path / "box.obj"
    box.export(obj)
    state, info = start_state(cfg, str(obj), up="z")
    m = state["generator.means"]
    assert info["start"] == "file" and len(m) == 300
    assert (m.abs().amax(-1) - 0.2).abs().max() < 1e-3  # every point on a face of the box
    from scalegen.render.gaussians import quaternion_to_matrix

    axis = quaternion_to_matrix(state["generator.quats"])[..., 2]
    on_face = m.abs().argmax(-1)  # the face's normal axis
    assert (axis.gather(1, on_face[:, None]).abs() > 0.99).all()  # discs lie in their face
    pts = np.random.default_rng(0).uniform(-0.3, 0.3, (120, 3))
    cloud = trimesh.PointCloud(pts, colors=np.tile([10, 20, 250, 255], (120, 1)))
    ply = tmp_path / "cloud.ply"
    cloud.export(ply)
    state, info = start_state(cfg, str(ply), up="z")
    assert info["points"] == 120 and np.allclose(np.sort(state["generator.means"].numpy(), 0), np.sort(pts, 0), atol=1e-6)
    scales = state["generator.log_scales"].exp()
    assert torch.allclose(scales[:, 0], scales[:, 2])  # isotropic
    assert torch.allclose(state["generator.sh_dc"].mean(0) * 0.28209479177387814 + 0.5,
                          torch.tensor([10, 20, 250]) / 255.0, atol=0.01)


@pytest.mark.slow
def test_refine_bench_on_a_tiny_run(red_run, tmp_path):
    """`bench refine`: per case a PSNR curve from step 0 (the start) over every kept checkpoint, the
    amortized generator's scores, and steps to reach its PSNR from the run vs from a sphere."""
    from scalegen.bench.refine import RefineBenchOptions, bench_refine, steps_to

    run, _, _ = red_run
    opts = RefineBenchOptions(run=str(run), prompt=PROMPT, distillers=["vdm"], steps=2, eval_every=1,
                              mesh_resolution=32, targets=[-100.0, 100.0])
    res = bench_refine(opts, SMALL + ["camera.eval_resolution=16"], str(tmp_path))
    assert [c["case"] for c in res["cases"]] == ["vdm-run", "vdm-sphere"]
    for c in res["cases"]:
        assert [r["step"] for r in c["curve"]] == [0, 1, 2]
        assert c["curve"][-1]["psnr"] == pytest.approx(c["metrics"]["refined"]["psnr"], abs=1e-4)
        assert c["train_cpu_s"] > 0 and c["start_cpu_s"] >= 0
    assert res["amortized"]["iou"] > 0.9  # the fitted sphere
    assert res["steps_to_psnr"][0]["from_run"] == 0 and res["steps_to_psnr"][1]["from_sphere"] is None
    assert steps_to([{"step": 0, "psnr": 1.0}, {"step": 5, "psnr": 3.0}], 2.0) == 5


def test_refine_bench_reports_a_failed_case_and_goes_on(red_run, tmp_path, monkeypatch, capsys):
    """A case that fails (here the sphere start's scene vanishing) is a row of the result, not the end of the
    bench: the cases before it keep their scores."""
    import scalegen.bench.refine as bench
    from scalegen.errors import TrainingError

    real = bench.refine

    def refine(cfg, out, init_from=None, **kw):
        if init_from is None:
            raise TrainingError("the Gaussian scene vanished")
        return real(cfg, out, init_from=init_from, **kw)

    monkeypatch.setattr(bench, "refine", refine)
    run, _, _ = red_run
    opts = bench.RefineBenchOptions(run=str(run), prompt=PROMPT, distillers=["sds"], steps=1, eval_every=1,
                                    mesh_resolution=32)
    res = bench.bench_refine(opts, SMALL + ["camera.eval_resolution=16"], str(tmp_path))
    ok, failed = res["cases"]
    assert ok["case"] == "sds-run" and "refined" in ok["metrics"]
    assert failed["case"] == "sds-sphere" and failed["failed"] == "the Gaussian scene vanished"
    assert res["steps_to_psnr"][0]["from_sphere"] is None
    assert "sds-sphere" in capsys.readouterr().out


def test_mvdream_sds_preset_holds_the_references_recipe():
    """configs/refine/mvdream_sds.yaml over the ingp preset: MVDream-threestudio's configs/mvdream-sd21.yaml
    numbers (CFG 50, x0 reconstruction with rescale 0.5, t from 0.98 to [0.02, 0.5] over 8000 steps, 64 px x 8
    views in 4-view groups, then 256 px x 4 from step 5000)."""
    cfg = refine_config("an astronaut riding a horse", "ingp", "sds",
                        config_file=str(ROOT / "configs" / "refine" / "mvdream_sds.yaml"))
    d, c = cfg.distill, cfg.camera
    assert (d.name, d.guidance_scale, d.sds_x0_recon, d.sds_x0_rescale) == ("sds", 50.0, True, 0.5)
    assert (d.t_range_start, d.t_range_end, d.t_anneal_steps, d.t_per) == ([0.98, 0.98], [0.02, 0.5], 8000, "prompt")
    assert cfg.prior.name == "mvdream" and cfg.train.max_steps == 10000 and c.sampler == "mvdream"
    before, after = c.at_step(4999, cfg.train.max_steps), c.at_step(5000, cfg.train.max_steps)
    assert (before.resolution, before.views_per_prompt, before.views_per_group()) == (64, 8, 4)
    assert (after.resolution, after.views_per_prompt, after.views_per_group()) == (256, 4, 4)
    assert (c.elevation_range, c.fovy_range, c.distance_range, c.sphere_draw) == (
        [0.0, 30.0], [15.0, 60.0], [0.8, 1.0], "mvdream")
