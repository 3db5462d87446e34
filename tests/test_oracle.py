"""The oracle prior's posterior is exact; the world's split measures amortization honestly."""
import math

import pytest
import torch

from scalegen.config import load_config
from scalegen.data.cameras import Cameras, orbit_cameras
from scalegen.priors import build_prior, build_world, mixture_posterior_mean
from scalegen.priors.base import Guidance
from scalegen.priors.oracle_world import OracleWorld


def test_posterior_mean_matches_monte_carlo():
    """E[x0|x_t] by self-normalised importance sampling over draws from the prior mixture."""
    torch.manual_seed(0)
    mu = torch.tensor([[1.0, -0.5], [-1.0, 0.3], [0.2, 1.2]])  # K=3 components in D=2
    s, a, s_t = 0.4, torch.tensor(0.7), torch.tensor(0.714)
    x_t = torch.tensor([[0.3, 0.1], [-0.9, 0.4], [0.5, 0.9]])
    n = 400_000
    k = torch.randint(0, 3, (n,))
    x0 = mu[k] + s * torch.randn(n, 2)
    for x in x_t:
        logw = -((x - a * x0) ** 2).sum(-1) / (2 * s_t**2)
        w = torch.softmax(logw, 0)
        mc = (w[:, None] * x0).sum(0)
        exact = mixture_posterior_mean(x[None], a[None], s_t[None], mu[None], s)[0]
        assert torch.allclose(mc, exact, atol=0.01), (mc, exact)


def test_eps_is_tweedie_score():
    """eps(x_t) = -s_t * grad log p(x_t) for the noised mixture p(x_t) = mean_k N(a mu_k, D I)."""
    torch.manual_seed(1)
    mu = torch.randn(4, 6)
    s, a, s_t = 0.3, torch.tensor(0.6), torch.tensor(0.8)
    var = a**2 * s**2 + s_t**2
    x = torch.randn(6, requires_grad=True)
    logp = torch.logsumexp(-((x - a * mu) ** 2).sum(-1) / (2 * var), 0)
    (grad,) = torch.autograd.grad(logp, x)
    x0 = mixture_posterior_mean(x.detach()[None], a[None], s_t[None], mu[None], s)[0]
    eps = (x.detach() - a * x0) / s_t
    assert torch.allclose(eps, -s_t * grad, atol=1e-5)


def test_world_split_keeps_every_attribute_seen():
    w = OracleWorld(["red", "green", "blue", "yellow"], ["sphere", "cube", "cone"], ["small", "large"], n_unseen=5)
    assert len(w.unseen) == 5 and len(w.seen) == 24 - 5 and not set(w.seen) & set(w.unseen)
    seen_words = {x for p in w.seen for x in p.split()}
    for attr in w.colors + w.shapes + w.sizes:
        assert attr in seen_words
    assert w.index("A large RED cone!") == w.prompts.index("a large red cone")
    with pytest.raises(Exception, match="not in the oracle world"):
        w.index("a red dragon")


def test_ground_truth_renders_show_the_prompt():
    cfg = load_config(None, ["world.colors=[red, blue]", "world.shapes=[sphere, cube]", "world.n_unseen=0"])
    world = build_world(cfg)
    prior = build_prior(cfg, world)
    cams = orbit_cameras(2, 15.0, 1.5, 50.0, 24)
    ids = [world.index("a large red cube"), world.index("a small blue sphere")]
    img = prior.render(ids, cams)  # [2, V, 3, H, W]
    centre = img[:, :, :, 12, 12]
    assert torch.allclose(centre[0], torch.tensor([0.85, 0.18, 0.15]).expand(2, 3), atol=0.02)
    assert torch.allclose(centre[1], torch.tensor([0.18, 0.30, 0.85]).expand(2, 3), atol=0.02)
    corner = img[:, :, :, 0, 0]
    assert (corner.std(-1) < 1e-3).all()  # neutral backdrop


