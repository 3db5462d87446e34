"""Oracle-world metrics: the generator's renders against ground truth on held-out cameras.

Per split (seen = trained prompts, unseen = held-out attribute combinations; the compositional world:
seen and its held-out levels). Every metric compares with the *nearest completion* of the prompt
(best of completions x instances, picked once per prompt over all views): in the default world that
is the prompt's own ground truth.
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
  (r_at_1 is the default world's: its gallery is all 60 prompts; a compositional world has 288k
  prompts and completions, so R@1 is not reported there.)
Where they apply (``evaluate_prompts``): psnr_mean / psnr_mean_gt (mode averaging vs seeking on
prompts with several completions), multi_face (objects with a front marker), diversity over z.
"""
from __future__ import annotations

import hashlib
import math
from pathlib import Path

import torch
from einops import rearrange
from safetensors import safe_open
from safetensors.torch import save_file
from torch import Tensor

from scalegen.atomic import writing
from scalegen.data.cameras import Cameras, orbit_cameras
from scalegen.errors import ConfigError
from scalegen.eval.retrieval import r_at_1
from scalegen.priors import GroundTruth, World, build_ground_truth
from scalegen.render import build_renderer
from scalegen.render.images import psnr

# The multi-face measure (``multi_face``): a pixel shows the marker within MARKER_TOL of its colour (RGB
# distance); a view shows it when MARKER_SHOWN of its object pixels do, and none when at most MARKER_NONE do.
MARKER_TOL, MARKER_SHOWN, MARKER_NONE = 0.2, 0.03, 0.005


def eval_cameras(cfg) -> Cameras:
    c = cfg.camera
    return orbit_cameras(c.eval_views, c.eval_elevation, c.eval_distance, c.eval_fovy, c.eval_resolution)


def ground_truth_of(cfg, world: World) -> GroundTruth:
    """What oracle metrics compare against: ``world`` drawn by the config's oracle renderer."""
    truth = build_ground_truth(cfg, world)
    if truth is None:
        raise ConfigError(f"oracle metrics need an oracle-world run (this one has prior.name={cfg.prior.name}); "
                          "use `scalegen eval clip` for a learned prior")
    return truth


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


def best_of_completions(pred: Tensor, gts: Tensor) -> Tensor:
    """Index of the completion nearest to a prediction: ``pred`` [V, 3, H, W] (one prompt, all views),
    ``gts`` [C, V, 3, H, W]; nearest by mean squared error over all views together (one object is one
    completion, not a different one per view)."""
    return (gts - pred[None]).pow(2).flatten(1).mean(1).argmin()


def marker_fraction(rgb: Tensor, opacity: Tensor, marker, body, tol: float = MARKER_TOL) -> Tensor:
    """Per image [N]: the share of object pixels (opacity > 0.5) showing the marker colour (within ``tol``
    in RGB and nearer to it than to the body colour). ``rgb`` [N, 3, H, W], ``opacity`` [N, 1, H, W]."""
    m = torch.tensor(marker, dtype=rgb.dtype).view(1, 3, 1, 1)
    b = torch.tensor(body, dtype=rgb.dtype).view(1, 3, 1, 1)
    dm, db = (rgb - m).norm(dim=1), (rgb - b).norm(dim=1)
    obj = opacity[:, 0] > 0.5
    hit = obj & (dm < tol) & (dm < db)
    return hit.flatten(1).sum(1).float() / obj.flatten(1).sum(1).clamp(min=1).float()


def multi_face(pred_frac: Tensor, gt_frac: Tensor) -> tuple[int, int]:
    """(views showing the marker where the ground truth shows none, views where it shows none): a view
    shows the marker when at least ``MARKER_SHOWN`` of its object pixels have its colour, none when at
    most ``MARKER_NONE`` do."""
    none = gt_frac <= MARKER_NONE
    return int((none & (pred_frac >= MARKER_SHOWN)).sum()), int(none.sum())


def marker_recall(pred_frac: Tensor, gt_frac: Tensor) -> tuple[int, int]:
    """(views showing the marker where the ground truth shows it, views where it shows it): whether the
    front is there at all, which a low multi-face rate alone does not say."""
    shown = gt_frac >= MARKER_SHOWN
    return int((shown & (pred_frac >= MARKER_SHOWN)).sum()), int(shown.sum())


