"""The oracle prior: a diffusion model whose denoiser is exact.

Its data distribution is a Gaussian mixture in pixel space (``z = 2 rgb - 1``, DDPM's pixel
scaling) whose components are ground-truth renders ``mu_k`` with covariance ``s^2 I``. With
``x_t = a z + s_t eps``, ``D = a^2 s^2 + s_t^2`` and ``r_k = softmax_k(-|x_t - a mu_k|^2 / (2D))``:

    E[x0 | x_t] = sum_k r_k (mu_k + (a s^2 / D)(x_t - a mu_k))
                = (1 - a^2 s^2 / D) sum_k r_k mu_k + (a s^2 / D) x_t
    eps(x_t, t) = (x_t - a E[x0 | x_t]) / s_t

Mixtures are built from the world's *components* (one ground-truth scene each): a prompt of the
default world is one component; a prompt of the compositional world stands for all its completions
(an under-specified prompt such as "a cube": every size and colour of cube) times K instances.

Conditions (``text`` rows are world prompt indices; ``Guidance.uncond`` marks the unconditional rows):
  * camera_aware (MVDream-like): the prompt's components rendered at the row's own camera, all of
    them (exact: one component in the default world);
  * view_agnostic (Stable-Diffusion-like): the prompt's components rendered from V fixed cameras, all
    of them (exact); the prior does not know the view, which reproduces the multi-face problem. With
    ``view_prompts`` only the fixed cameras in the row's view bucket (front/side/back/overhead, the
    thresholds of Stable Diffusion's view-dependent prompts) count, and with ``perp_neg > 0`` the
    declared CFG pairs get Perp-Neg with the other buckets as negatives (``_perp_neg``);
  * unconditional: the components of all prompts, SUBSAMPLED to ``n_uncond`` (always including every
    row's own components), so ``eps_c - eps_u`` vanishes once a render is clearly of its class, as a
    real classifier's gradient does. The default world (60 prompts) draws the others from its prompts,
    the compositional one from random fully specified scenes of its grammar.
``s`` sets the sharpness: small ``s`` turns ``eps_c - eps`` into an exact regression pull. Renders are
made per component when a step needs them (camera-aware), or once per component and fixed camera
(view-agnostic: all up front for a small world, in an LRU for a large one), so a step costs the same
at 60 or 100k prompts.
"""
from __future__ import annotations

import torch
from torch import Tensor

from scalegen.data.cameras import Cameras, orbit_cameras
from scalegen.priors.base import Guidance, Prior, ddpm_alphas_cumprod
from scalegen.priors.views import PERP_NEG_F, perp_neg_plan, perpendicular, view_index
from scalegen.priors.world import GroundTruth, World
from scalegen.render.volsdf import VolSDFRenderer
from scalegen.text.base import LRU


def mixture_posterior_mean(x: Tensor, a: Tensor, s_t: Tensor, mu: Tensor, s: float,
                           mask: Tensor | None = None) -> Tensor:
    """E[x0 | x_t] for rows ``x`` [N, D] under equal-weight mixtures ``mu`` [N, K, D] of N(mu_k, s^2 I);
    ``mask`` [N, K] (optional) keeps only the True components of each row (at least one per row)."""
    var = a * a * s * s + s_t * s_t  # D in the formula, [N]
    d2 = (x[:, None, :] - a[:, None, None] * mu).pow(2).sum(-1)  # [N, K]
    if mask is not None:
        d2 = d2.masked_fill(~mask, float("inf"))
    r = torch.softmax(-d2 / (2.0 * var[:, None]), dim=-1)
    mbar = torch.einsum("nk,nkd->nd", r, mu)
    k = (a * s * s / var)[:, None]
    return (1.0 - a[:, None] * k) * mbar + k * x


