"""The compositional oracle world: its grammar and splits, exact mixtures over many components and
under-specified prompts, view buckets and Perp-Neg, scenes with relations, patterns and a front, and
the metrics built on them (best of completions, mode averaging, multi-face)."""
import json
import math
from collections import Counter

import pytest
import torch

from conftest import run_cli
from scalegen.config import load_config
from scalegen.data.cameras import orbit_cameras
from scalegen.data.oracle_grammar import LEVELS, Grammar
from scalegen.errors import ConfigError, DataError
from scalegen.eval.oracle import best_of_completions, marker_fraction, multi_face
from scalegen.priors import build_prior, build_world, mixture_posterior_mean
from scalegen.priors.base import Guidance
from scalegen.priors.oracle_scenes import SceneField, place
from scalegen.render.base import Field
from scalegen.text.bow import BagOfWordsEncoder, tokenize

SMALL = ["world.kind=compositional", "text.word_order=rotary", "prior.oracle.samples=16",
         "prior.oracle.importance_samples=8", "prior.oracle.n_uncond=6"]


def _small_grammar(**kw):
    args = dict(sizes=["small", "large"], colours=["red", "green", "blue"], shapes=["sphere", "cube", "cone"],
                patterns=["plain", "striped"], relations=["on top of", "left of"], fronts=["yellow"],
                underspecified=True, unseen_attribute_pairs=2, unseen_object_pairs=1, unseen_relation_uses=1,
                max_completions=12, seed=3)
    args.update(kw)
    return Grammar(**args)


# --- the exact mixture posterior -----------------------------------------------------------------
def test_masked_posterior_with_many_components_matches_monte_carlo():
    """E[x0|x_t] over 40 components, a ragged subset kept per row, by self-normalised importance
    sampling from the kept mixture."""
    torch.manual_seed(0)
    mu = torch.randn(40, 3) * 1.5
    s, a, s_t = 0.3, torch.tensor(0.8), torch.tensor(0.6)
    keep = [torch.arange(40), torch.arange(0, 40, 3), torch.tensor([5, 6, 7])]
    mask = torch.zeros(3, 40, dtype=torch.bool)
    for i, k in enumerate(keep):
        mask[i, k] = True
    x_t = torch.randn(3, 3)
    exact = mixture_posterior_mean(x_t, a.expand(3), s_t.expand(3), mu.expand(3, -1, -1), s, mask)
    for i, k in enumerate(keep):
        n = 400_000
        x0 = mu[k][torch.randint(0, len(k), (n,))] + s * torch.randn(n, 3)
        w = torch.softmax(-((x_t[i] - a * x0) ** 2).sum(-1) / (2 * s_t**2), 0)
        mc = (w[:, None] * x0).sum(0)
        assert torch.allclose(mc, exact[i], atol=0.02), (i, mc, exact[i])
        # ... and equal to the unmasked formula on the kept components alone
        alone = mixture_posterior_mean(x_t[i:i + 1], a[None], s_t[None], mu[k][None], s)[0]
        assert torch.allclose(alone, exact[i], atol=1e-5)


def _prior(extra=(), grammar=()):
    cfg = load_config(None, [*SMALL, "world.colors=[red, green, blue]", "world.shapes=[sphere, cube]",
                             "world.sizes=[small, large]", "world.patterns=[plain]", "world.relations=[]",
                             "world.unseen_attribute_pairs=0", *grammar, *extra])
    world = build_world(cfg)
    return world, build_prior(cfg, world)