def pairwise_rmse(images: Tensor) -> float:
    """Mean RMSE over all pairs of ``images`` [M, ...] (M >= 2): how different the members of a set are."""
    flat = images.flatten(1)
    d = torch.cdist(flat, flat).pow(2) / flat.shape[1]
    m = len(flat)
    return float(d.sqrt().sum() / (m * (m - 1)))


def ground_truth_gallery(truth: GroundTruth, cams: Cameras, batch: int = 8) -> tuple[torch.Tensor, torch.Tensor]:
    """(rgb [N, V, 3, H, W], opacity [N, V, 1, H, W]) of every world prompt (``world.prompts`` order; each
    prompt's first completion, the prompt itself in the default world, the only one R@1 is used in)."""
    world = truth.world
    rgb, op = [], []
    v = cams.shape[1]
    for i in range(0, len(world.prompts), batch):
        chunk = world.prompts[i:i + batch]
        gt = truth.draw([c[0] for c in world.completions([world.index(p) for p in chunk])], cams)
        rgb.append(rearrange(gt.rgb, "(b v) c h w -> b v c h w", v=v))
        op.append(rearrange(gt.opacity, "(b v) c h w -> b v c h w", v=v))
    return torch.cat(rgb), torch.cat(op)


GT_CACHE_VERSION = 1  # bump when the ground-truth scenes, background or renderer change meaning


def gallery_key(truth: GroundTruth, cams: Cameras) -> str:
    """sha256 of everything a ground-truth gallery depends on: the world's prompts and scenes (every
    placed object's shape, size, colour, pose), the cameras and the ground-truth renderer's settings."""
    h = hashlib.sha256()
    r, world = truth.renderer, truth.world
    h.update(repr((GT_CACHE_VERSION, torch.__version__, list(world.prompts), world.scenes,
                   (r.bound, r.samples, r.importance_samples, r.beta, r.near_min, r.composite, r.uniform_mix),
                   (cams.height, cams.width))).encode())
    for t in (cams.c2w, cams.fovy):
        h.update(t.detach().float().contiguous().numpy().tobytes())
    return h.hexdigest()


def _digest(rgb: Tensor, op: Tensor) -> str:
    return hashlib.sha256(rgb.contiguous().numpy().tobytes() + op.contiguous().numpy().tobytes()).hexdigest()