class OraclePrior(Prior):
    latent_channels = 3

    def __init__(self, world: World, renderer: VolSDFRenderer, sharpness: float = 0.1,
                 mode: str = "camera_aware", n_uncond: int = 32, n_fixed_views: int = 8,
                 fixed_elevation: float = 17.5, fixed_distance: float = 1.25, fixed_fovy: float = 55.0,
                 view_prompts: bool = False, thresholds: tuple[float, float, float] = (30.0, 30.0, 60.0),
                 perp_neg: float = 0.0, perp_neg_f: dict | None = None, cache_size: int = 8192):
        self.world, self.renderer, self.s, self.mode = world, renderer.eval(), sharpness, mode
        self.n_uncond, self.n_fixed_views = n_uncond, n_fixed_views
        self.fixed = (fixed_elevation, fixed_distance, fixed_fovy)
        self.view_prompts, self.thresholds = view_prompts, thresholds
        self.perp_neg, self.perp_neg_f = perp_neg, {**PERP_NEG_F, **(perp_neg_f or {})}
        self.alphas_cumprod = ddpm_alphas_cumprod()
        self.n_calls = 0  # predict_eps calls (tests count them: one per training step)
        self.n_rows = 0  # rows denoised by those calls (+ Perp-Neg's negative evaluations)
        self._fixed_cache: dict[tuple[int, int], Tensor] = {}
        self._fixed_lru: LRU = LRU(cache_size)  # worlds too large to render up front: (component, h, w) -> [K, D]

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
    def ground_truth(self) -> GroundTruth:
        return GroundTruth(self.world, self.renderer)

    def render(self, prompt_ids: list[int], cameras: Cameras) -> Tensor:
        """Ground truth of world prompts at shared cameras [1, U] -> rgb [K, U, 3, H, W]: each prompt's
        first completion (the prompt itself in the default world)."""
        return self.render_components([c[0] for c in self.world.completions(prompt_ids)], cameras)

    def render_components(self, ids: list[int], cameras: Cameras) -> Tensor:
        """Renders of mixture components at shared cameras [1, U] -> rgb [len(ids), U, 3, H, W]
        (``GroundTruth.render_components``)."""
        return self.ground_truth().render_components(ids, cameras)

    def _fixed_cameras(self, h: int, w: int) -> Cameras:
        el, dist, fovy = self.fixed
        cams = orbit_cameras(self.n_fixed_views, el, dist, fovy, h, azimuth_offset=0.0)
        cams.width = w
        return cams

    def _fixed_views(self, h: int, w: int) -> Tensor:
        """View-agnostic components of a small world: every prompt from K fixed cameras, [n_world, K, D]."""
        key = (h, w)
        if key not in self._fixed_cache:
            cams = self._fixed_cameras(h, w)
            ids = list(range(self.world.n_components))
            renders = torch.cat([self.render_components(ids[i:i + 16], cams) for i in range(0, len(ids), 16)])
            self._fixed_cache[key] = self.encode(renders).flatten(2)
        return self._fixed_cache[key]

    def _fixed_of(self, ids: Tensor, h: int, w: int) -> Tensor:
        """Fixed-camera renders of components ``ids`` [M] -> [M, K, D]: all rendered up front for a small
        world, else rendered when first needed and kept in an LRU."""
        n = self.world.n_components
        if n is not None and n <= 4096:
            return self._fixed_views(h, w)[ids]
        keys = [(int(i), h, w) for i in ids.tolist()]
        missing = list(dict.fromkeys(k for k in keys if k not in self._fixed_lru))
        if missing:
            cams = self._fixed_cameras(h, w)
            for j in range(0, len(missing), 16):
                part = missing[j:j + 16]
                renders = self.encode(self.render_components([k[0] for k in part], cams)).flatten(2)
                for k, r in zip(part, renders):
                    self._fixed_lru.put(k, r)
        return torch.stack([self._fixed_lru.get(k) for k in keys])

    def fixed_buckets(self) -> Tensor:
        """The view bucket (index into VIEWS) of each fixed camera."""
        cams = self._fixed_cameras(8, 8)
        return view_index(cams.azimuth[0], cams.elevation[0], *self.thresholds)

    def uncond_set(self, own: Tensor) -> Tensor:
        """Components of the unconditional mixture: every row's own, topped up with random others to
        ``n_uncond`` (all of them when the world is small enough)."""
        return self.world.uncond_set(own, self.n_uncond)

    # --- the denoiser ------------------------------------------------------------------------
    @torch.no_grad()
    def predict_eps(self, x_t: Tensor, t: Tensor, text: Tensor, cameras: Cameras,
                    guidance: Guidance | None = None) -> Tensor:
        """Exact eps of every row. Conditional rows: the mixture over their prompt's components (all
        completions x instances; view-agnostic: x the fixed views, only those of the row's view bucket
        with ``view_prompts``); with Perp-Neg the declared CFG pairs' conditional rows get its correction."""
        self.n_calls += 1
        n, c, h, w = x_t.shape
        self.n_rows += n
        guidance = guidance or Guidance.all_conditional(n)
        x = x_t.reshape(n, -1).float()
        ab = self.alphas_cumprod.to(x.device)[t.to(x.device)]
        a, s_t = ab.sqrt(), (1.0 - ab).sqrt()
        own = text.to(x.device)
        is_cond = ~guidance.uncond.to(x.device)
        lists = self.world.completions(own.tolist())
        k_max = max(len(cl) for cl in lists)
        if k_max == 1:  # one component per prompt (the default world: the prompt's own id)
            comp, cmask = torch.tensor([cl[0] for cl in lists], dtype=torch.long)[:, None], None
        else:  # ragged: pad with each row's first component, masked out
            comp = torch.tensor([cl + cl[:1] * (k_max - len(cl)) for cl in lists], dtype=torch.long)
            cmask = torch.tensor([[j < len(cl) for j in range(k_max)] for cl in lists])
        uset = self.uncond_set(comp.flatten().cpu() if cmask is None else comp[cmask].cpu())
        pos = torch.full((int(max(uset.max(), comp.max())) + 1,), -1, dtype=torch.long)
        pos[uset] = torch.arange(len(uset))

        rows = cameras.rows()
        if self.mode == "camera_aware":
            key = torch.cat([rows.c2w[0].reshape(n, 16), rows.fovy[0].reshape(n, 1)], 1)
            ukey, inv = torch.unique(key, dim=0, return_inverse=True)
            first = torch.full((len(ukey),), n, dtype=torch.long).scatter_reduce(
                0, inv, torch.arange(n), reduce="amin")
            ucams = rows.map(lambda t: t[:, first], h, w)
            comps = self.encode(self.render_components(uset.tolist(), ucams)).flatten(2).to(x)  # [S, U, D]
            mu_cond = comps[pos[comp], inv[:, None]]  # [N, K, D]
            mu_unc = comps[:, inv].transpose(0, 1)  # [N, S, D]
            mask = cmask
        else:
            fixed_u = self._fixed_of(uset, h, w).to(x)  # [S, V, D]
            fixed_c = self._fixed_of(comp.flatten(), h, w).to(x)  # [N*K, V, D]
            v = fixed_c.shape[1]
            mu_cond = fixed_c.reshape(n, -1, fixed_c.shape[-1])  # [N, K*V, D]
            mu_unc = fixed_u.reshape(1, -1, fixed_u.shape[-1]).expand(n, -1, -1)
            cm = torch.ones(n, comp.shape[1], dtype=torch.bool) if cmask is None else cmask
            buckets = None
            if self.view_prompts:
                buckets = view_index(rows.azimuth[0].cpu(), rows.elevation[0].cpu(), *self.thresholds)
            mask = self._view_mask(cm, buckets, v) if (cmask is not None or buckets is not None) else None

        x0 = torch.empty_like(x)
        ci, ui = is_cond.nonzero().squeeze(1), (~is_cond).nonzero().squeeze(1)
        if len(ci):
            x0[ci] = mixture_posterior_mean(x[ci], a[ci], s_t[ci], mu_cond[ci], self.s,
                                            None if mask is None else mask[ci])
        if len(ui):
            x0[ui] = mixture_posterior_mean(x[ui], a[ui], s_t[ui], mu_unc[ui], self.s)
        eps = (x - a[:, None] * x0) / s_t[:, None]
        if self.mode != "camera_aware" and self.view_prompts and self.perp_neg > 0 and len(ci):
            eps = self._perp_neg(eps, x, a, s_t, rows, mu_cond, cm, v, ci, guidance)
        return eps.view(n, c, h, w).to(x_t.dtype)

    def _view_mask(self, cmask: Tensor, buckets: Tensor | None, v: int) -> Tensor:
        """[N, K*V] components x fixed views a row's conditional keeps: its prompt's components, and with
        ``buckets`` [N] only the fixed views in the row's bucket (all of them when the bucket has none)."""
        if buckets is None:
            return cmask[:, :, None].expand(-1, -1, v).reshape(len(cmask), -1)
        fixed = self.fixed_buckets()
        vm = fixed[None, :] == buckets[:, None]  # [N, V]
        vm[~vm.any(1)] = True
        return (cmask[:, :, None] & vm[:, None, :]).reshape(len(cmask), -1)

    def _perp_neg(self, eps: Tensor, x: Tensor, a: Tensor, s_t: Tensor, rows: Cameras, mu_cond: Tensor,
                  cmask: Tensor, v: int, ci: Tensor, guidance: Guidance) -> Tensor:
        """Perp-Neg as the Stable Diffusion prior applies it (stable_diffusion.py), with the oracle's exact
        bucket-conditioned eps in place of view-prompt embeddings: every conditional row's positive is
        sum_b mix_b eps(bucket b); a declared CFG pair's conditional row becomes
        eps_pos + sum_i w_i perp(eps(neg bucket i) - eps_u, eps_pos - eps_u)."""
        az, el = rows.azimuth[0].cpu().float(), rows.elevation[0].cpu().float()
        mix, neg_views, neg_w = perp_neg_plan(az, el, self.thresholds[2], self.perp_neg, self.perp_neg_f)

        def eps_in(idx: Tensor, bucket: Tensor) -> Tensor:
            m = self._view_mask(cmask[idx], bucket, v)
            x0 = mixture_posterior_mean(x[idx], a[idx], s_t[idx], mu_cond[idx], self.s, m)
            return (x[idx] - a[idx, None] * x0) / s_t[idx, None]

        eps = eps.clone()
        pos = torch.zeros_like(eps[ci])
        for b in range(mix.shape[1]):
            wb = mix[ci, b].to(eps)
            if bool((wb > 0).any()):
                sel = (wb > 0).nonzero().squeeze(1)
                pos[sel] += wb[sel, None] * eps_in(ci[sel], torch.full((len(sel),), b, dtype=torch.long))
        eps[ci] = pos
        pairs = [(cc, uu) for cc, uu in guidance.pairs.tolist() if bool((neg_w[cc] != 0).any())]
        if pairs:
            cs = torch.tensor([p[0] for p in pairs])
            us = torch.tensor([p[1] for p in pairs])
            e_u = eps[us]
            e_pos = eps[cs] - e_u
            acc = torch.zeros_like(e_pos)
            for k in range(2):
                e_neg = eps_in(cs, neg_views[cs, k]) - e_u
                acc += neg_w[cs, k].to(eps)[:, None] * perpendicular(e_neg, e_pos)
            self.n_rows += 2 * len(cs)
            eps[cs] = eps[cs] + acc
        return eps


