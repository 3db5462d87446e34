"""SDS and ASD gradients against their formulas, and against the exact oracle."""
import torch

from conftest import LinearPrior
from scalegen.config import load_config
from scalegen.data.cameras import orbit_cameras
from scalegen.distill import ASD, SDS, TimestepSchedule, target_loss
from scalegen.priors import build_prior, build_world


def test_target_loss_gradient_is_g_over_batch():
    z = torch.randn(4, 3, 5, 5, requires_grad=True)
    g = torch.randn(4, 3, 5, 5)
    target_loss(z, g).backward()
    assert torch.allclose(z.grad, g / 4)


def test_sds_formula():
    prior = LinearPrior()
    sched = TimestepSchedule([0.02, 0.98], [0.02, 0.98], 1.0, 10)
    sds = SDS(prior, sched, guidance_scale=7.5)
    z = torch.randn(3, 1, 4, 4)
    t = torch.tensor([100, 500, 900])
    eps = torch.randn_like(z)
    cams = orbit_cameras(3, 0.0, 1.5, 50.0, 4)
    g = sds.gradient(z, torch.tensor([0, 1, 2]), cams, t, eps)
    x_t = prior.add_noise(z, eps, t)
    e_u = 0.5 * x_t + 0.1 * t.view(-1, 1, 1, 1) / 1000
    e_c = e_u + 0.3
    w = (1 - prior.alphas_cumprod[t]).view(-1, 1, 1, 1)
    assert torch.allclose(g, w * (e_u + 7.5 * (e_c - e_u) - eps), atol=1e-6)
    assert prior.calls == [6]  # one stacked call: [cond, uncond]


def test_asd_formula_and_noise_cancels():
    prior = LinearPrior()
    sched = TimestepSchedule([0.02, 0.98], [0.02, 0.98], 1.0, 10)
    asd = ASD(prior, sched, guidance_scale=7.5, eta=0.1)
    z = torch.randn(3, 1, 4, 4)
    t, t2 = torch.tensor([100, 500, 900]), torch.tensor([110, 520, 930])
    eps = torch.randn_like(z)
    cams = orbit_cameras(3, 0.0, 1.5, 50.0, 4)
    g = asd.gradient(z, torch.tensor([0, 1, 2]), cams, t, t2, eps)
    x1, x2 = prior.add_noise(z, eps, t), prior.add_noise(z, eps, t2)
    e_u = 0.5 * x1 + 0.1 * t.view(-1, 1, 1, 1) / 1000
    e_c = e_u + 0.3
    e_c2 = 0.5 * x2 + 0.1 * t2.view(-1, 1, 1, 1) / 1000 + 0.3
    w = (1 - prior.alphas_cumprod[t]).view(-1, 1, 1, 1)
    assert torch.allclose(g, w * (e_u + 7.5 * (e_c - e_u) - e_c2), atol=1e-6)
    assert prior.calls == [9]  # one stacked call: [cond@t, uncond@t, cond@t+dt]
    # With dt = 0 and no guidance the two branches are identical: the injected noise cancels.
    asd1 = ASD(prior, sched, guidance_scale=1.0)
    assert asd1.gradient(z, torch.tensor([0, 1, 2]), cams, t, t, eps).abs().max() == 0
    # dt is floor(U * eta * (t - t_min)), clamped to [1, 999].
    torch.manual_seed(0)
    tp = asd.t_plus(torch.full((1000,), 500), t_min=20)
    assert (tp >= 500).all() and 45 <= (tp - 500).max() <= 48
    assert (asd.t_plus(torch.full((100,), 990), t_min=20) <= 999).all()


def test_schedule_anneals_range():
    s = TimestepSchedule([0.5, 0.98], [0.02, 0.5], None, 100)  # None: over the whole run
    assert s.range(0) == (500, 980) and s.range(100) == (20, 500) and s.range(50) == (260, 740)
    # step positions (config.step_position): below 1.0 a fraction of the run, 1.0 and above steps
    assert TimestepSchedule([0.5, 0.98], [0.02, 0.5], 0.5, 100).range(50) == (20, 500)
    assert TimestepSchedule([0.5, 0.98], [0.02, 0.5], 1.0, 100).range(1) == (20, 500)  # 1.0 = step 1
    assert TimestepSchedule([0.5, 0.98], [0.02, 0.5], 1.0, 100).range(0) == (500, 980)
    t = s.sample(64, 0, group=4)
    assert ((t >= 500) & (t <= 980)).all() and (t.view(16, 4) == t.view(16, 4)[:, :1]).all()


def _oracle(extra=()):
    cfg = load_config(None, ["world.colors=[red, blue]", "world.shapes=[sphere, cube]", "world.sizes=[large]",
                             "world.n_unseen=0", "prior.oracle.samples=24", "prior.oracle.importance_samples=8",
                             *extra])
    world = build_world(cfg)
    return world, build_prior(cfg, world)


