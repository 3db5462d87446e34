"""`scalegen prior score-learned`: how good a learned prior is, against the exact answer.

The learned prior (priors/learned.py) was trained on a bank of ground-truth renders mu_k (its folder's
bank.safetensors), so its data distribution is known exactly: the equal-weight mixture of N(mu_k, s^2 I)
(s = the training ``sharpness``). Two measurements:

1. **eps error per t** (the denoiser itself): rows x_t = a_t z + s_t eps with z a bank render, at each t
   of ``ts``. The exact eps is the oracle's formula (``priors.mixture_posterior_mean``) over the prompt's
   bank renders (conditional) or over all of them (unconditional). Reported per t: the mean squared error
   of the learned eps against the exact one (conditional, unconditional), the exact and learned diffusion
   losses |eps_hat - eps|^2 (the exact one is the floor no network can beat), and the guidance direction
   d = eps_c - eps_u: RMS of the exact and learned d and the mean squared error between them (what CFG
   scales by 7.5).
2. **samples** (DDIM, ``steps`` steps, eta 0, CFG ``cfg``): ``per_prompt`` samples of every prompt of the
   world (seen = trained, unseen = held-out combinations) from seeded noise, scored against reference
   renders of the prompt at ``ref_views`` fresh cameras of the training distribution:
     psnr    PSNR (dB) against the nearest reference view of the prompt (its nearest completion)
     iou     IoU of the sample's object mask with that view's mask (opacity > 0.5); a sample has no
             opacity, so its mask is the pixels farther than ``MASK_TOL`` (max over channels) from that
             view's backdrop
     r_at_1  the sample retrieves, among the references of *all* prompts, the prompt whose nearest view
             is nearest (pixel MSE); a hit when it is its own (ties shared, eval/retrieval.py); chance 1/#prompts
   Rows: ``learned``; ``exact`` (the same DDIM on the exact eps of the training mixture: the ideal
   prior of this data; seen prompts only, unseen ones have no training renders); ``ground_truth``
   (fresh renders at random training cameras: the ideal sampler, the protocol's ceiling).
"""
from __future__ import annotations

import time
from pathlib import Path

import torch
from torch import Tensor

from scalegen.data.cameras import Cameras, camera_rays, sample_train_cameras
from scalegen.eval.retrieval import r_at_1
from scalegen.priors import build_ground_truth, mixture_posterior_mean
from scalegen.priors.base import Guidance
from scalegen.priors.learned import LearnedPrior, config_of, load_bank, read_info
from scalegen.render.images import psnr

MASK_TOL = 0.1  # a sample pixel is object when a channel differs from the backdrop by more than this
DEFAULT_TS = (50, 200, 500, 800, 950)


def exact_x0(x: Tensor, a: Tensor, s_t: Tensor, mu: Tensor, s: float, chunk: int = 64) -> Tensor:
    """E[x0 | x_t] of rows ``x`` [N, D] under ONE shared mixture ``mu`` [K, D] (the unconditional: every
    bank render), ``chunk`` rows at a time (mixture_posterior_mean would copy mu per row)."""
    out = []
    for i in range(0, len(x), chunk):
        xi, ai, si = x[i:i + chunk], a[i:i + chunk], s_t[i:i + chunk]
        var = ai * ai * s * s + si * si
        # |x - a mu_k|^2 = |x|^2 - 2 a <x, mu_k> + a^2 |mu_k|^2, without an [n, K, D] temporary
        d2 = (xi.pow(2).sum(1, keepdim=True) - 2 * ai[:, None] * (xi @ mu.T)
              + (ai * ai)[:, None] * mu.pow(2).sum(1)[None]).clamp(min=0)
        r = torch.softmax(-d2 / (2.0 * var[:, None]), dim=-1)
        k = (ai * s * s / var)[:, None]
        out.append((1.0 - ai[:, None] * k) * (r @ mu) + k * xi)
    return torch.cat(out)


