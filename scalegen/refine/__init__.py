"""Per-prompt refinement (`scalegen refine`): one prompt's own scene, 3D Gaussians (DreamMapping's
representation) or a single-prompt iNGP (ScaleDreamer's prompt-specific results), started from a
sphere, an asset file or an amortized generator's output (``start``), trained by the amortized
trainer itself (``train.loop.train``: the same priors, distillers, checkpoints and logs; a per-prompt
generator just ignores the text), then scored on the oracle world's held-out orbit and exported
(3DGS PLY and a mesh).

The room sits on the top floor beside ``bench`` and ``cli``: it composes train, eval and export.
"""
from __future__ import annotations

import time
from pathlib import Path
from typing import Optional

import torch

from scalegen.config import PER_PROMPT, Config, compose_config, load_run_config, load_yaml
from scalegen.errors import CheckpointError, ConfigError
from scalegen.locks import FolderLock
from scalegen.eval.oracle import eval_cameras, evaluate_prompts, ground_truth_gallery
from scalegen.eval.report import write_json
from scalegen.export.gaussian_ply import write_gaussian_ply
from scalegen.export.files import write_mesh
from scalegen.export.mesh import extract_meshes, render_level
from scalegen.generators import GaussianScene
from scalegen.priors import build_ground_truth
from scalegen.refine.start import describe_start, start_state
from scalegen.train.checkpoint import resolve_checkpoint, run_dir_of
from scalegen.train.loop import train
from scalegen.train.model import build_model, load_run

REPRESENTATIONS = PER_PROMPT  # what `scalegen refine --representation` takes: the per-prompt generators

# What `scalegen refine --representation R` sets on top of the base config (the defaults, or the
# amortized run's own config with --init-from RUN), before --config and key=value overrides; the files
# configs/refine/R.yaml hold the same values (tests/test_refine.py checks). Sized for a 2-core CPU.
PRESETS: dict[str, dict] = {
    "gaussians": {
        "data": {"prompts_per_step": 1},
        "camera": {"resolution": 32, "views_per_prompt": 4},
        "loss": {"eikonal": 0.0, "sparsity": 0.0, "opacity_entropy": 0.0},
        "optim": {"name": "adam", "betas": [0.9, 0.99], "eps": 1.0e-15, "grad_clip": None, "lr": 1.0e-3,
                  "lr_background": 1.0e-3, "lr_schedule": "constant", "warmup_steps": 0.0,
                  "group_lr": {"means": 1.0e-4, "scales": 5.0e-3, "quats": 1.0e-3, "opacity": 5.0e-2,
                               "sh_dc": 2.5e-3, "sh_rest": 1.25e-4}},
        "distill": {"t_range_start": [0.02, 0.50], "t_range_end": [0.02, 0.25]},
        "train": {"max_steps": 400, "log_every": 10, "val_every": 100, "ckpt_every": 100},
    },
    "ingp": {
        "data": {"prompts_per_step": 1},
        "camera": {"resolution": 32, "views_per_prompt": 4},
        "optim": {"group_lr": {"grid": 1.0e-2, "mlp": 1.0e-3}},
        "distill": {"t_range_start": [0.02, 0.50], "t_range_end": [0.02, 0.25]},
        "train": {"max_steps": 400, "log_every": 10, "val_every": 100, "ckpt_every": 100},
    },
}

# What a start from an amortized run changes on top of the preset (both measured:
# docs/notes/2026-12-01-refine-converged-fit.md):
#  * it keeps the run's background (copied by ``start_state``): the world's backdrop, learned over every prompt of the
#    run, which one prompt's distillation only degrades;
#  * no densification: the fitted discs already cover the run's surface, and 3DGS's splits (two children drawn inside
#    the parent, 1.6x smaller) open holes the 32x32 distillation has to close again.
RUN_START: dict = {"optim": {"lr_background": 0.0}, "generator": {"gaussians": {"densify_until": 0.0}}}


def refine_config(prompt: str, representation: str, distill: Optional[str], init_from: Optional[str] = None,
                  config_file: Optional[str] = None, overrides: Optional[list[str]] = None,
                  base_run: Optional[str] = None) -> Config:
    """The config of a new refinement: the amortized run's own config when starting from one (its world,
    text encoder, prior, renderer and field sizes), else ``base_run``'s (a sphere start under the same
    world as a run start, for comparisons), else the defaults; then the representation's preset,
    ``RUN_START`` for a start from a run, ``config_file``, ``overrides``; then the prompt, representation
    and distiller given on the command line."""
    if representation not in REPRESENTATIONS:
        raise ConfigError(f"--representation must be one of {', '.join(REPRESENTATIONS)}, got {representation!r}")
    if not prompt or not prompt.strip():
        raise ConfigError("--prompt is empty; describe the asset, e.g. --prompt 'a large red cube'")
    base: dict = {}
    from_run = describe_start(init_from) == "run"
    if base_run is None and from_run:
        base_run = init_from
    if base_run is not None:
        run_cfg = run_dir_of(resolve_checkpoint(base_run)) / "config.yaml"
        if not run_cfg.is_file():
            raise ConfigError(f"'{base_run}' has no config.yaml; give a run directory of `scalegen train`")
        base = load_yaml(run_cfg)
        base.get("optim", {}).pop("group_lr", None)  # the amortized generator's groups are not the scene's
        base.setdefault("data", {}).update({"shards": None})
    final = {"data": {"prompt": prompt}, "generator": {"name": representation}}
    if distill:
        final["distill"] = {"name": distill}
    layers = [base, PRESETS[representation]]
    if from_run:
        layers.append(RUN_START)
    if config_file:
        layers.append(load_yaml(config_file))
    return compose_config(layers + [final], overrides)


