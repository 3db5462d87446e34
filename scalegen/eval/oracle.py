"""Oracle-world metrics: the generator's renders against ground truth on held-out cameras.

Per split (seen = trained prompts, unseen = held-out attribute combinations):
  psnr         mean per-image PSNR (dB) of the RGB render (background included)
  psnr_fg      PSNR over the pixels inside either mask only (the object; harder, since the
               backdrop, most of each image, is easy to learn)
  iou          mean per-image IoU of the masks opacity > 0.5
  color_error  signed colour error inside the object (pixels inside both masks):
               mean(|pred - 0.5| - |gt - 0.5|) over channels. Positive = colours pushed further
               from mid-grey than the truth (over-saturated), negative = washed out.
"""
from __future__ import annotations

import math

import torch

from scalegen.data.cameras import orbit_cameras
from scalegen.priors.oracle import build_oracle_prior
from scalegen.render import build_renderer
from scalegen.render.images import psnr


def eval_cameras(cfg):
    c = cfg.camera
    return orbit_cameras(c.eval_views, c.eval_elevation, c.eval_distance, c.eval_fovy, c.eval_resolution)


@torch.no_grad()
def image_metrics(pred_rgb, pred_op, gt_rgb, gt_op) -> dict[str, torch.Tensor]:
    """Per-image psnr, iou and colour error; inputs [N, C, H, W]."""
    pm, gm = pred_op[:, 0] > 0.5, gt_op[:, 0] > 0.5
    inter, union = (pm & gm).flatten(1).sum(1).float(), (pm | gm).flatten(1).sum(1).float()
    iou = torch.where(union > 0, inter / union.clamp(min=1), torch.ones_like(union))
    both = (pm & gm)[:, None].expand_as(pred_rgb)
    diff = ((pred_rgb - 0.5).abs() - (gt_rgb - 0.5).abs()) * both
    color = diff.flatten(1).sum(1) / both.flatten(1).sum(1).clamp(min=1)
    fg = (pm | gm)[:, None].expand_as(pred_rgb)
    mse_fg = ((pred_rgb - gt_rgb).pow(2) * fg).flatten(1).sum(1) / fg.flatten(1).sum(1).clamp(min=1)
    psnr_fg = -10.0 * torch.log10(mse_fg.clamp(min=1e-10))
    return {"psnr": psnr(pred_rgb, gt_rgb), "psnr_fg": psnr_fg, "iou": iou, "color_error": color,
            "has_object": inter > 0}


@torch.no_grad()
def evaluate_prompts(cfg, model, text_encoder, world, prompts: list[str], batch: int = 8) -> dict:
    """Mean metrics of ``model`` (a SceneModel) over ``prompts`` on the evaluation orbit, rendered with
    the config's renderer (VolSDF, or the Gaussian rasterizer for a Gaussian scene) against the same
    ground truth, so amortized and per-prompt scores are comparable. A per-prompt model is asked for
    its one prompt at a time."""
    model.eval()
    cams = eval_cameras(cfg)
    gt_source = build_oracle_prior(cfg, world)
    renderer = build_renderer(cfg).eval()
    if cfg.data.prompt is not None:
        batch = 1
    acc: dict[str, list] = {"psnr": [], "psnr_fg": [], "iou": [], "color_error": [], "has_object": []}
    for i in range(0, len(prompts), batch):
        chunk = prompts[i:i + batch]
        field, bg = model(text_encoder.encode(chunk))
        out = renderer(field, cams, background=bg, samples=cfg.eval.samples,
                       importance_samples=cfg.eval.importance_samples)
        gt_field = world.field(chunk)
        gt = gt_source.renderer(gt_field, cams.expand(len(chunk)), background=world.background, perturb=False)
        m = image_metrics(out.rgb, out.opacity, gt.rgb, gt.opacity)
        for k in acc:
            acc[k].append(m[k])
    cat = {k: torch.cat(v) for k, v in acc.items()}
    has = cat["has_object"]
    return {
        "psnr": float(cat["psnr"].mean()),
        "psnr_fg": float(cat["psnr_fg"].mean()),
        "iou": float(cat["iou"].mean()),
        "color_error": float(cat["color_error"][has].mean()) if has.any() else math.nan,
        "n_prompts": len(prompts),
        "n_images": int(len(cat["psnr"])),
    }


@torch.no_grad()
def evaluate_oracle(cfg, model, text_encoder, world, batch: int = 8, max_prompts: int | None = None) -> dict:
    """Metrics of ``model`` (a SceneModel) per split; returns plain floats. A per-prompt run
    (``data.prompt``) is scored on its prompt, under the split the prompt belongs to."""
    max_prompts = cfg.eval.max_prompts if max_prompts is None else max_prompts
    if cfg.data.prompt is not None:
        prompt = world.prompts[world.index(cfg.data.prompt)]
        return {"seen" if prompt in world.seen else "unseen":
                evaluate_prompts(cfg, model, text_encoder, world, [cfg.data.prompt])}
    result = {}
    for split, prompts in (("seen", world.seen), ("unseen", world.unseen)):
        if max_prompts:
            prompts = prompts[:max_prompts]
        if not prompts:
            continue
        result[split] = evaluate_prompts(cfg, model, text_encoder, world, prompts, batch)
    return result