class ExactMixture:
    """The exact eps of the learned prior's training distribution (the bank mixture), conditional and not. A
    prompt's conditional is the equal-weight mixture over its own bank rows; each row renders a component drawn
    uniformly from the prompt's completions x instances (``render_bank``), so this is the training data exactly,
    and the oracle's conditional mixture over the prompt's components in expectation over the bank's draws."""

    def __init__(self, bank_z: Tensor, prompt: Tensor, n_prompts: int, s: float, alphas_cumprod: Tensor):
        self.mu = bank_z.flatten(1)  # [N, D]
        self.prompt, self.s, self.ab = prompt, s, alphas_cumprod
        self.by_prompt = [self.mu[prompt == p] for p in range(n_prompts)]

    def eps(self, x_t: Tensor, t: Tensor, prompts: Tensor, uncond: bool) -> Tensor:
        """``prompts`` [N]: index into the world's seen prompts (the bank's ``prompt``)."""
        x = x_t.flatten(1).float()
        ab = self.ab[t]
        a, s_t = ab.sqrt(), (1 - ab).sqrt()
        if uncond:
            x0 = exact_x0(x, a, s_t, self.mu, self.s)
        else:
            mu = torch.stack([self.by_prompt[int(p)] for p in prompts])  # [N, V, D] (equal views per prompt)
            x0 = mixture_posterior_mean(x, a, s_t, mu, self.s)
        return ((x - a[:, None] * x0) / s_t[:, None]).view_as(x_t)


@torch.no_grad()
def eps_error(prior: LearnedPrior, exact: ExactMixture, bank_z: Tensor, prompt: Tensor, seen: list[str],
              ts=DEFAULT_TS, n: int = 128, seed: int = 0) -> list[dict]:
    """Per t of ``ts``: the learned eps against the exact one on ``n`` bank rows (see the module docstring)."""
    gen = torch.Generator().manual_seed(seed)
    text_all = prior.text_embeddings(seen)
    rows = []
    for t_val in ts:
        idx = torch.randint(len(bank_z), (n,), generator=gen)
        z = bank_z[idx]
        if exact.s > 0:
            z = z + exact.s * torch.randn(z.shape, generator=gen)
        eps = torch.randn(z.shape, generator=gen)
        t = torch.full((n,), int(t_val), dtype=torch.long)
        x_t = prior.add_noise(z, eps, t)
        p = prompt[idx]
        text = text_all[p]
        x2, t2, text2 = torch.cat([x_t, x_t]), torch.cat([t, t]), torch.cat([text, text])
        g = Guidance.branches(n, [False, True], [(0, 1)])
        out = torch.cat([prior.predict_eps(x2[i:i + 64], t2[i:i + 64], text2[i:i + 64], _no_cams(),
                                           Guidance(g.uncond[i:i + 64], torch.zeros(0, 2, dtype=torch.long)))
                         for i in range(0, 2 * n, 64)])
        lc, lu = out[:n], out[n:]
        ec, eu = exact.eps(x_t, t, p, uncond=False), exact.eps(x_t, t, p, uncond=True)
        mse = lambda u, v: float((u - v).pow(2).mean())  # noqa: E731
        rms = lambda u: float(u.pow(2).mean().sqrt())  # noqa: E731
        rows.append({"t": int(t_val), "n": n, "mse_cond": mse(lc, ec), "mse_uncond": mse(lu, eu),
                     "loss_exact_cond": mse(ec, eps), "loss_learned_cond": mse(lc, eps),
                     "guidance_rms_exact": rms(ec - eu), "guidance_rms_learned": rms(lc - lu),
                     "guidance_mse": mse(lc - lu, ec - eu)})
    return rows


def _no_cams() -> Cameras:
    """The learned prior ignores cameras (it is conditioned on the prompt only)."""
    z = torch.zeros(1, 0)
    return Cameras(torch.zeros(1, 0, 4, 4), z, z, z, z, 0, 0)


