"""Where per-prompt refinement starts: a sphere (the generator's own start), an asset file (a 3DGS PLY,
a point cloud, or a mesh: PLY / OBJ / GLB, e.g. a Shap-E output or a `scalegen generate` asset), or a
trained amortized generator's field for the prompt (a run directory).

Each start is a ``SceneModel`` state (``train.loop.train(init_state=...)``) built on the refine config:
  * Gaussians from a run: ``surface_samples`` of the run's SDF for the prompt (points on the zero level
    set, their colours and normals) become discs tangent to the surface, then ``fit_to_renders`` fits
    them to the run's own renders of the prompt (``generator.gaussians.start_fit_steps``: discs on the
    zero level set alone render well below the run, docs/notes/2026-11-30-refine-fitted-start-six-prompts.md);
    the run's background is copied;
  * single-prompt iNGP from a Hyper-iNGP run: the run's hash grid and the MLP weights its hypernetwork
    emits for the prompt, so the start renders exactly as the amortized generator does;
  * Gaussians from a 3DGS PLY: its Gaussians as they are; from a mesh: surface samples with their face
    normals and colours; from a point cloud: isotropic Gaussians at its points.
Assets other than 3DGS PLY are read y-up (glTF's convention, which `scalegen generate` writes) unless
``up="z"``; a 3DGS PLY is in the scene's frame (z-up), as `scalegen refine` writes it.
"""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import numpy as np
import torch
from torch import Tensor

from scalegen.config import PER_PROMPT, Config
from scalegen.data.cameras import sample_train_cameras
from scalegen.errors import ConfigError, DataError
from scalegen.export.gaussian_ply import is_gaussian_ply, read_gaussian_ply
from scalegen.generators import GaussianScene, HyperINGP, SingleINGP
from scalegen.render import build_renderer
from scalegen.render.base import Field
from scalegen.train.loop import build_optimizer
from scalegen.train.model import SceneModel, build_model, load_run

ASSET_SUFFIXES = (".ply", ".obj", ".glb", ".gltf")


def describe_start(init_from: Optional[str]) -> str:
    """'sphere', 'run' or 'file' for a ``--init-from`` value (checked: a clear error when it is neither)."""
    if init_from in (None, "sphere"):
        return "sphere"
    p = Path(init_from)
    if p.is_dir():
        return "run"
    if p.is_file():
        if p.suffix.lower() not in ASSET_SUFFIXES:
            raise ConfigError(f"--init-from '{init_from}': a start file must be {', '.join(ASSET_SUFFIXES)}")
        return "file"
    raise ConfigError(f"--init-from '{init_from}' does not exist; give 'sphere', a run directory of `scalegen "
                      "train`, or a PLY / OBJ / GLB file")


@torch.no_grad()
def surface_samples(field: Field, n: int, bound: float, grid: int = 64, seed: int = 0) -> tuple[Tensor, Tensor, Tensor]:
    """``n`` points on the zero level set of a one-prompt SDF ``field``, with its colours there and unit
    normals (points [n, 3], colours [n, 3], normals [n, 3]).

    Grid points within a cell of the surface (cells meet the surface in proportion to its area, so the
    draw is near-uniform on it) are pulled onto it by two Newton steps p <- p - d(p) grad d / |grad d|^2
    (central differences), and those that land within a tenth of a cell are kept."""
    gen = torch.Generator().manual_seed(seed)
    cell = 2 * bound / (grid - 1)
    axis = torch.linspace(-bound, bound, grid)
    pts = torch.stack(torch.meshgrid(axis, axis, axis, indexing="ij"), -1).reshape(-1, 3)

    def sdf(x: Tensor) -> Tensor:
        return torch.cat([field.sdf(x[i:i + 65536][None])[0] for i in range(0, len(x), 65536)])

    def grad(x: Tensor) -> Tensor:
        e = 0.25 * cell
        return torch.stack([(sdf(x + e * d) - sdf(x - e * d)) / (2 * e) for d in torch.eye(3)], -1)

    near = pts[sdf(pts).abs() < cell]
    if len(near) == 0:
        raise DataError("the generator's field for this prompt has no surface inside the scene box; check the run "
                        "(`scalegen eval`) or start from a sphere")
    near = near + (torch.rand(near.shape, generator=gen) - 0.5) * cell  # off the lattice
    for _ in range(2):
        gr = grad(near)
        near = near - sdf(near)[:, None] * gr / gr.pow(2).sum(-1, keepdim=True).clamp(min=1e-8)
    near = near[(sdf(near).abs() < 0.1 * cell) & (near.abs() <= bound).all(-1)]
    if len(near) == 0:
        raise DataError("could not place points on the generator's surface for this prompt; start from a sphere")
    pick = torch.randperm(len(near), generator=gen)[:n]
    points = near[pick]
    normals = torch.nn.functional.normalize(grad(points), dim=-1)
    colours = torch.cat([field.query(points[i:i + 65536][None])[1][0] for i in range(0, len(points), 65536)])
    return points, colours.clamp(0, 1), normals