def test_sds_and_asd_pull_renders_toward_ground_truth():
    """E[g] is aligned with z - mu (so descent moves z toward mu) for both distillers."""
    torch.manual_seed(0)
    world, prior = _oracle(["prior.oracle.sharpness=0.1"])
    cams = orbit_cameras(1, 15.0, 1.5, 50.0, 12)
    i = world.index("a large red cube")
    mu = prior.encode(prior.render([i], cams))[0]  # [1, 3, H, W]
    z = mu + 0.3 * torch.randn_like(mu)
    sched = TimestepSchedule([0.2, 0.8], [0.2, 0.8], 1.0, 1)
    n = 64
    zs, text = z.expand(n, -1, -1, -1), torch.full((n,), i)
    cams_n = orbit_cameras(1, 15.0, 1.5, 50.0, 12)
    cams_n = type(cams_n)(*(x.expand(1, n, *x.shape[2:]) for x in (cams_n.c2w, cams_n.fovy, cams_n.elevation,
                           cams_n.azimuth, cams_n.distance)), 12, 12)
    t = torch.randint(200, 800, (n,))
    eps = torch.randn_like(zs)
    t2 = (t + 30).clamp(max=999)
    for name, scale, min_cos in (("sds", 1.0, 0.9), ("asd", 1.0, 0.9), ("sds", 7.5, 0.0), ("asd", 7.5, 0.0)):
        d = SDS(prior, sched, scale) if name == "sds" else ASD(prior, sched, scale)
        g = d.gradient(zs, text, cams_n, t, eps) if name == "sds" else d.gradient(zs, text, cams_n, t, t2, eps)
        mean_g = g.mean(0, keepdim=True)
        cos = torch.nn.functional.cosine_similarity(mean_g.flatten(), (z - mu).flatten(), dim=0)
        # Without guidance the expected gradient is (a positive multiple of) z - mu; with CFG it
        # also pushes away from other classes but still descends toward mu.
        assert cos > min_cos, (name, scale, cos)


class _ScalingPrior(LinearPrior):
    """eps = 0.5 x_t + [conditional] (0.4 x_t + 0.3): guidance changes the spread of x0, not just its mean."""

    def predict_eps(self, x_t, t, text, cameras, guidance=None):
        cond = (~guidance.uncond).float().view(-1, 1, 1, 1)
        self.calls.append(len(x_t))
        return 0.5 * x_t + cond * (0.4 * x_t + 0.3)


def test_sds_x0_reconstruction_with_std_rescale():
    """MVDream's SDS (threestudio's recon_loss): g = z - x0', x0' = r x0_cfg std(x0_c)/std(x0_cfg) + (1 - r) x0_cfg,
    the stds over each object's 4 views; written out here per object."""
    prior = _ScalingPrior()
    sched = TimestepSchedule([0.02, 0.98], [0.02, 0.98], 1.0, 10)
    s, r = 50.0, 0.5
    sds = SDS(prior, sched, guidance_scale=s, x0_recon=True, x0_rescale=r, views=4)
    z = torch.randn(8, 1, 4, 4)
    t = torch.tensor([200] * 4 + [800] * 4)
    eps = torch.randn_like(z)
    cams = orbit_cameras(8, 0.0, 1.5, 50.0, 4)
    g = sds.gradient(z, torch.arange(8), cams, t, eps)
    ab = prior.alphas_cumprod[t].view(-1, 1, 1, 1)
    a, sig = ab.sqrt(), (1 - ab).sqrt()
    x_t = a * z + sig * eps
    e_u = 0.5 * x_t
    e_c = e_u + 0.4 * x_t + 0.3
    e_cfg = e_u + s * (e_c - e_u)
    x0_cfg, x0_c = (x_t - sig * e_cfg) / a, (x_t - sig * e_c) / a
    want = torch.empty_like(z)
    for o in range(2):
        rows = slice(4 * o, 4 * o + 4)
        factor = (x0_c[rows].std() + 1e-8) / (x0_cfg[rows].std() + 1e-8)
        want[rows] = z[rows] - (r * x0_cfg[rows] * factor + (1 - r) * x0_cfg[rows])
    assert torch.allclose(g, want, atol=1e-4, rtol=1e-5)
    assert (x0_c[:4].std() / x0_cfg[:4].std() - 1).abs() > 0.1  # the rescale is not a no-op here
    # r = 0: SDS with w(t) = s_t / a_t
    plain = SDS(prior, sched, guidance_scale=s, x0_recon=True, x0_rescale=0.0, views=4)
    assert torch.allclose(plain.gradient(z, torch.arange(8), cams, t, eps), sig / a * (e_cfg - eps), atol=1e-4)


def test_sds_x0_option_from_config():
    from scalegen.distill import build_distiller

    cfg = load_config(None, ["distill.name=sds", "distill.sds_x0_recon=true", "distill.sds_x0_rescale=0.3",
                             "camera.views_per_prompt=4"])
    d = build_distiller(cfg, LinearPrior())
    assert d.x0_recon and d.x0_rescale == 0.3 and d.views == 4
    import pytest

    from scalegen.errors import ConfigError

    with pytest.raises(ConfigError, match="sds_x0_rescale"):
        load_config(None, ["distill.sds_x0_rescale=1.5"])