@torch.no_grad()
def ddim_sample(eps_fn, shape, alphas_cumprod: Tensor, steps: int, cfg_scale: float, gen: torch.Generator) -> Tensor:
    """DDIM (Song et al. 2021, eta = 0) from x_T ~ N(0, I) with CFG eps_u + w (eps_c - eps_u) on SD's timestep
    spacing (t = k * 1000/steps + 1, from the top, as diffusers' DDIMScheduler with steps_offset=1 and
    set_alpha_to_one=False); the predicted x0 is clipped to [-1, 1] at every step, as pixel-space samplers do
    (diffusers' clip_sample; without it CFG 7.5 leaves the pixel range). ``eps_fn(x, t, uncond: bool) -> eps``.
    Returns z0 in [-1, 1]."""
    x = torch.randn(shape, generator=gen)
    ratio = 1000 // steps
    ts = (torch.arange(steps) * ratio).flip(0) + 1
    for i, t_val in enumerate(ts.tolist()):
        t = torch.full((shape[0],), t_val, dtype=torch.long)
        ec = eps_fn(x, t, False)
        eu = eps_fn(x, t, True)
        e = eu + cfg_scale * (ec - eu)
        ab = alphas_cumprod[t_val]
        ab_prev = alphas_cumprod[ts[i + 1]] if i + 1 < len(ts) else alphas_cumprod[0]
        x0 = ((x - (1 - ab).sqrt() * e) / ab.sqrt()).clamp(-1, 1)
        e = (x - ab.sqrt() * x0) / (1 - ab).sqrt()
        x = ab_prev.sqrt() * x0 + (1 - ab_prev).sqrt() * e
    return x.clamp(-1, 1)


@torch.no_grad()
def reference_views(truth, prompts: list[str], cam_cfg, views: int, seed: int):
    """Ground truth of ``prompts`` at ``views`` training cameras each (its own draws per prompt, seeded), each
    view one of the prompt's components drawn uniformly (``GroundTruth.draw_mixture``: a sample of the prompt's
    conditional, as the bank's renders are): rgb [P, V, 3, H, W], opacity [P, V, 1, H, W], backdrop
    [P, V, 3, H, W]."""
    import dataclasses  # noqa: PLC0415

    c = dataclasses.replace(cam_cfg, views_per_prompt=views, share_across_prompts=False, resolution_milestones=[])
    gen = torch.Generator().manual_seed(seed)
    cams = sample_train_cameras(c, len(prompts), gen)
    ids = [truth.world.index(p) for p in prompts]
    rgb, op, _ = truth.draw_mixture(ids, cams, gen)
    _, dirs = camera_rays(cams)  # [P, V, H*W, 3]
    bg = truth.world.background(dirs).reshape(len(ids), views, cams.height, cams.width, 3).permute(0, 1, 4, 2, 3)
    return rgb.clamp(0, 1), op, bg.contiguous()


def score_samples(samples: Tensor, own: Tensor, ref_rgb: Tensor, ref_op: Tensor, ref_bg: Tensor) -> dict:
    """``samples`` [N, 3, H, W] in [0, 1] of prompts ``own`` [N] (rows of the references [P, V, ...])."""
    flat = ref_rgb.flatten(2)  # [P, V, D]
    d = ((samples.flatten(1)[:, None, None, :] - flat[None]).pow(2).mean(-1))  # [N, P, V]
    best = d.min(-1)  # nearest view of every prompt
    hits = r_at_1(-best.values, own)
    view = best.indices[torch.arange(len(own)), own]
    near = ref_rgb[own, view]
    gt_mask = ref_op[own, view][:, 0] > 0.5
    mask = (samples - ref_bg[own, view]).abs().amax(1) > MASK_TOL
    inter = (mask & gt_mask).flatten(1).sum(1).float()
    union = (mask | gt_mask).flatten(1).sum(1).float()
    iou = torch.where(union > 0, inter / union.clamp(min=1), torch.ones_like(union))
    return {"psnr": float(psnr(samples, near).mean()), "iou": float(iou.mean()), "r_at_1": float(hits.mean()),
            "n": int(len(own))}