def ground_truth_renderer(cfg) -> VolSDFRenderer:
    """The renderer the oracle draws its world with (``prior.oracle.samples`` per ray)."""
    o, r = cfg.prior.oracle, cfg.render
    return VolSDFRenderer(bound=r.bound, samples=o.samples, importance_samples=o.importance_samples,
                          beta=r.beta, near_min=r.near_min).eval()


def build_oracle_prior(cfg, world: World) -> OraclePrior:
    o, cam, p = cfg.prior.oracle, cfg.camera, cfg.prior
    return OraclePrior(world, ground_truth_renderer(cfg), sharpness=o.sharpness, mode=o.mode, n_uncond=o.n_uncond,
                       n_fixed_views=o.n_fixed_views, fixed_elevation=sum(cam.elevation_range) / 2,
                       fixed_distance=sum(cam.distance_range) / 2, fixed_fovy=sum(cam.fovy_range) / 2,
                       view_prompts=o.view_prompts,
                       thresholds=(p.front_threshold, p.back_threshold, p.overhead_threshold), perp_neg=p.perp_neg,
                       perp_neg_f={"fs": tuple(p.perp_neg_f_fs), "sf": tuple(p.perp_neg_f_sf),
                                   "sb": tuple(p.perp_neg_f_sb), "fsb": tuple(p.perp_neg_f_fsb)})