def read_asset(path: str | Path, n: int, up: str = "y", seed: int = 0) -> tuple[Tensor, Tensor, Optional[Tensor]]:
    """(points [m, 3] z-up, colours [m, 3], normals [m, 3] or None) of a mesh (``n`` surface samples) or a
    point cloud (its points, at most ``n``)."""
    import trimesh  # noqa: PLC0415 - heavy import

    try:
        obj = trimesh.load(str(path))
    except Exception as e:  # noqa: BLE001 - any parse failure is the same user problem
        raise DataError(f"cannot read '{path}' as a mesh or point cloud ({e.__class__.__name__}: {e})") from None
    if isinstance(obj, trimesh.Scene):
        meshes = [g for g in obj.dump() if isinstance(g, trimesh.Trimesh) and len(g.faces)]
        obj = trimesh.util.concatenate(meshes) if meshes else None
    rng = np.random.default_rng(seed)
    if isinstance(obj, trimesh.Trimesh) and len(obj.faces):
        visual = obj.visual.to_color() if obj.visual.kind == "texture" else obj.visual
        pts, face, bary = trimesh.sample.sample_surface(obj, n, return_barycentric=True, seed=seed)
        if visual.kind == "vertex":
            vc = np.asarray(visual.vertex_colors, dtype=np.float64)[:, :3] / 255.0
            col = (vc[obj.faces[face]] * bary[:, :, None]).sum(1)
        elif visual.kind == "face":
            col = np.asarray(visual.face_colors, dtype=np.float64)[face, :3] / 255.0
        else:
            col = np.full((len(pts), 3), 0.5)
        normals = np.asarray(obj.face_normals)[face]
    elif isinstance(obj, trimesh.PointCloud) and len(obj.vertices):
        pts = np.asarray(obj.vertices)
        colors = np.asarray(obj.colors)
        col = colors[:, :3] / 255.0 if len(colors) == len(pts) else np.full((len(pts), 3), 0.5)
        if len(pts) > n:
            pick = rng.choice(len(pts), n, replace=False)
            pts, col = pts[pick], col[pick]
        normals = None
    else:
        raise DataError(f"'{path}' holds no mesh faces and no points to start from")

    def to_z_up(a: np.ndarray) -> Tensor:
        t = torch.from_numpy(np.asarray(a, dtype=np.float32))
        return torch.stack([t[:, 0], -t[:, 2], t[:, 1]], 1) if up == "y" else t

    return to_z_up(pts), torch.from_numpy(np.asarray(col, dtype=np.float32)), \
        None if normals is None else to_z_up(normals)


def fit_to_renders(cfg: Config, model: SceneModel, run_cfg: Config, run_model: SceneModel, cond, steps: int) -> dict:
    """Fit a Gaussian ``model`` to the amortized ``run_model``'s renders of the prompt ``cond``: ``steps``
    Adam steps of L = |I_G - I_run|^2 + |A_G - A_run|^2 (RGB I, opacity A) on random training views, the
    background frozen (both render over the run's own).

    The discs already sit on the run's surface, so the fit only has to converge, not to grow: the refine
    config's learning rates times ``start_fit_lr_scale``, decaying exponentially to ``start_fit_lr_end`` of
    that at the last step, and no densification (held rates with densification converge slower and less
    steadily: docs/notes/2026-12-01-refine-converged-fit.md). Returns the first and last loss and the Gaussian count."""
    gs = cfg.generator.gaussians
    renderer, run_renderer = build_renderer(cfg), build_renderer(run_cfg)
    model.background.eval().requires_grad_(False)
    run_model.eval()
    with torch.no_grad():
        run_field, run_bg = run_model(cond)
    opt = build_optimizer(cfg, model)
    base_lr = [group["lr"] * gs.start_fit_lr_scale for group in opt.param_groups]
    gen_cam = torch.Generator().manual_seed(cfg.train.seed)
    losses = []
    for step in range(steps):
        decay = gs.start_fit_lr_end ** (step / max(steps - 1, 1))
        for group, lr in zip(opt.param_groups, base_lr):
            group["lr"] = lr * decay
        cams = sample_train_cameras(cfg.camera.at_step(0, cfg.train.max_steps), 1, generator=gen_cam)
        with torch.no_grad():
            target = run_renderer(run_field, cams, background=run_bg)
        field, bg = model(cond)
        out = renderer(field, cams, background=bg)
        loss = (out.rgb - target.rgb).pow(2).mean() + (out.opacity - target.opacity).pow(2).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    model.background.train().requires_grad_(True)
    return {"fit_steps": steps, "fit_loss_first": losses[0] if losses else None,
            "fit_loss_last": losses[-1] if losses else None, "gaussians": model.generator.n_gaussians}


def fit_points(points: Tensor, radius: float) -> tuple[Tensor, float, Tensor]:
    """Centre ``points`` on their bounding box and scale its largest half-extent to ``radius``;
    returns (points, scale, centre)."""
    lo, hi = points.amin(0), points.amax(0)
    centre = 0.5 * (lo + hi)
    half = float((hi - lo).amax()) * 0.5
    scale = radius / max(half, 1e-8)
    return (points - centre) * scale, scale, centre