def score_learned(model: str | Path, ts=DEFAULT_TS, n_eps: int = 128, per_prompt: int = 4, steps: int = 50,
                  cfg_scale: float = 7.5, ref_views: int = 64, seed: int = 0, exact_samples: bool = True,
                  log=print) -> dict:
    """Both measurements of the module docstring for the learned prior in ``model``."""
    t0, c0 = time.perf_counter(), time.process_time()
    info = read_info(model)
    cfg = config_of(info)
    truth = build_ground_truth(cfg)
    world = truth.world
    prior = LearnedPrior(model, world=world, renderer=truth.renderer)
    bank = load_bank(model)
    bank_z = bank["rgb"] * 2.0 - 1.0
    seen, unseen = world.splits()["seen"], world.splits().get("unseen", [])
    s = float(info.get("sharpness", 0.0))
    exact = ExactMixture(bank_z, bank["prompt"], len(seen), s, prior.alphas_cumprod)
    res = {"model": str(model), "steps_trained": info.get("steps"), "params": info.get("params"),
           "resolution": prior.resolution, "sharpness": s, "bank_views_per_prompt": info.get("views_per_prompt"),
           "ddim_steps": steps, "cfg": cfg_scale, "samples_per_prompt": per_prompt, "ref_views": ref_views,
           "mask_tol": MASK_TOL}
    log(f"eps error at t in {list(ts)} on {n_eps} rows each ...")
    res["eps"] = eps_error(prior, exact, bank_z, bank["prompt"], seen, ts, n_eps, seed)

    prompts = seen + unseen
    log(f"reference renders: {len(prompts)} prompts x {ref_views} views ...")
    ref_rgb, ref_op, ref_bg = reference_views(truth, prompts, cfg.camera, ref_views, seed + 1000)
    text_all = prior.text_embeddings(prompts)
    gen = torch.Generator().manual_seed(seed + 1)
    own = torch.arange(len(prompts)).repeat_interleave(per_prompt)
    shape = (len(own), 3, prior.resolution, prior.resolution)
    split_of = {"seen": own < len(seen), "unseen": own >= len(seen)}

    def learned_eps(x, t, uncond):
        g = Guidance(torch.full((len(x),), uncond), torch.zeros(0, 2, dtype=torch.long))
        return torch.cat([prior.predict_eps(x[i:i + 128], t[i:i + 128], text_all[own][i:i + 128], _no_cams(),
                                            Guidance(g.uncond[i:i + 128], g.pairs)) for i in range(0, len(x), 128)])

    log(f"sampling {len(own)} images (DDIM {steps} steps, CFG {cfg_scale}) from the learned prior ...")
    z = ddim_sample(learned_eps, shape, prior.alphas_cumprod, steps, cfg_scale, gen)
    samples = {"learned": (z + 1) * 0.5}
    if exact_samples:
        sel = own < len(seen)
        own_seen = own[sel]
        log(f"sampling {int(sel.sum())} images from the exact training mixture ...")
        ze = ddim_sample(lambda x, t, u: exact.eps(x, t, own_seen, u), (int(sel.sum()), *shape[1:]),
                         prior.alphas_cumprod, steps, cfg_scale, torch.Generator().manual_seed(seed + 1))
        samples["exact"] = (ze + 1) * 0.5
    gt_rgb, _, _ = reference_views(truth, prompts, cfg.camera, per_prompt, seed + 2000)
    samples["ground_truth"] = gt_rgb.flatten(0, 1)
    res["samples"] = {}
    for name, imgs in samples.items():
        rows = {}
        for split, m in split_of.items():
            if name == "exact":
                if split != "seen":
                    continue
                pick, own_s = slice(None), own[own < len(seen)]
            else:
                pick, own_s = m, own[m]
            if len(own_s):
                rows[split] = score_samples(imgs[pick], own_s, ref_rgb, ref_op, ref_bg)
        res["samples"][name] = rows
    res["r_at_1_chance"] = 1.0 / len(prompts)
    res["wall_s"], res["cpu_s"] = time.perf_counter() - t0, time.process_time() - c0
    res["_images"] = samples  # not JSON: the caller may save a sheet
    return res


def sample_sheet(images: Tensor, per_prompt: int, path: str | Path, max_prompts: int = 60) -> Path:
    """A PNG grid: one row per prompt, ``per_prompt`` samples across."""
    from PIL import Image  # noqa: PLC0415

    from scalegen.atomic import writing  # noqa: PLC0415

    Path(path).parent.mkdir(parents=True, exist_ok=True)
    n = min(len(images) // per_prompt, max_prompts)
    h, w = images.shape[-2:]
    grid = images[:n * per_prompt].view(n, per_prompt, 3, h, w).permute(0, 3, 1, 4, 2).reshape(n * h, per_prompt * w, 3)
    arr = (grid.clamp(0, 1) * 255).round().byte().numpy()
    with writing(path) as tmp:
        Image.fromarray(arr).save(tmp, format="PNG")
    return Path(path)


__all__ = ["ExactMixture", "MASK_TOL", "ddim_sample", "eps_error", "exact_x0", "reference_views", "sample_sheet",
           "score_learned", "score_samples"]