@pytest.mark.parametrize("prompt, n_comp", [("a cube", 6), ("a small red object", 2), ("a large green sphere", 1)])
def test_conditional_is_the_exact_mixture_over_completions(prompt, n_comp):
    """The prior's eps for an under-specified prompt (and for a fully specified one with K = 2 instances)
    is Tweedie's -s_t grad log p(x_t) of the mixture over ALL its completions x instances, rendered at
    the row's camera: no completion dropped, none added."""
    world, prior = _prior(grammar=["world.underspecified=true", "world.instances=2"])
    i = world.index(prompt)
    comps = world.completions([i])[0]
    assert len(comps) == n_comp * 2
    cams = orbit_cameras(1, 20.0, 1.4, 50.0, 8)
    mu = prior.encode(prior.render_components(comps, cams))[:, 0].flatten(1)  # [K, D]
    t = torch.tensor([400])
    ab = prior.alphas_cumprod[t]
    a, s_t, s = ab.sqrt(), (1 - ab).sqrt(), prior.s
    torch.manual_seed(1)
    x = (a * mu[1] + s_t * torch.randn_like(mu[1])).requires_grad_()
    logp = torch.logsumexp(-((x - a * mu) ** 2).sum(-1) / (2 * (a**2 * s**2 + s_t**2)), 0)
    (grad,) = torch.autograd.grad(logp, x)
    eps = prior.predict_eps(x.detach().view(1, 3, 8, 8), t, torch.tensor([i]), cams)
    assert torch.allclose(eps.flatten(), -s_t * grad, atol=1e-4)


def test_unconditional_holds_every_own_component_and_stays_small():
    world, prior = _prior(grammar=["world.underspecified=true"])
    ids = [world.index("a cube"), world.index("a small red sphere")]
    own = torch.tensor([c for cl in world.completions(ids) for c in cl])
    u = prior.uncond_set(own)
    assert set(own.tolist()) <= set(u.tolist()) and len(u) == max(prior.n_uncond, len(set(own.tolist())))


# --- grammar, counts, splits ----------------------------------------------------------------------
def test_grammar_counts_match_enumeration():
    g = _small_grammar()
    brute = Counter()
    for i in range(g.n_prompts):
        spec = g.decode(i)
        if g.accepts(spec):
            brute[g.level(spec) or "none"] += 1
    counts = g.counts()
    assert {k: v for k, v in counts.items() if v} == dict(brute)
    assert all(counts[lvl] > 0 for lvl in LEVELS)


def test_compose_world_has_100k_training_prompts_and_disjoint_held_out_levels():
    cfg = load_config("configs/oracle/world_compose.yaml")
    g = build_world(cfg).grammar
    counts = g.counts()
    assert counts["train"] >= 100_000
    train = g.sample("train", 5000, seed=1)
    held = {lvl: g.sample(lvl, 300, seed=1) for lvl in LEVELS}
    assert len(set(train)) == 5000
    for lvl, ps in held.items():
        assert not set(ps) & set(train), lvl
        assert all(g.level(g.parse(p)) == lvl for p in ps)
        for other in LEVELS:
            if other != lvl:
                assert not set(ps) & set(held[other])
    train_words = {w for p in train for w in tokenize(p)}
    assert g.words() <= train_words  # every word is trained on
    for lvl, ps in held.items():
        assert {w for p in ps for w in tokenize(p)} <= train_words, lvl
    # the held-out features really are absent from training
    n_rel = 0
    for p in train:
        spec = g.parse(p)
        assert all((o.colour, o.shape) not in g.held_attribute for o in spec.objects)
        if spec.relation is not None:
            n_rel += 1
            a, b = spec.objects[0].shape, spec.objects[1].shape
            assert frozenset((a, b)) not in g.held_object_pair, p
            assert (a, spec.relation) not in g.held_relation, p
    assert n_rel > 1000  # the two-object scenes are most of the grammar
    # ... and each level's prompts carry their held-out feature
    for p in held["unseen_relation"]:
        spec = g.parse(p)
        assert (spec.objects[0].shape, spec.relation) in g.held_relation, p
    for p in held["unseen_object_pair"]:
        spec = g.parse(p)
        assert frozenset((spec.objects[0].shape, spec.objects[1].shape)) in g.held_object_pair, p