def _check_finite(path: Path, arrays: dict[str, Tensor], what: str) -> None:
    """Refuse a start file with NaN or infinite values, naming the file: a NaN start renders nothing, and the
    refinement would end in a "the scene vanished" that blames the start, not the file."""
    for name, a in arrays.items():
        bad = ~torch.isfinite(a.reshape(len(a), -1)).all(1) if a.numel() else torch.zeros(0, dtype=torch.bool)
        if bool(bad.any()):
            raise DataError(f"start file '{path}' has non-finite {name} (NaN or infinity) in {int(bad.sum())} of its "
                            f"{len(a)} {what}; repair or re-export it, or start from another file (--init-from)")


def start_state(cfg: Config, init_from: Optional[str], up: str = "y", fit: bool = False) -> tuple[Optional[dict], dict]:
    """(the ``SceneModel`` state refinement starts from, or None for the generator's own sphere start; facts
    about the start for the report)."""
    kind = describe_start(init_from)
    if kind == "sphere":
        return None, {"start": "sphere", "radius": cfg.generator.sdf_radius}
    torch.manual_seed(cfg.train.seed)
    text_encoder, model = build_model(cfg)
    gen = model.generator
    if kind == "run":
        run_cfg, run_te, run_model, ckpt = load_run(init_from)
        if run_cfg.generator.name in PER_PROMPT:
            raise ConfigError(f"--init-from '{init_from}' is a per-prompt run; continue it with `scalegen refine --out "
                              f"{init_from} --resume`, or start from an amortized run")
        if run_te.id != text_encoder.id:
            raise ConfigError(f"the run's text encoder ({run_te.id}) is not this config's ({text_encoder.id}); refine "
                              "with the run's own config (do not override text.*)")
        cond = run_te.encode([cfg.data.prompt])
        field, _ = run_model(cond)
        model.background.load_state_dict(run_model.background.state_dict())  # before a fit that renders over it
        if isinstance(gen, GaussianScene):
            pts, col, nrm = surface_samples(field, cfg.generator.gaussians.n_init, run_cfg.render.bound,
                                            seed=cfg.train.seed)
            gen.set_points(pts, col, normals=nrm, opacity=cfg.generator.gaussians.surface_opacity)
            info = {"start": "run", "run": str(ckpt), "points": len(pts)}
            if cfg.generator.gaussians.start_fit_steps:
                info.update(fit_to_renders(cfg, model, run_cfg, run_model, cond,
                                           cfg.generator.gaussians.start_fit_steps))
        elif isinstance(gen, SingleINGP):
            if not isinstance(run_model.generator, HyperINGP):
                raise ConfigError(f"a single-prompt iNGP starts from a Hyper-iNGP run; '{init_from}' trained "
                                  f"{run_cfg.generator.name} (start Gaussians from it instead: --representation gaussians)")
            gen.from_hyper_ingp(run_model.generator, cond)
            info = {"start": "run", "run": str(ckpt)}
        else:  # pragma: no cover - refine only builds per-prompt generators
            raise AssertionError(type(gen).__name__)
        return model.state_dict(), info
    # an asset file
    if not isinstance(gen, GaussianScene):
        raise ConfigError(f"--init-from '{init_from}': an asset file starts Gaussians (--representation gaussians); "
                          "a single-prompt iNGP starts from a sphere or a Hyper-iNGP run")
    path = Path(init_from)
    info = {"start": "file", "file": str(path)}
    if path.suffix.lower() == ".ply" and is_gaussian_ply(path):
        rows = read_gaussian_ply(path)
        k = (gen.sh_degree + 1) ** 2
        sh = rows["sh"][:, :k]
        sh = torch.cat([sh, sh.new_zeros(len(sh), k - sh.shape[1], 3)], 1)
        points = rows["means"]
        _check_finite(path, {k: v for k, v in rows.items() if torch.is_tensor(v)}, "Gaussians")
        if fit:
            points, scale, _ = fit_points(points, cfg.generator.sdf_radius)
            rows["log_scales"] = rows["log_scales"] + float(np.log(scale))
        gen.set_rows({"means": points, "log_scales": rows["log_scales"], "quats": rows["quats"],
                      "opacity_logits": rows["opacity_logits"], "sh_dc": sh[:, 0], "sh_rest": sh[:, 1:]})
        info["gaussians"] = len(points)
    else:
        pts, col, nrm = read_asset(path, cfg.generator.gaussians.n_init, up=up, seed=cfg.train.seed)
        _check_finite(path, {"points": pts, "colours": col, **({"normals": nrm} if nrm is not None else {})}, "points")
        if fit:
            pts, _, _ = fit_points(pts, cfg.generator.sdf_radius)
        gen.set_points(pts, col, normals=nrm, opacity=cfg.generator.gaussians.surface_opacity if nrm is not None
                       else None)
        info["points"] = len(pts)
    if bool((gen.means.abs() > cfg.render.bound).any()):
        raise ConfigError(f"'{init_from}' reaches outside the scene box [-{cfg.render.bound:g}, {cfg.render.bound:g}]^3; "
                          "pass --fit to centre and scale it to the start sphere, or check --up")
    return model.state_dict(), info
