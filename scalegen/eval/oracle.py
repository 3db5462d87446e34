"""Oracle-world metrics: the generator's renders against ground truth on held-out cameras.

Per split (seen = trained prompts, unseen = held-out attribute combinations):
  psnr         mean per-image PSNR (dB) of the RGB render (background included)
  psnr_fg      PSNR over the pixels inside either mask only (the object; harder, since the
               backdrop, most of each image, is easy to learn)
  iou          mean per-image IoU of the masks opacity > 0.5
  color_error  signed colour error inside the object (pixels inside both masks):
               mean(|pred - 0.5| - |gt - 0.5|) over channels. Positive = colours pushed further
               from mid-grey than the truth (over-saturated), negative = washed out.
  r_at_1       the oracle's CLIP R-precision: each render retrieves, among the ground-truth renders
               of *all* the world's prompts (seen and unseen) from the same camera, the one nearest
               in pixel MSE; a hit when that is its own prompt's (ties shared, as in CLIP R@1:
               scalegen/eval/retrieval.py). Known answers: 1.0 for the ground truth itself, about
               chance (1 / number of prompts) for a generator that ignores the prompt.
"""
from __future__ import annotations

import math

import torch

from scalegen.data.cameras import orbit_cameras
from scalegen.eval.retrieval import r_at_1
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
def ground_truth_gallery(gt_renderer, world, cams, batch: int = 8) -> tuple[torch.Tensor, torch.Tensor]:
    """(rgb [N, V, 3, H, W], opacity [N, V, 1, H, W]) of every world prompt (``world.prompts`` order)."""
    rgb, op = [], []
    v = cams.shape[1]
    for i in range(0, len(world.prompts), batch):
        chunk = world.prompts[i:i + batch]
        gt = gt_renderer(world.field(chunk), cams.expand(len(chunk)), background=world.background, perturb=False)
        rgb.append(gt.rgb.view(len(chunk), v, *gt.rgb.shape[1:]))
        op.append(gt.opacity.view(len(chunk), v, *gt.opacity.shape[1:]))
    return torch.cat(rgb), torch.cat(op)


@torch.no_grad()
def retrieval_r_at_1(pred: torch.Tensor, gallery: torch.Tensor, own: torch.Tensor, chunk: int = 256) -> torch.Tensor:
    """Per-prompt R@1 of renders ``pred`` [B, V, 3, H, W] among ``gallery`` [N, V, 3, H, W] (same cameras
    per view), scored by negative pixel MSE; ``own`` [B] = each prompt's gallery row. Returns [B]."""
    b, v = pred.shape[:2]
    hits = []
    for j in range(v):
        q = pred[:, j].flatten(1)
        scores = torch.cat([-(q[:, None] - gallery[s:s + chunk, j].flatten(1)[None]).pow(2).mean(-1)
                            for s in range(0, len(gallery), chunk)], dim=1)  # [B, N]
        hits.append(r_at_1(scores, own))
    return torch.stack(hits, 1).mean(1)


@torch.no_grad()
def evaluate_prompts(cfg, model, text_encoder, world, prompts: list[str], batch: int = 8,
                     gallery: tuple[torch.Tensor, torch.Tensor] | None = None) -> dict:
    """Mean metrics of ``model`` (a SceneModel) over ``prompts`` on the evaluation orbit, rendered with
    the config's renderer (VolSDF, or the Gaussian rasterizer for a Gaussian scene) against the same
    ground truth, so amortized and per-prompt scores are comparable. A per-prompt model is asked for
    its one prompt at a time. ``gallery``: every world prompt's ground truth (``ground_truth_gallery``),
    rendered here when not given."""
    model.eval()
    cams = eval_cameras(cfg)
    renderer = build_renderer(cfg).eval()
    if gallery is None:
        gallery = ground_truth_gallery(build_oracle_prior(cfg, world).renderer, world, cams, batch)
    gallery_rgb, gallery_op = gallery
    if cfg.data.prompt is not None:
        batch = 1
    acc: dict[str, list] = {"psnr": [], "psnr_fg": [], "iou": [], "color_error": [], "has_object": []}
    r1 = []
    for i in range(0, len(prompts), batch):
        chunk = prompts[i:i + batch]
        field, bg = model(text_encoder.encode(chunk))
        out = renderer(field, cams, background=bg, samples=cfg.eval.samples,
                       importance_samples=cfg.eval.importance_samples)
        own = torch.tensor([world.index(p) for p in chunk])
        gt_rgb, gt_op = gallery_rgb[own].flatten(0, 1), gallery_op[own].flatten(0, 1)
        m = image_metrics(out.rgb, out.opacity, gt_rgb, gt_op)
        for k in acc:
            acc[k].append(m[k])
        r1.append(retrieval_r_at_1(out.rgb.view(len(chunk), -1, *out.rgb.shape[1:]), gallery_rgb, own))
    cat = {k: torch.cat(v) for k, v in acc.items()}
    has = cat["has_object"]
    return {
        "psnr": float(cat["psnr"].mean()),
        "psnr_fg": float(cat["psnr_fg"].mean()),
        "iou": float(cat["iou"].mean()),
        "color_error": float(cat["color_error"][has].mean()) if has.any() else math.nan,
        "r_at_1": float(torch.cat(r1).mean()),
        "r_at_1_chance": 1.0 / len(world.prompts),
        "n_prompts": len(prompts),
        "n_images": int(len(cat["psnr"])),
    }


@torch.no_grad()
def evaluate_oracle(cfg, model, text_encoder, world, batch: int = 8, max_prompts: int | None = None) -> dict:
    """Metrics of ``model`` (a SceneModel) per split; returns plain floats. A per-prompt run
    (``data.prompt``) is scored on its prompt, under the split the prompt belongs to."""
    max_prompts = cfg.eval.max_prompts if max_prompts is None else max_prompts
    gallery = ground_truth_gallery(build_oracle_prior(cfg, world).renderer, world, eval_cameras(cfg), batch)
    if cfg.data.prompt is not None:
        prompt = world.prompts[world.index(cfg.data.prompt)]
        return {"seen" if prompt in world.seen else "unseen":
                evaluate_prompts(cfg, model, text_encoder, world, [cfg.data.prompt], batch, gallery)}
    result = {}
    for split, prompts in (("seen", world.seen), ("unseen", world.unseen)):
        if max_prompts:
            prompts = prompts[:max_prompts]
        if prompts:
            result[split] = evaluate_prompts(cfg, model, text_encoder, world, prompts, batch, gallery)
    return result