def test_parse_is_wording_insensitive_and_errors_say_why():
    g = _small_grammar()
    spec = g.parse("A small red STRIPED cube, on top of a large blue sphere!")
    assert spec.prompt == "a small red striped cube on top of a large blue sphere"
    assert g.parse("a cube with a yellow front").objects[0].front == "yellow"
    assert len(g.completions(g.parse("a cube with a yellow front"))) == 2 * 3  # sizes x (colours, none yellow)
    for bad, why in [("a red dragon", "not a shape"), ("a small red cube left of a cube on top of a cone", "2 relations"),
                     ("a large red cube with a red front", "world.fronts"),
                     ("an object on top of an object", "completions open")]:
        with pytest.raises(DataError, match=why):
            g.parse(bad)


def test_compose_cli_writes_100k_prompts_the_prior_accepts(tmp_path):
    out = tmp_path / "oracle100k.json"
    r = run_cli("data", "compose", "--world", "oracle", "--config", "configs/oracle/world_compose.yaml", "--n",
                "100000", "--n-val", "64", "--out", out)
    assert r.returncode == 0, r.stderr[-2000:]
    corpus = json.loads(out.read_text())
    assert len(corpus["train"]) == len(set(corpus["train"])) == 100_000
    world = build_world(load_config("configs/oracle/world_compose.yaml"))
    for p in corpus["train"][::97] + corpus["val"]:
        world.grammar.parse(p)  # accepted (raises otherwise)
    assert not set(corpus["val"]) & set(corpus["train"])
    assert json.loads(out.with_suffix(".world.json").read_text())["world"]["kind"] == "compositional"
    r = run_cli("data", "compose", "--world", "oracle", "--n", "10000000", "--out", tmp_path / "big.json")
    assert r.returncode == 2 and "ask for at most" in r.stderr and "Traceback" not in r.stderr


def test_config_guards_of_the_new_worlds():
    with pytest.raises(ConfigError, match="word_order=rotary"):
        load_config(None, ["world.kind=compositional"])
    with pytest.raises(ConfigError, match="view_prompts needs"):
        load_config(None, ["prior.oracle.view_prompts=true"])
    with pytest.raises(ConfigError, match="needs prior.oracle.view_prompts"):
        load_config(None, ["prior.perp_neg=0.5", "prior.oracle.mode=view_agnostic"])
    with pytest.raises(DataError, match="set text.max_tokens=18"):  # fronts + two-tone on both objects: 18 words
        build_world(load_config("configs/oracle/world_compose.yaml", ["world.fronts=[white]"]))


def test_rotary_bag_of_words_tells_the_order_apart():
    bag, rot = BagOfWordsEncoder(32), BagOfWordsEncoder(32, word_order="rotary")
    a, b = "a red cube on top of a blue sphere", "a blue cube on top of a red sphere"
    assert torch.allclose(bag.encode([a]).pooled, bag.encode([b]).pooled, atol=1e-6)
    assert (rot.encode([a]).pooled - rot.encode([b]).pooled).norm() > 0.3
    assert bag.id != rot.id  # shards of one are never read as the other
    assert torch.allclose(rot.encode([a]).tokens.norm(dim=-1), bag.encode([a]).tokens.norm(dim=-1), atol=1e-5)


# --- scenes -------------------------------------------------------------------------------------
def test_relations_place_objects_and_patterns_vary_the_colour():
    g = _small_grammar(underspecified=False)
    left = place(g.parse("a small red cube left of a large blue sphere"))
    assert left[0].centre[1] < left[1].centre[1]  # left as the front camera (+x) sees it is -y
    top = place(g.parse("a small red cube on top of a large blue sphere"))
    assert top[0].centre[2] > top[1].centre[2]
    field = SceneField([top, place(g.parse("a small red striped cube"))])
    assert field.constant_rgb() is None
    pts = torch.stack([torch.zeros(200), torch.zeros(200), torch.linspace(-0.3, 0.3, 200)], -1)[None]
    sdf, rgb = field.query(pts)
    inside = sdf[1] < 0
    assert len(rgb[1][inside].unique(dim=0)) == 2  # stripes: the colour and its shade
    assert SceneField([place(g.parse("a small red cube"))]).constant_rgb() is not None


