"""`scalegen bench guidance`: why SDS and ASD behave as they do against the oracle prior.

No training: the expected distillation gradient E_eps[g] is measured directly at, and next to,
the ground-truth renders ``mu`` of seen prompts, per timestep, with the exact prior. Reported per t:

* ``r_own``: responsibility of the prompt's own component in the *unconditional* mixture at
  x_t = a mu + s_t eps. When it is ~1 the unconditional already "recognises" the class,
  eps_c - eps_u ~ 0 and classifier-free guidance has nothing to amplify.
* ``sat_sds100`` / ``sat_sds7.5`` / ``sat_asd``: the saturation push at z = mu, i.e. how much one
  gradient-descent step moves the object's pixels away from grey, ``-E[g] . sign(z) mask / |mask|``
  (positive = toward over-saturation). A method that over-saturates has a positive push at the
  ground truth (its fixed point lies beyond mu).
* ``pull_sds`` / ``pull_asd``: restoring strength toward mu for a render that is off by a colour
  offset delta on the object, ``k = E[g] . delta / |delta|^2`` (positive: a descent step -g moves back to mu).
  Under Adam, a weaker distillation pull means the regularizers (eikonal) weigh relatively more.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from scalegen.config import load_config
from scalegen.data.cameras import camera_rays, sample_train_cameras
from scalegen.distill import ASD, SDS, TimestepSchedule, cond_uncond_eps
from scalegen.priors import build_prior, build_world
from scalegen.priors.base import T


@dataclass
class GuidanceOptions:
    t_fractions: list[float] = field(default_factory=lambda: [0.02, 0.1, 0.2, 0.35, 0.5, 0.65, 0.8, 0.98])
    noise_draws: int = 6  # eps draws averaged per t
    t_min: float = 0.02  # the annealed lower end of the t range that ASD's dt is drawn against (late training)


@torch.no_grad()
def bench_guidance(opts: GuidanceOptions, overrides: list[str], out_root: str = "") -> dict:
    cfg = load_config(None, ["train.logger=none", *overrides])
    torch.manual_seed(cfg.train.seed)
    world = build_world(cfg)
    prior = build_prior(cfg, world)
    prompts = world.seen[: cfg.data.prompts_per_step]
    shared = sample_train_cameras(cfg.camera, 1)  # [1, V], as in training
    cams = shared.expand(len(prompts))
    v = shared.shape[1]
    mu = prior.encode(prior.render([world.index(p) for p in prompts], shared)).flatten(0, 1)  # [B*V, 3, H, W]
    text = prior.text_embeddings(prompts).repeat_interleave(v)
    _, dirs = camera_rays(shared)
    backdrop = prior.encode(world.background(dirs).view(v, shared.height, shared.width, 3).permute(0, 3, 1, 2))
    backdrop = backdrop.repeat(len(prompts), 1, 1, 1)
    mask = ((mu - backdrop).abs().amax(1, keepdim=True) > 1e-3).float().expand_as(mu)  # object pixels
    sat_dir = torch.sign(mu) * mask  # away from grey (z = 0 is rgb 0.5)
    delta = -0.3 * sat_dir  # a desaturating colour error on the object
    # The trainer's own distillers (their gradient at a given t and eps), with the config's weighting.
    sched = TimestepSchedule([0.0, 1.0], [0.0, 1.0], None, 1)  # unused by gradient(); t is given
    d = cfg.distill
    sds100 = SDS(prior, sched, guidance_scale=100.0, weighting=d.weighting)
    sds7 = SDS(prior, sched, guidance_scale=7.5, weighting=d.weighting)
    asd = ASD(prior, sched, guidance_scale=d.guidance_scale, eta=d.asd_eta, weighting=d.weighting)
    n_eps = opts.noise_draws
    rows = []
    for f in opts.t_fractions:
        t = torch.full((len(mu),), min(max(int(f * T), 1), T - 1), dtype=torch.long)
        t2 = asd.t_plus(t, int(opts.t_min * T))  # dt as ASD draws it at this t_min
        acc = dict.fromkeys(("r_own", "cfg_ratio", "sat_sds100", "sat_sds7.5", "sat_asd", "pull_sds", "pull_asd"), 0.0)
        for _ in range(n_eps):
            eps = torch.randn_like(mu)
            for z, at_gt in ((mu, True), (mu + delta, False)):
                g_sds100 = sds100.gradient(z, text, cams, t, eps)
                g_sds7 = sds7.gradient(z, text, cams, t, eps)
                g_asd = asd.gradient(z, text, cams, t, t2, eps)
                if at_gt:
                    x_t, eps_c, eps_u = cond_uncond_eps(prior, z, eps, t, text, cams)
                    norm = sat_dir.abs().sum()
                    acc["sat_sds100"] += -(g_sds100 * sat_dir).sum().item() / norm.item() / n_eps
                    acc["sat_sds7.5"] += -(g_sds7 * sat_dir).sum().item() / norm.item() / n_eps
                    acc["sat_asd"] += -(g_asd * sat_dir).sum().item() / norm.item() / n_eps
                    acc["r_own"] += _own_responsibility(prior, x_t, t, shared, text).item() / n_eps
                    acc["cfg_ratio"] += ((eps_c - eps_u).norm() / (eps_c - eps).norm().clamp(min=1e-12)).item() / n_eps
                else:
                    d2 = delta.pow(2).sum().item()
                    acc["pull_sds"] += (g_sds7 * delta).sum().item() / d2 / n_eps
                    acc["pull_asd"] += (g_asd * delta).sum().item() / d2 / n_eps
        rows.append({"t": int(t[0]), **acc})
    print(f"oracle prior, s = {cfg.prior.oracle.sharpness:g}, {cfg.prior.oracle.mode}, {len(prompts)} seen prompts x {v} "
          f"views, {n_eps} noise draws per t")
    print(f"{'t':>4} {'r_own':>6} {'|c-u|/|c-e|':>11} {'sat SDS100':>10} {'sat SDS7.5':>10} {'sat ASD':>8} "
          f"{'pull SDS':>9} {'pull ASD':>9}")
    for r in rows:
        print(f"{r['t']:>4} {r['r_own']:>6.3f} {r['cfg_ratio']:>11.3f} {r['sat_sds100']:>+10.4f} "
              f"{r['sat_sds7.5']:>+10.4f} {r['sat_asd']:>+8.4f} {r['pull_sds']:>+9.4f} {r['pull_asd']:>+9.4f}")
    return {"sharpness": cfg.prior.oracle.sharpness, "rows": rows}


def _own_responsibility(prior, x_t, t, shared, text):
    """Mean responsibility of each row's own ground truth among the unconditional components."""
    ab = prior.alphas_cumprod[t]
    a, s_t = ab.sqrt(), (1 - ab).sqrt()
    uset = prior.uncond_set(text)
    comps = prior.encode(prior.render(uset.tolist(), shared)).flatten(2)  # [S, V, D]
    x = x_t.flatten(1)
    view = torch.arange(len(x)) % shared.shape[1]
    mu_rows = comps[:, view].transpose(0, 1)  # [N, S, D]
    var = a * a * prior.s**2 + s_t * s_t
    d2 = (x[:, None] - a[:, None, None] * mu_rows).pow(2).sum(-1)
    r = torch.softmax(-d2 / (2 * var[:, None]), -1)
    own = (uset[None, :] == text[:, None]).float()
    return (r * own).sum(-1).mean()
