"""`scalegen bench toy2d`: ScaleDreamer's 2D toy (Fig. 3). Particles in R^2 are distilled against a
2D Gaussian-mixture "diffusion model" whose denoiser is exact, by the SAME distiller classes the
trainer uses (SDS, CSD, VSD, ASD, VDM with its default DCA, and ``vdm_pure`` = VDM with lambda = 1 at
every t; particles are latents of shape [N, 2, 1, 1], so VSD's
correction net and VDM's M_psi, 3x3 convs on a 1x1 image, act as small conditioned MLPs).

The "prompt" distribution: ``K`` equal components on a ring (radius ``radius``, std ``sigma``).
The unconditional distribution: those components (half the mass) plus as many "other class"
components on an outer ring, so ``eps_c - eps_u`` is a classifier direction as in the oracle.
For a mixture with weights pi_k and shared covariance sigma^2 I (``D = a^2 sigma^2 + s_t^2``):
``E[x0|x_t] = sum_k r_k (mu_k + (a sigma^2 / D)(x_t - a mu_k))``, ``r_k ∝ pi_k exp(-|x_t - a mu_k|^2 / 2D)``.

Each method starts from the same particles (N(0, init_std^2), not on the ring), takes ``steps``
plain gradient steps ``x <- x - lr g`` (the distillers' own models use Adam at ``net_lr``) and is
scored by how many ring components end up holding particles (a particle belongs to its nearest
component if it lies within ``4 sigma``; a component counts when it holds >= 2% of the particles).
Writes ``out_dir/<method>.png`` (final particles over the components), ``out_dir/particles.png``
(all methods side by side) and ``out_dir/grad_norm.png`` (mean |g| per particle over training, log).

The timestep range anneals as in ScaleDreamer's training ([0.50, 0.98] -> [0.02, 0.50] of T; ``bench.anneal=false``:
fixed [0.02, 0.98]). Besides the component count it reports the spread inside a component, per
axis, over sigma (1 = the data's spread, 0 = collapsed onto the centre).

Options (``bench.key=value``, ``Toy2DOptions``): steps, particles, lr, net_lr, cfg, seed, k, radius, sigma, init_std,
anneal, dca (VDM's schedule), dca_lo, dca_hi (its lambda at t = 0 and T), methods, out_dir (default
docs/toy2d).
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np
import torch

from scalegen.data.cameras import Cameras
from scalegen.priors.base import Guidance, Prior, ddpm_alphas_cumprod

METHODS = ("sds", "csd", "vsd", "asd", "vdm", "vdm_pure")
COLORS = {"sds": (214, 39, 40), "csd": (148, 103, 189), "vsd": (31, 119, 180), "asd": (255, 127, 14),
          "vdm": (44, 160, 44), "vdm_pure": (23, 190, 207)}


class MixturePrior(Prior):
    """Exact eps of 2D Gaussian mixtures (conditional: ``mu_c``; unconditional: ``mu_u``); latents
    are the particles themselves, [N, 2, 1, 1]."""

    latent_channels = 2

    def __init__(self, mu_c: torch.Tensor, mu_u: torch.Tensor, w_u: torch.Tensor, sigma: float):
        self.mu_c, self.mu_u, self.sigma = mu_c, mu_u, sigma
        self.logw_c = torch.full((len(mu_c),), -math.log(len(mu_c)))
        self.logw_u = w_u.log()
        self.alphas_cumprod = ddpm_alphas_cumprod()

    def encode(self, rgb):
        return rgb

    def decode(self, latents):
        return latents

    def text_embeddings(self, prompts, tokens=None):
        return torch.zeros(len(prompts), dtype=torch.long)  # one "prompt": the ring

    def posterior_mean(self, x, a, s_t, mu, logw):
        var = a * a * self.sigma**2 + s_t * s_t  # [N]
        d2 = (x[:, None, :] - a[:, None, None] * mu[None]).pow(2).sum(-1)  # [N, K]
        r = torch.softmax(logw[None] - d2 / (2 * var[:, None]), -1)
        k = (a * self.sigma**2 / var)[:, None]
        return (1 - a[:, None] * k) * (r @ mu) + k * x

    @torch.no_grad()
    def predict_eps(self, x_t, t, text, cameras: Cameras, guidance: Guidance | None = None):
        x = x_t.reshape(len(x_t), 2)
        ab = self.alphas_cumprod[t]
        a, s_t = ab.sqrt(), (1 - ab).sqrt()
        cond = ~(guidance or Guidance.all_conditional(len(x))).uncond
        x0 = torch.empty_like(x)
        if cond.any():
            x0[cond] = self.posterior_mean(x[cond], a[cond], s_t[cond], self.mu_c, self.logw_c)
        if (~cond).any():
            x0[~cond] = self.posterior_mean(x[~cond], a[~cond], s_t[~cond], self.mu_u, self.logw_u)
        return ((x - a[:, None] * x0) / s_t[:, None]).view_as(x_t)


@dataclass
class Toy2DOptions:
    steps: int = 2000
    particles: int = 512
    lr: float = 0.01  # particles' plain gradient step
    net_lr: float = 1e-3  # Adam rate of VSD's correction net and VDM's M_psi
    cfg: float = 1.0  # guidance scale
    seed: int = 0
    k: int = 6  # ring components of the "prompt"
    radius: float = 1.0
    sigma: float = 0.05
    init_std: float = 0.3
    anneal: bool = True  # ScaleDreamer's t anneal; false: fixed [0.02, 0.98]
    dca: Literal["constant", "linear", "cosine"] = "linear"  # VDM's lambda(t) schedule
    dca_lo: float = 1.0  # lambda at t = 0
    dca_hi: float = 0.0  # lambda at t = T
    methods: list[Literal["sds", "csd", "vsd", "asd", "vdm", "vdm_pure"]] = field(default_factory=lambda: list(METHODS))
    out_dir: str = "docs/toy2d"


def make_prior(k: int, radius: float, sigma: float) -> MixturePrior:
    ang = torch.arange(k) * 2 * math.pi / k + math.pi / 2
    mu_c = radius * torch.stack([ang.cos(), ang.sin()], 1)
    ang2 = ang + math.pi / k
    mu_o = 2.0 * radius * torch.stack([ang2.cos(), ang2.sin()], 1)
    w_u = torch.cat([torch.full((k,), 0.5 / k), torch.full((k,), 0.5 / k)])
    return MixturePrior(mu_c, torch.cat([mu_c, mu_o]), w_u, sigma)


def build(name: str, prior, sched, o: "Toy2DOptions"):
    from scalegen.distill import ASD, CSD, SDS, VDM, VSD  # noqa: PLC0415
    from scalegen.distill.nets import ResConvNet, ResidualEps  # noqa: PLC0415

    if name == "sds":
        return SDS(prior, sched, guidance_scale=o.cfg)
    if name == "csd":
        return CSD(prior, sched)
    if name == "asd":
        return ASD(prior, sched, guidance_scale=o.cfg, eta=0.1)
    if name == "vsd":
        return VSD(prior, sched, ResidualEps(2, 32, 2), guidance_scale=o.cfg, lr=o.net_lr)
    if name == "vdm_pure":  # lambda = 1 at every t: no SDS share
        return VDM(prior, sched, ResConvNet(2, 32, 2), guidance_scale=o.cfg, lr=o.net_lr,
                   dca_schedule="constant", dca_ends=(1.0, 1.0))
    return VDM(prior, sched, ResConvNet(2, 32, 2), guidance_scale=o.cfg, lr=o.net_lr, dca_schedule=o.dca,
               dca_ends=(o.dca_lo, o.dca_hi))


def run_method(name: str, prior: MixturePrior, o: Toy2DOptions) -> tuple[torch.Tensor, list[float]]:
    from scalegen.data.cameras import orbit_cameras  # noqa: PLC0415
    from scalegen.distill import TimestepSchedule  # noqa: PLC0415

    torch.manual_seed(o.seed)
    n = o.particles
    x = (o.init_std * torch.randn(n, 2, 1, 1)).requires_grad_(True)
    if o.anneal:  # ScaleDreamer's anneal: [0.50, 0.98] -> [0.02, 0.50] of T over the run
        sched = TimestepSchedule([0.50, 0.98], [0.02, 0.50], None, o.steps)
    else:
        sched = TimestepSchedule([0.02, 0.98], [0.02, 0.98], None, o.steps)
    d = build(name, prior, sched, o)
    net_opt = torch.optim.Adam(d.parameters(), lr=o.net_lr) if d.parameters() else None
    cams = orbit_cameras(n, 0.0, 1.5, 50.0, 1)
    text = torch.zeros(n, dtype=torch.long)
    norms = []
    for step in range(o.steps):
        loss, logs = d(x, text, cams, step)
        x.grad = None
        if net_opt is not None:
            net_opt.zero_grad(set_to_none=True)
        loss.backward()
        with torch.no_grad():
            x -= o.lr * n * x.grad  # dL/dx = g / N
        if net_opt is not None:
            net_opt.step()
        norms.append(float(logs["grad_norm"]) / math.sqrt(n))
        if not torch.isfinite(x).all():
            break
    return x.detach().view(n, 2), norms


def coverage(x: torch.Tensor, mu: torch.Tensor, sigma: float) -> dict:
    d = torch.cdist(x, mu)
    dmin, k = d.min(1)
    on = dmin < 4 * sigma
    counts = torch.bincount(k[on], minlength=len(mu))
    # Spread inside a component, per axis, relative to the data's sigma: 1 = matches the data,
    # 0 = every particle collapsed onto the component's centre (mode seeking).
    dev = (x[on] - mu[k[on]]) if on.any() else x.new_zeros(1, 2)
    near = dmin < 0.3  # looser: within 6 sigma (components are 1.0 apart on the default ring)
    counts_near = torch.bincount(k[near], minlength=len(mu))
    return {"components_hit": int((counts >= 0.02 * len(x)).sum()), "on_mode_frac": float(on.float().mean()),
            "components_near": int((counts_near >= 0.02 * len(x)).sum()), "near_frac": float(near.float().mean()),
            "within_std_over_sigma": float(dev.pow(2).mean().sqrt() / sigma),
            "counts": counts.tolist(), "mean_dist_to_nearest": float(dmin.mean())}


# --- drawing (PIL; no plotting dependency) -------------------------------------------------------


def _canvas(size: int, title: str):
    from PIL import Image, ImageDraw  # noqa: PLC0415

    img = Image.new("RGB", (size, size), "white")
    dr = ImageDraw.Draw(img)
    dr.text((6, 4), title, fill=(0, 0, 0))
    return img, dr


def draw_particles(x: torch.Tensor, prior: MixturePrior, title: str, color, size: int = 320, extent: float = 2.4):
    img, dr = _canvas(size, title)
    to_px = lambda p: ((p[0] / extent * 0.5 + 0.5) * size, (0.5 - p[1] / extent * 0.5) * size)  # noqa: E731
    rad = 4 * prior.sigma / extent * 0.5 * size
    for m in prior.mu_u[len(prior.mu_c):].tolist():
        cx, cy = to_px(m)
        dr.ellipse([cx - rad, cy - rad, cx + rad, cy + rad], outline=(190, 190, 190))
    for m in prior.mu_c.tolist():
        cx, cy = to_px(m)
        dr.ellipse([cx - rad, cy - rad, cx + rad, cy + rad], outline=(0, 0, 0), width=2)
    for p in x.clamp(-extent, extent).tolist():
        cx, cy = to_px(p)
        dr.ellipse([cx - 1.5, cy - 1.5, cx + 1.5, cy + 1.5], fill=color)
    return img


def draw_grad_norms(curves: dict[str, list[float]], w: int = 640, h: int = 360):
    img, dr = _canvas(w, "")
    img = img.crop((0, 0, w, h))
    from PIL import ImageDraw  # noqa: PLC0415

    dr = ImageDraw.Draw(img)
    dr.text((6, 4), "mean |g| per particle vs step (log scale, 50-step moving average)", fill=(0, 0, 0))
    l, r, t, b = 50, w - 90, 24, h - 30
    smooth = {}
    for k, c in curves.items():
        a = np.asarray(c, dtype=np.float64)
        m = np.convolve(a, np.ones(50) / 50, mode="valid") if len(a) >= 50 else a
        smooth[k] = np.log10(np.maximum(m, 1e-8))
    lo = min(v.min() for v in smooth.values())
    hi = max(v.max() for v in smooth.values())
    lo, hi = math.floor(lo), math.ceil(hi) if hi > lo else lo + 1
    dr.rectangle([l, t, r, b], outline=(0, 0, 0))
    for e in range(int(lo), int(hi) + 1):
        y = b - (e - lo) / (hi - lo) * (b - t)
        dr.line([l - 4, y, l, y], fill=(0, 0, 0))
        dr.text((6, y - 6), f"1e{e}", fill=(0, 0, 0))
    for i, (k, v) in enumerate(smooth.items()):
        n = len(v)
        pts = [(l + j / max(n - 1, 1) * (r - l), b - (v[j] - lo) / (hi - lo) * (b - t)) for j in range(0, n, 4)]
        dr.line(pts, fill=COLORS.get(k, (0, 0, 0)), width=2)
        dr.text((r + 8, t + 14 * i), k.upper(), fill=COLORS.get(k, (0, 0, 0)))
    dr.text((l, b + 8), "0", fill=(0, 0, 0))
    dr.text((r - 30, b + 8), f"{len(next(iter(curves.values())))}", fill=(0, 0, 0))
    return img


def bench_toy2d(o: Toy2DOptions, overrides: list[str], out_root: str = "") -> dict:
    """The toy has no training config: its options are ``Toy2DOptions`` only."""
    from PIL import Image  # noqa: PLC0415

    if overrides:
        from scalegen.errors import ConfigError  # noqa: PLC0415

        raise ConfigError(f"`scalegen bench toy2d` runs no training config, so '{overrides[0]}' means nothing here; "
                          "its options are bench.<name>=value (scalegen/bench/toy2d.py Toy2DOptions)")
    torch.set_num_threads(1)
    prior = make_prior(o.k, o.radius, o.sigma)
    out_dir = Path(o.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    res, curves, panels = {}, {}, []
    for name in o.methods:
        x, norms = run_method(name, prior, o)
        cov = coverage(x, prior.mu_c, o.sigma)
        res[name] = {**cov, "final_grad_norm": float(np.mean(norms[-100:]))}
        curves[name] = norms
        img = draw_particles(x, prior, f"{name.upper()}: {cov['components_hit']}/{o.k} components, "
                             f"{100 * cov['on_mode_frac']:.0f}% on one, std/sigma {cov['within_std_over_sigma']:.2f}",
                             COLORS[name])
        img.save(out_dir / f"{name}.png")
        panels.append(img)
        print(f"[toy2d] {name}: {cov['components_hit']}/{o.k} components hit, "
              f"{100 * cov['on_mode_frac']:.0f}% of particles on a mode, counts {cov['counts']}", flush=True)
    sheet = Image.new("RGB", (sum(p.width for p in panels), panels[0].height), "white")
    xo = 0
    for p in panels:
        sheet.paste(p, (xo, 0))
        xo += p.width
    sheet.save(out_dir / "particles.png")
    draw_grad_norms(curves).save(out_dir / "grad_norm.png")
    print(f"{'method':<9} {'hit (4 sigma)':>13} {'on a mode':>9} {'hit (0.3)':>9} {'near':>5} {'std/sigma':>9} "
          f"{'mean dist':>9} {'final |g|':>9}")
    for k, r in res.items():
        print(f"{k:<9} {r['components_hit']:>10}/{o.k:<2} {100 * r['on_mode_frac']:>8.0f}% "
              f"{r['components_near']:>6}/{o.k:<2} {100 * r['near_frac']:>4.0f}% "
              f"{r['within_std_over_sigma']:>9.2f} "
              f"{r['mean_dist_to_nearest']:>9.3f} {r['final_grad_norm']:>9.3f}")
    print(f"PNGs in {out_dir}/")
    return {"options": asdict(o), "methods": res}