def cached_gallery(truth: GroundTruth, cams: Cameras, cache_dir: str | Path | None,
                   batch: int = 8) -> tuple[Tensor, Tensor]:
    """``ground_truth_gallery``, kept in ``cache_dir`` between calls (the ground truth never changes for
    a given world, cameras and renderer): a file named by ``gallery_key``, written atomically and used
    only when its recorded key and the sha256 of its tensors check out; anything else is rendered anew
    and the file replaced. ``cache_dir`` None: always rendered."""
    if cache_dir is None:
        return ground_truth_gallery(truth, cams, batch)
    key = gallery_key(truth, cams)
    path = Path(cache_dir) / f"gt-gallery-{key[:24]}.safetensors"
    if path.is_file():
        try:
            with safe_open(str(path), framework="pt") as f:
                meta = f.metadata() or {}
                rgb, op = f.get_tensor("rgb"), f.get_tensor("opacity")
            if meta.get("key") == key and meta.get("sha256") == _digest(rgb, op):
                return rgb, op
            print(f"note: the ground-truth cache {path} does not check out; rendering it again", flush=True)
        except Exception as e:  # noqa: BLE001 - an unreadable cache file is re-rendered, never trusted
            print(f"note: the ground-truth cache {path} is unreadable ({type(e).__name__}); rendering it again",
                  flush=True)
    rgb, op = ground_truth_gallery(truth, cams, batch)
    rgb, op = rgb.contiguous(), op.contiguous()
    path.parent.mkdir(parents=True, exist_ok=True)
    with writing(path) as tmp:
        save_file({"rgb": rgb, "opacity": op}, str(tmp), metadata={"key": key, "sha256": _digest(rgb, op)})
    return rgb, op


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
                     gallery: tuple[Tensor, Tensor] | None = None, z_draws: int = 4,
                     truth: GroundTruth | None = None, retrieval: bool = True) -> dict:
    """Metrics of ``model`` (a SceneModel) on ``prompts`` against the best of each prompt's completions
    (the prompt's own ground truth in the default world), rendered with the config's renderer (VolSDF, or
    the Gaussian rasterizer for a Gaussian scene) on the evaluation orbit, so amortized and per-prompt
    scores are comparable; a per-prompt model (``data.prompt``) is asked for its one prompt at a time.
    Extra keys when they apply: ``psnr_mean`` / ``psnr_mean_gt`` (PSNR to the completions' mean image, of
    the prediction / of the completions themselves: a mode averager beats the completions here, a mode
    seeker matches them), ``multi_face`` (prompts with a front marker; ``marker_recall``: the share of
    views where the truth shows the marker and so does the prediction), ``diversity`` / ``diversity_gt``
    (generators that take a noise z: RMSE between ``z_draws`` draws, and between the completions),
    ``r_at_1`` in the default world (``gallery``: every world prompt's ground truth, ``ground_truth_gallery``;
    rendered here when not given; ``retrieval=False`` skips R@1 and its gallery, as validation during training
    does). ``truth``: the world's ground truth (``priors.build_ground_truth``; built when not given)."""
    cams = eval_cameras(cfg)
    renderer = build_renderer(cfg).eval()
    options = renderer.eval_options(cfg.eval.samples, cfg.eval.importance_samples)
    truth = ground_truth_of(cfg, world) if truth is None else truth
    if not retrieval:
        gallery = None
    elif gallery is None and cfg.world.kind == "single":
        gallery = ground_truth_gallery(truth, cams, batch)
    if cfg.data.prompt is not None:
        batch = 1
    acc: dict[str, list] = {"psnr": [], "psnr_fg": [], "iou": [], "color_error": [], "has_object": []}
    extra: dict[str, list] = {"psnr_mean": [], "psnr_mean_gt": [], "diversity": [], "diversity_gt": []}
    r1 = []
    faces = [0, 0, 0, 0]  # multi-face (hits, views), marker recall (hits, views)
    v = cams.shape[1]
    noise = model.generator.noise_dim()
    for i in range(0, len(prompts), batch):
        chunk = prompts[i:i + batch]
        cond = text_encoder.encode(chunk)
        field, bg = model(cond)
        out = renderer(field, cams, background=bg, **options)
        own = [world.index(p) for p in chunk]
        lists = world.completions(own)
        flat = [c for cl in lists for c in cl]
        gt_rgb, gt_op = [], []
        if gallery is not None and flat == own:  # the default world: each prompt's gallery row is its truth
            gt_rgb, gt_op = [gallery[0][flat].flatten(0, 1)], [gallery[1][flat].flatten(0, 1)]
            flat = []
        for j in range(0, len(flat), 32):
            ids = flat[j:j + 32]
            gt = truth.draw(ids, cams)
            gt_rgb.append(gt.rgb)
            gt_op.append(gt.opacity)
        gt_rgb, gt_op = torch.cat(gt_rgb), torch.cat(gt_op)
        if sum(len(cl) for cl in lists) == len(chunk):  # one completion per prompt: it is the ground truth
            best_rgb, best_op = gt_rgb, gt_op
        else:
            best_rgb, best_op, start = [], [], 0
            for b, cl in enumerate(lists):
                g = gt_rgb[start * v:(start + len(cl)) * v].view(len(cl), v, *gt_rgb.shape[1:])
                o = gt_op[start * v:(start + len(cl)) * v].view(len(cl), v, *gt_op.shape[1:])
                k = best_of_completions(out.rgb[b * v:(b + 1) * v], g)
                best_rgb.append(g[k])
                best_op.append(o[k])
                if len(cl) > 1:
                    mean = g.mean(0)
                    extra["psnr_mean"].append(psnr(out.rgb[b * v:(b + 1) * v], mean).mean())
                    extra["psnr_mean_gt"].append(torch.stack([psnr(gk, mean).mean() for gk in g]).mean())
                    if noise > 0:
                        extra["diversity_gt"].append(pairwise_rmse(g))
                start += len(cl)
            best_rgb, best_op = torch.cat(best_rgb), torch.cat(best_op)
        m = image_metrics(out.rgb, out.opacity, best_rgb, best_op)
        if gallery is not None:
            r1.append(retrieval_r_at_1(out.rgb.view(len(chunk), v, *out.rgb.shape[1:]), gallery[0], torch.tensor(own)))
        for k in acc:
            acc[k].append(m[k])
        for b, p in enumerate(chunk):
            mk = world.marker_of(p)
            if mk is not None:
                sl = slice(b * v, (b + 1) * v)
                pf = marker_fraction(out.rgb[sl], out.opacity[sl], *mk)
                gf = marker_fraction(best_rgb[sl], best_op[sl], *mk)
                for j, (got, views) in enumerate((multi_face(pf, gf), marker_recall(pf, gf))):
                    faces[2 * j] += got
                    faces[2 * j + 1] += views
        if noise > 0 and z_draws > 1:
            draws = []
            for _ in range(z_draws):
                z = torch.randn(len(chunk), noise)
                f = model.generator(cond, z)
                draws.append(renderer(f, cams, background=bg, **options).rgb.reshape(len(chunk), -1))
            draws = torch.stack(draws, 1)  # [B, Z, V*3*H*W]
            extra["diversity"] += [pairwise_rmse(d) for d in draws]
    cat = {k: torch.cat(x) for k, x in acc.items()}
    has = cat["has_object"]
    res = {
        "psnr": float(cat["psnr"].mean()),
        "psnr_fg": float(cat["psnr_fg"].mean()),
        "iou": float(cat["iou"].mean()),
        "color_error": float(cat["color_error"][has].mean()) if has.any() else math.nan,
        "n_prompts": len(prompts),
        "n_images": int(len(cat["psnr"])),
    }
    if r1:
        res["r_at_1"] = float(torch.cat(r1).mean())
        res["r_at_1_chance"] = 1.0 / len(gallery[0])
    if extra["psnr_mean"]:
        res["psnr_mean"] = float(torch.stack(extra["psnr_mean"]).mean())
        res["psnr_mean_gt"] = float(torch.stack(extra["psnr_mean_gt"]).mean())
        res["n_multimodal"] = len(extra["psnr_mean"])
    if faces[1]:
        res["multi_face"] = faces[0] / faces[1]
        res["multi_face_views"] = faces[1]
    if faces[3]:
        res["marker_recall"] = faces[2] / faces[3]
    if extra["diversity"]:
        res["diversity"] = sum(extra["diversity"]) / len(extra["diversity"])
        if extra["diversity_gt"]:
            res["diversity_gt"] = sum(extra["diversity_gt"]) / len(extra["diversity_gt"])
    return res