def _front_world(extra=()):
    cfg = load_config("configs/oracle/world_front.yaml", [*SMALL, *extra])
    world = build_world(cfg)
    return cfg, world, build_prior(cfg, world)


class _BothSides(Field):
    """A field with its marker painted on the back as well: a two-faced object."""

    def __init__(self, inner: SceneField):
        self.inner, self.n_prompts = inner, inner.n_prompts

    def query(self, points):
        sdf, rgb = self.inner.query(points)
        mirrored = points * torch.tensor([-1.0, 1.0, 1.0])
        _, rgb_m = self.inner.query(mirrored)  # the marker side's colours, seen from behind
        back = (points.expand(len(rgb), -1, -1)[..., 0] < 0)[..., None]
        return sdf, torch.where(back, rgb_m, rgb)


def test_multi_face_is_zero_on_ground_truth_and_positive_on_a_two_faced_object():
    cfg, world, prior = _front_world()
    prompt = "a large blue cylinder with a yellow front"
    comp = world.completions([world.index(prompt)])[0]
    cams = orbit_cameras(8, 15.0, 1.5, 60.0, 24)
    gt = prior.renderer(world.component_field(comp), cams, background=world.background, perturb=False)
    marker, body = world.marker_of(prompt)
    gt_frac = marker_fraction(gt.rgb, gt.opacity, marker, body)
    assert gt_frac[[3, 4]].min() > 0.2 and gt_frac[[0, 7]].max() == 0  # front views show it, back views do not
    assert multi_face(gt_frac, gt_frac) == (0, 2)
    two = prior.renderer(_BothSides(world.component_field(comp)), cams, background=world.background, perturb=False)
    got, views = multi_face(marker_fraction(two.rgb, two.opacity, marker, body), gt_frac)
    assert views == 2 and got / views > 0


def test_best_of_completions_picks_the_nearest_and_mean_is_what_averaging_gives():
    torch.manual_seed(0)
    gts = torch.rand(5, 4, 3, 8, 8)
    pred = gts[3] + 0.05 * torch.randn_like(gts[3])
    assert int(best_of_completions(pred, gts)) == 3
    # one completion for the whole object: view 0 slightly nearer completion 1, the other views much nearer 2
    pred = torch.cat([gts[1, :1] + 0.01, gts[2, 1:]])
    assert int(best_of_completions(pred, gts)) == 2
    from scalegen.render.images import psnr

    mean = gts.mean(0)
    assert psnr(mean, mean).mean() > max(psnr(g, mean).mean() for g in gts)  # averaging scores best vs the mean


# --- view buckets and Perp-Neg in the oracle world --------------------------------------------
def test_view_prompts_condition_on_the_view_bucket():
    _, world, prior = _front_world(["prior.oracle.view_prompts=true"])
    i = world.index("a large blue cylinder with a yellow front")
    # orbit_cameras puts its one view at azimuth offset - 180: the back view at offset 0, the front at 180
    back, front = orbit_cameras(1, 15.0, 1.3, 55.0, 8, azimuth_offset=0.0), orbit_cameras(1, 15.0, 1.3, 55.0, 8, azimuth_offset=180.0)
    fixed = prior._fixed_of(torch.tensor(world.completions([i])[0]), 8, 8)[0]  # [V, D]
    buckets = prior.fixed_buckets()
    t = torch.tensor([500])
    x = torch.randn(1, 3, 8, 8)
    ab = prior.alphas_cumprod[t]
    for cams, b in ((back, 2), (front, 0)):
        keep = fixed[buckets == b]
        x0 = mixture_posterior_mean(x.flatten(1), ab.sqrt(), (1 - ab).sqrt(), keep[None], prior.s)
        want = (x.flatten(1) - ab.sqrt() * x0) / (1 - ab).sqrt()
        assert torch.allclose(prior.predict_eps(x, t, torch.tensor([i]), cams).flatten(1), want, atol=1e-5)
    prior.view_prompts = False  # the plain view-agnostic oracle ignores the camera
    assert torch.allclose(prior.predict_eps(x, t, torch.tensor([i]), back), prior.predict_eps(x, t, torch.tensor([i]), front))


