"""The oracle prior: a diffusion model whose denoiser is exact.

Its data distribution is a Gaussian mixture in pixel space (``z = 2 rgb - 1``, DDPM's pixel
scaling) whose components are ground-truth renders ``mu_k`` with covariance ``s^2 I``. With
``x_t = a z + s_t eps``, ``D = a^2 s^2 + s_t^2`` and ``r_k = softmax_k(-|x_t - a mu_k|^2 / (2D))``:

    E[x0 | x_t] = sum_k r_k (mu_k + (a s^2 / D)(x_t - a mu_k))
                = (1 - a^2 s^2 / D) sum_k r_k mu_k + (a s^2 / D) x_t
    eps(x_t, t) = (x_t - a E[x0 | x_t]) / s_t

Conditions (``text`` rows are world prompt indices; ``Guidance.uncond`` marks the unconditional rows):
  * camera_aware (MVDream-like): the conditional has one component, prompt y rendered at the
    row's own camera;
  * view_agnostic (Stable-Diffusion-like): prompt y rendered from K fixed cameras; the prior does
    not know the view, which reproduces the multi-face problem;
  * unconditional: the components of all prompts (subsampled to ``n_uncond`` prompts, always
    including the row's own), so ``eps_c - eps_u`` vanishes once a render is clearly of its class,
    as a real classifier's gradient does.
``s`` sets the sharpness: small ``s`` turns ``eps_c - eps`` into an exact regression pull.
"""
from __future__ import annotations

import torch
from torch import Tensor

from scalegen.data.cameras import Cameras, orbit_cameras
from scalegen.priors.base import Guidance, Prior, ddpm_alphas_cumprod
from scalegen.priors.oracle_world import OracleWorld
from scalegen.render.volsdf import VolSDFRenderer


def mixture_posterior_mean(x: Tensor, a: Tensor, s_t: Tensor, mu: Tensor, s: float) -> Tensor:
    """E[x0 | x_t] for rows ``x`` [N, D] under equal-weight mixtures ``mu`` [N, K, D] of N(mu_k, s^2 I)."""
    var = a * a * s * s + s_t * s_t  # D in the formula, [N]
    d2 = (x[:, None, :] - a[:, None, None] * mu).pow(2).sum(-1)  # [N, K]
    r = torch.softmax(-d2 / (2.0 * var[:, None]), dim=-1)
    mbar = torch.einsum("nk,nkd->nd", r, mu)
    k = (a * s * s / var)[:, None]
    return (1.0 - a[:, None] * k) * mbar + k * x