def refine(cfg: Config, out: str | Path, init_from: Optional[str] = None, resume: bool = False, up: str = "y",
           fit: bool = False, mesh_resolution: int = 128, gallery: Optional[tuple] = None) -> dict:
    """Train ``cfg``'s scene into ``out`` (continue it with ``resume``), then score it against the oracle
    world's ground truth beside its start (and the amortized generator it started from), and export
    ``out/gaussians.ply`` (Gaussians) and ``out/mesh.glb``. Returns the report, also written to
    ``out/refine.json``. ``gallery``: the world's ground truth on the evaluation orbit when the caller has
    it (``eval.oracle.ground_truth_gallery``; rendered here otherwise)."""
    out = Path(out)
    with FolderLock(out, "scalegen refine", log=lambda m: print(m, flush=True)):
        return _refine(cfg, out, init_from, resume, up, fit, mesh_resolution, gallery)


def _refine(cfg: Config, out: Path, init_from: Optional[str], resume: bool, up: str, fit: bool, mesh_resolution: int,
            gallery: Optional[tuple]) -> dict:
    if resume:
        start = load_yaml(out / "start.json") if (out / "start.json").is_file() else {"start": "unknown"}
        init_state = None
    else:
        if (out / "config.yaml").is_file():  # before start.json is written over another refinement's
            raise CheckpointError(f"'{out}' holds another refinement (its config.yaml); pass --resume to continue "
                                  "it or choose another --out")
        t0, c0 = time.perf_counter(), time.process_time()
        init_state, start = start_state(cfg, init_from, up=up, fit=fit)
        start.update({"start_s": time.perf_counter() - t0, "start_cpu_s": time.process_time() - c0})
        out.mkdir(parents=True, exist_ok=True)
        write_json(out / "start.json", start)
    t0, c0 = time.perf_counter(), time.process_time()
    ckpt = train(cfg, out, resume=resume, init_state=init_state, resume_command=f"scalegen refine --out {out} --resume")
    train_s, train_cpu_s = time.perf_counter() - t0, time.process_time() - c0
    cfg, text_encoder, model, ckpt = load_run(out)
    report: dict = {"prompt": cfg.data.prompt, "representation": cfg.generator.name, "distill": cfg.distill.name,
                    "steps": cfg.train.max_steps, "train_s": train_s,
                    "train_cpu_s": train_cpu_s, "checkpoint": str(ckpt), **start}
    gen = model.generator
    if isinstance(gen, GaussianScene):
        report["gaussians"] = gen.n_gaussians
    truth = build_ground_truth(cfg)
    if truth is not None:
        world = truth.world
        if gallery is None:
            gallery = ground_truth_gallery(truth, eval_cameras(cfg))
        scores = {"refined": evaluate_prompts(cfg, model, text_encoder, world, [cfg.data.prompt], gallery=gallery,
                                              truth=truth)}
        if not resume:
            torch.manual_seed(cfg.train.seed)
            _, first = build_model(cfg)
            if init_state is not None:
                first.load_state_dict(init_state)
            scores["start"] = evaluate_prompts(cfg, first, text_encoder, world, [cfg.data.prompt], gallery=gallery,
                                               truth=truth)
        if start.get("start") == "run":
            run_cfg, run_te, run_model, _ = load_run(start["run"])
            same_views = run_cfg.camera == cfg.camera  # else the run's own orbit gets its own ground truth
            scores["amortized"] = evaluate_prompts(run_cfg, run_model, run_te, world, [cfg.data.prompt],
                                                   gallery=gallery if same_views else None)
        report["metrics"] = scores
    field, _ = model(text_encoder.encode([cfg.data.prompt]))
    with torch.no_grad():
        if isinstance(gen, GaussianScene):
            report["ply"] = str(write_gaussian_ply(out / "gaussians.ply", field.means, field.log_scales, field.quats,
                                                   field.opacity_logits, field.sh))
        # an iNGP's surface at the level its volume renders show; a Gaussian field's level set is its own
        level = 0.0 if isinstance(gen, GaussianScene) else render_level(cfg.render.beta)
        mesh = extract_meshes(field, cfg.render.bound, mesh_resolution, level, names=[cfg.data.prompt])[0]
        report["mesh"] = str(write_mesh(mesh, out / "mesh.glb"))
        report["mesh_faces"] = len(mesh.faces)
    write_json(out / "refine.json", report)
    return report


def resume_config(out: str | Path, overrides: Optional[list[str]] = None) -> Config:
    """The config of a refinement to continue: its own config.yaml with ``overrides``."""
    if not (Path(out) / "config.yaml").is_file():
        raise ConfigError(f"'{out}' has no config.yaml; it is not a refinement to resume (drop --resume)")
    cfg = load_run_config(out, overrides)
    if cfg.generator.name not in REPRESENTATIONS:
        raise ConfigError(f"'{out}' is an amortized run; continue it with `scalegen train --out {out} --resume`")
    return cfg


__all__ = ["PRESETS", "REPRESENTATIONS", "RUN_START", "refine", "refine_config", "resume_config", "start_state"]