@torch.no_grad()
def evaluate_oracle(cfg, model, text_encoder, world, batch: int = 8, max_prompts: int | None = None,
                    splits: dict[str, list[str]] | None = None, cache_dir: str | Path | None = None) -> dict:
    """Metrics of ``model`` (a SceneModel) per split of the world (default world: seen, unseen;
    compositional: seen and each held-out level), or of ``splits``; returns plain floats. A per-prompt
    run (``data.prompt``) is scored on its prompt, under the split the prompt belongs to. ``cache_dir``:
    where the default world's ground-truth gallery is kept between calls (``cached_gallery``)."""
    model.eval()
    max_prompts = cfg.eval.max_prompts if max_prompts is None else max_prompts
    truth = ground_truth_of(cfg, world)
    gallery = (cached_gallery(truth, eval_cameras(cfg), cache_dir, batch)
               if cfg.world.kind == "single" else None)
    if cfg.data.prompt is not None and splits is None:
        prompt = world.prompts[world.index(cfg.data.prompt)]  # the world's spelling of it
        split = next(name for name, ps in world.splits().items() if prompt in ps)
        splits = {split: [cfg.data.prompt]}
    result = {}
    for split, prompts in (splits or world.splits()).items():
        if max_prompts:
            prompts = prompts[:max_prompts]
        if prompts:
            result[split] = evaluate_prompts(cfg, model, text_encoder, world, prompts, batch, gallery,
                                             truth=truth)
    return result
