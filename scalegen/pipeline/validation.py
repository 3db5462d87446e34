"""3D at validation: what ``scalegen train`` adds to the training loop's image grid.

Every ``train.val_every`` steps the first ``train.val_assets`` prompts of the grid are exported as
GLB meshes and turntables (8 frames) into ``RUN/val/step_N/`` (whatever the logger) and logged to Weights &
Biases as ``wandb.Object3D`` and ``wandb.Video``; in the oracle world the grid's prompts are also
scored against their ground truth (PSNR, mask IoU, colour error per split, as ``scalegen eval``
computes them, without R@1 and its gallery) into ``RUN/val/metrics.jsonl`` and W&B. The loop sits a floor below export, so it takes this
as a callback (``train(..., on_validate=ValidationAssets(cfg))``).
"""
from __future__ import annotations

from pathlib import Path

import torch

from scalegen.export.files import asset_name, write_mesh
from scalegen.export.mesh import extract_meshes, render_level
from scalegen.export.pipeline import TURNTABLE_MARGIN_BETAS
from scalegen.export.turntable import crop_size, render_turntables, turntable_cameras, video_suffix, write_video

MESH_RESOLUTION = 64  # marching-cubes cells: a validation preview, not the export
TURNTABLE_FRAMES, TURNTABLE_SIZE = 8, 64


class ValidationAssets:
    def __init__(self, cfg, n_assets: int | None = None):
        self.cfg = cfg
        self.n = cfg.train.val_assets if n_assets is None else n_assets
        from scalegen.priors import build_ground_truth  # noqa: PLC0415

        self.truth = build_ground_truth(cfg)  # None for a learned prior: no metrics then

    @torch.no_grad()
    def __call__(self, model, text_encoder, prompts: list[str], step: int, run_dir: Path, logger) -> dict:
        """Write and log the step's assets and metrics; returns {key: path} of the files written."""
        was_training = model.training
        model.eval()
        try:
            files = self.assets(model, text_encoder, prompts[:self.n], Path(run_dir) / "val" / f"step_{step:07d}")
            logger.log_files(step, files)
            metrics = self.metrics(model, text_encoder, prompts)
            if metrics:
                logger.log_validation(step, metrics)
        finally:
            model.train(was_training)
        return files

    def assets(self, model, text_encoder, prompts: list[str], folder: Path) -> dict[str, Path]:
        if not prompts:
            return {}
        from scalegen.generators import GaussianScene  # noqa: PLC0415
        from scalegen.render import build_renderer  # noqa: PLC0415

        cfg = self.cfg
        folder.mkdir(parents=True, exist_ok=True)
        field, background = model(text_encoder.encode(prompts))
        level = 0.0 if isinstance(model.generator, GaussianScene) else render_level(cfg.render.beta)
        meshes = extract_meshes(field, cfg.render.bound, MESH_RESOLUTION, level, names=prompts)
        cams = turntable_cameras(cfg, TURNTABLE_FRAMES, TURNTABLE_SIZE)
        crop = crop_size([m.verts for m in meshes], cams, TURNTABLE_MARGIN_BETAS * cfg.render.beta)  # as generate
        frames = render_turntables(field, background, build_renderer(cfg).eval(), cams, cfg.eval.samples,
                                   cfg.eval.importance_samples, crop=crop)
        files: dict[str, Path] = {}
        for i, (p, mesh) in enumerate(zip(prompts, meshes)):
            name = asset_name(i, p)
            files[f"val/mesh/{name}"] = write_mesh(mesh, folder / f"{name}.glb")
            files[f"val/turntable/{name}"] = write_video(frames[i], folder / f"{name}{video_suffix()}")
        return files

    def metrics(self, model, text_encoder, prompts: list[str]) -> dict[str, float]:
        """Oracle metrics of the grid's prompts per split ({'val/seen/psnr': ...}); none for real priors."""
        if self.truth is None:
            return {}
        from scalegen.eval.oracle import evaluate_prompts  # noqa: PLC0415

        out = {}
        for split, members in self.truth.world.splits().items():
            ps = [p for p in prompts if p in set(members)]
            if ps:
                r = evaluate_prompts(self.cfg, model, text_encoder, self.truth.world, ps, truth=self.truth,
                                     retrieval=False)
                out.update({f"val/{split}/{k}": r[k] for k in ("psnr", "iou", "color_error")})
        return out