def test_scenes_that_differ_in_colour_share_one_geometry_render_to_the_last_bit():
    """GroundTruth.draw renders each (shape, size) once and composes the colours: the same pixels,
    opacity and depth as rendering every scene on its own."""
    cfg = load_config(None, [])
    world = build_world(cfg)
    truth = build_prior(cfg, world).ground_truth()
    cams = orbit_cameras(3, 20.0, 1.3, 55.0, 16)
    ids = [world.index(p) for p in ("a large red cube", "a small blue sphere", "a large green cube",
                                    "a small red sphere", "a large blue torus", "a large yellow cube")]
    field = world.component_field(ids)
    assert field.distinct_geometry()[0].n_prompts == 3
    got = truth.draw(ids, cams)
    want = truth.renderer(field, cams.expand(len(ids)), background=world.background,
                          **truth.renderer.eval_options())
    for name in ("rgb", "opacity", "depth"):
        assert torch.equal(getattr(got, name), getattr(want, name)), name
    assert world.component_field(ids[:2]).distinct_geometry() is None  # nothing shared: rendered as before
    # each scene at its own cameras [K, V] (the learned prior's training bank): rendered scene by scene
    own = Cameras(*(t.expand(len(ids), *t.shape[1:]).clone() for t in (cams.c2w, cams.fovy, cams.elevation,
                                                                        cams.azimuth, cams.distance)),
                  cams.height, cams.width)
    assert torch.equal(truth.draw(ids, own).rgb, want.rgb)


def _tiny_prior(extra=()):
    cfg = load_config(None, ["world.colors=[red, green, blue]", "world.shapes=[sphere, cube, torus]",
                             "world.sizes=[large]", "world.n_unseen=0", "prior.oracle.n_uncond=4",
                             "prior.oracle.samples=24", "prior.oracle.importance_samples=8", *extra])
    world = build_world(cfg)
    return world, build_prior(cfg, world)


def test_conditional_pulls_toward_own_render_unconditional_sees_classes():
    world, prior = _tiny_prior(["prior.oracle.sharpness=0.05"])
    cams = orbit_cameras(1, 15.0, 1.5, 50.0, 16)
    own, other = world.index("a large red torus"), world.index("a large blue cube")
    mu = prior.encode(prior.render([own, other], cams))[:, 0]  # [2, 3, H, W]
    t = torch.tensor([300])
    ab = prior.alphas_cumprod[t]
    eps = torch.randn(1, 3, 16, 16)
    # Noisy version of the OTHER prompt's render, conditioned on OWN: x0 estimate moves to own.
    x_t = ab.sqrt() * mu[1:2] + (1 - ab).sqrt() * eps
    text = torch.tensor([own])
    e_c = prior.predict_eps(x_t, t, text, cams)
    x0_c = (x_t - (1 - ab).sqrt() * e_c) / ab.sqrt()
    assert (x0_c - mu[0:1]).norm() < (x0_c - mu[1:2]).norm()
    # Unconditionally the same x_t is explained by the other class (it is in the mixture).
    prior.n_uncond = 3
    e_u = prior.predict_eps(x_t, t, text, cams, Guidance(torch.tensor([True]), torch.zeros(0, 2, dtype=torch.long)))
    x0_u = (x_t - (1 - ab).sqrt() * e_u) / ab.sqrt()
    assert (x0_u - mu[1:2]).norm() < 0.5 * (x0_u - mu[0:1]).norm()


def test_uncond_set_always_holds_own_prompt():
    world, prior = _tiny_prior()
    prior.n_uncond = 2
    for _ in range(20):
        own = torch.randint(0, len(world.prompts), (1,))
        s = prior.uncond_set(own)
        assert own.item() in s.tolist() and len(s) == 2


def test_view_agnostic_mode_is_symmetric_in_views():
    world, prior = _tiny_prior(["prior.oracle.mode=view_agnostic", "prior.oracle.n_fixed_views=4"])
    cams = orbit_cameras(2, 15.0, 1.5, 50.0, 16)
    x = torch.randn(2, 3, 16, 16)
    t = torch.tensor([500, 500])
    text = torch.tensor([0, 0])
    e1 = prior.predict_eps(x, t, text, cams)
    cams_b = orbit_cameras(2, 40.0, 1.2, 40.0, 16)
    e2 = prior.predict_eps(x, t, text, cams_b)
    assert torch.allclose(e1, e2)  # it never looks at the camera
    assert not math.isnan(e1.sum().item())