class OraclePrior(Prior):
    latent_channels = 3

    def __init__(self, world: OracleWorld, renderer: VolSDFRenderer, sharpness: float = 0.1,
                 mode: str = "camera_aware", n_uncond: int = 32, n_fixed_views: int = 8,
                 fixed_elevation: float = 17.5, fixed_distance: float = 1.25, fixed_fovy: float = 55.0):
        self.world, self.renderer, self.s, self.mode = world, renderer.eval(), sharpness, mode
        self.n_uncond, self.n_fixed_views = n_uncond, n_fixed_views
        self.fixed = (fixed_elevation, fixed_distance, fixed_fovy)
        self.alphas_cumprod = ddpm_alphas_cumprod()
        self.n_calls = 0  # predict_eps calls (tests count them: one per training step)
        self.n_rows = 0  # rows denoised by those calls
        self._fixed_cache: dict[tuple[int, int], Tensor] = {}

    # --- image space -------------------------------------------------------------------------
    def encode(self, rgb: Tensor) -> Tensor:
        return rgb * 2.0 - 1.0

    def decode(self, latents: Tensor) -> Tensor:
        return (latents + 1.0) * 0.5

    # --- conditions --------------------------------------------------------------------------
    def text_embeddings(self, prompts: list[str], tokens: Tensor | None = None) -> Tensor:
        """World prompt indices (the oracle takes no precomputed embeddings: ``stored_tokens`` is None)."""
        return torch.tensor([self.world.index(p) for p in prompts], dtype=torch.long)

    # --- ground truth ------------------------------------------------------------------------
    @torch.no_grad()
    def render(self, scene_ids: list[int], cameras: Cameras) -> Tensor:
        """Ground-truth renders of world scenes at shared cameras [1, U] -> rgb [K, U, 3, H, W]."""
        field = self.world.field([self.world.prompts[i] for i in scene_ids])
        out = self.renderer(field, cameras.expand(len(scene_ids)), background=self.world.background,
                            perturb=False)
        return out.rgb.view(len(scene_ids), cameras.shape[1], 3, cameras.height, cameras.width)

    def _fixed_views(self, h: int, w: int) -> Tensor:
        """View-agnostic components: every world prompt from K fixed cameras, [n_world, K, D]."""
        key = (h, w)
        if key not in self._fixed_cache:
            el, dist, fovy = self.fixed
            cams = orbit_cameras(self.n_fixed_views, el, dist, fovy, h, azimuth_offset=0.0)
            cams.width = w
            ids = list(range(len(self.world.prompts)))
            renders = torch.cat([self.render(ids[i:i + 16], cams) for i in range(0, len(ids), 16)])
            self._fixed_cache[key] = self.encode(renders).flatten(2)
        return self._fixed_cache[key]

    def uncond_set(self, own: Tensor) -> Tensor:
        """Prompts of the unconditional mixture: every row's own prompt, topped up with random
        others to ``n_uncond`` (all prompts when the world is small enough)."""
        n_world = len(self.world.prompts)
        own_u = torch.unique(own)
        if self.n_uncond >= n_world:
            return torch.arange(n_world)
        rest = torch.ones(n_world, dtype=torch.bool)
        rest[own_u] = False
        others = torch.nonzero(rest).squeeze(1)
        n_more = max(self.n_uncond - len(own_u), 0)
        pick = others[torch.randperm(len(others))[:n_more]]
        return torch.cat([own_u, pick])

    # --- the denoiser ------------------------------------------------------------------------
    @torch.no_grad()
    def predict_eps(self, x_t: Tensor, t: Tensor, text: Tensor, cameras: Cameras,
                    guidance: Guidance | None = None) -> Tensor:
        """Exact eps of every row; CFG pairs need nothing special here (the oracle has no Perp-Neg)."""
        self.n_calls += 1
        n, c, h, w = x_t.shape
        self.n_rows += n
        guidance = guidance or Guidance.all_conditional(n)
        x = x_t.reshape(n, -1).float()
        ab = self.alphas_cumprod.to(x.device)[t.to(x.device)]
        a, s_t = ab.sqrt(), (1.0 - ab).sqrt()
        own = text.to(x.device)
        is_cond = ~guidance.uncond.to(x.device)
        uset = self.uncond_set(own.cpu())
        pos = torch.full((len(self.world.prompts),), -1, dtype=torch.long)
        pos[uset] = torch.arange(len(uset))

        if self.mode == "camera_aware":
            rows = cameras.rows()
            key = torch.cat([rows.c2w[0].reshape(n, 16), rows.fovy[0].reshape(n, 1)], 1)
            ukey, inv = torch.unique(key, dim=0, return_inverse=True)
            first = torch.full((len(ukey),), n, dtype=torch.long).scatter_reduce(
                0, inv, torch.arange(n), reduce="amin")
            ucams = Cameras(rows.c2w[:, first], rows.fovy[:, first], rows.elevation[:, first],
                            rows.azimuth[:, first], rows.distance[:, first], h, w)
            comps = self.encode(self.render(uset.tolist(), ucams)).flatten(2).to(x)  # [S, U, D]
            mu_cond = comps[pos[own], inv][:, None]  # [N, 1, D]
            mu_unc = comps[:, inv].transpose(0, 1)  # [N, S, D]
        else:
            fixed = self._fixed_views(h, w).to(x)  # [n_world, K, D]
            mu_cond = fixed[own]  # [N, K, D]
            mu_unc = fixed[uset].reshape(1, -1, fixed.shape[-1]).expand(n, -1, -1)

        x0 = torch.empty_like(x)
        ci, ui = is_cond.nonzero().squeeze(1), (~is_cond).nonzero().squeeze(1)
        if len(ci):
            x0[ci] = mixture_posterior_mean(x[ci], a[ci], s_t[ci], mu_cond[ci], self.s)
        if len(ui):
            x0[ui] = mixture_posterior_mean(x[ui], a[ui], s_t[ui], mu_unc[ui], self.s)
        eps = (x - a[:, None] * x0) / s_t[:, None]
        return eps.view(n, c, h, w).to(x_t.dtype)


def build_oracle_prior(cfg, world: OracleWorld) -> OraclePrior:
    o, r, cam = cfg.prior.oracle, cfg.render, cfg.camera
    gt_renderer = VolSDFRenderer(bound=r.bound, samples=o.samples, importance_samples=o.importance_samples,
                                 beta=r.beta, near_min=r.near_min)
    return OraclePrior(world, gt_renderer, sharpness=o.sharpness, mode=o.mode, n_uncond=o.n_uncond,
                       n_fixed_views=o.n_fixed_views, fixed_elevation=sum(cam.elevation_range) / 2,
                       fixed_distance=sum(cam.distance_range) / 2, fixed_fovy=sum(cam.fovy_range) / 2)