def test_perp_neg_applies_to_declared_pairs_only():
    _, world, prior = _front_world(["prior.oracle.view_prompts=true", "prior.perp_neg=0.5"])
    i = world.index("a large green cube with a white front")
    cams = orbit_cameras(1, 15.0, 1.3, 55.0, 8, azimuth_offset=40.0)  # azimuth -140: between side and back
    x = torch.randn(1, 3, 8, 8)
    t = torch.tensor([600])
    text = torch.tensor([i, i, i])
    rows = cams
    three = type(rows)(rows.c2w.expand(1, 3, 4, 4), rows.fovy.expand(1, 3), rows.elevation.expand(1, 3),
                       rows.azimuth.expand(1, 3), rows.distance.expand(1, 3), 8, 8)
    g = Guidance(torch.tensor([False, True, False]), torch.tensor([[0, 1]]))
    eps = prior.predict_eps(x.expand(3, -1, -1, -1), t.expand(3), text, three, g)
    assert not torch.allclose(eps[0], eps[2])  # the paired conditional row got Perp-Neg's correction
    plain = prior.predict_eps(x, t, torch.tensor([i]), cams)
    assert torch.allclose(eps[2], plain[0], atol=1e-6)  # the unpaired one is the plain positive
    # the formula, from bucket-conditioned eps: eps_pos + sum_k w_k perp(eps_neg_k - eps_u, eps_pos - eps_u)
    from scalegen.priors.views import perp_neg_plan, perpendicular

    fixed = prior._fixed_of(torch.tensor(world.completions([i])[0]), 8, 8)[0]
    buckets = prior.fixed_buckets()
    ab = prior.alphas_cumprod[t]

    def eps_bucket(b):
        x0 = mixture_posterior_mean(x.flatten(1), ab.sqrt(), (1 - ab).sqrt(), fixed[buckets == b][None], prior.s)
        return ((x.flatten(1) - ab.sqrt() * x0) / (1 - ab).sqrt()).view(1, 3, 8, 8)

    mix, neg_views, neg_w = perp_neg_plan(cams.azimuth[0], cams.elevation[0], 60.0, 0.5)
    pos = sum(mix[0, b] * eps_bucket(b) for b in range(3) if mix[0, b] > 0)
    assert torch.allclose(eps[2:], pos, atol=1e-5)
    e_u = eps[1:2]
    want = pos + sum(neg_w[0, k] * perpendicular(eps_bucket(int(neg_views[0, k])) - e_u, pos - e_u) for k in range(2))
    assert torch.allclose(eps[:1], want, atol=1e-5)
    assert math.isfinite(float(eps.sum()))


def test_diversity_over_z_only_for_generators_that_take_one():
    from scalegen.eval.oracle import evaluate_oracle, pairwise_rmse
    from scalegen.train.model import build_model

    assert pairwise_rmse(torch.zeros(3, 12)) == 0.0
    assert abs(pairwise_rmse(torch.stack([torch.zeros(12), torch.full((12,), 0.5)])) - 0.5) < 1e-6
    tiny = ["camera.eval_resolution=8", "camera.eval_views=2", "eval.samples=8", "eval.importance_samples=4",
            "prior.oracle.samples=8", "prior.oracle.importance_samples=4", "text.dim=32"]
    for gen, has in ((["generator.name=conv3d", "generator.preset=small"], True), ([], False)):
        cfg = load_config("configs/oracle/world_multimodal.yaml", [*SMALL, *tiny, *gen])
        world = build_world(cfg)
        te, model = build_model(cfg)
        res = evaluate_oracle(cfg, model, te, world, splits={"under": ["a cube"]})["under"]
        assert ("diversity" in res) == has and res["n_multimodal"] == 1
        assert "r_at_1" not in res  # R@1 is the default world's: a compositional gallery would be the whole grammar
        assert res["psnr_mean_gt"] > 0
        if has:
            assert res["diversity"] > 0 and res["diversity_gt"] > 0
