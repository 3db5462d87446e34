"""The learned world (priors/learned.py, train/learned_prior.py, eval/learned.py, eval/clip_train.py): tiny
versions of `scalegen prior train-learned` and `scalegen eval train-clip`, trained in seconds."""
from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

from scalegen.config import load_config
from scalegen.data.cameras import orbit_cameras
from scalegen.errors import ScalegenError

pytest.importorskip("diffusers")
pytestmark = pytest.mark.usefixtures("one_thread")

# A three-prompt world (two seen, one unseen) at 16 px: the bank renders in well under a second.
WORLD = ["world.colors=[red, blue]", "world.shapes=[sphere, cube]", "world.sizes=[small]", "world.n_unseen=1",
         "camera.resolution=16", "prior.oracle.samples=16", "prior.oracle.importance_samples=8", "text.dim=32"]
TINY = ["learned.size=tiny", "learned.views_per_prompt=2", "learned.batch=4", "learned.progress=false",
        "learned.ckpt_every=3"]


def _train(out, steps: int, extra=()):
    from scalegen.train.learned_prior import learned_setup, train_learned

    cfg, opts = learned_setup(None, WORLD + TINY + [f"learned.steps={steps}", *extra])
    return train_learned(cfg, opts, out, log=lambda m: None)


def _unet(out) -> dict:
    return load_file(str(out / "unet" / "diffusion_pytorch_model.safetensors"))


@pytest.fixture(scope="module")
def tiny_prior(tmp_path_factory):
    out = tmp_path_factory.mktemp("learned") / "prior"
    n = torch.get_num_threads()
    torch.set_num_threads(1)  # as the tests (one_thread): bit-exact comparisons need the same thread count
    try:
        _train(out, 6)
    finally:
        torch.set_num_threads(n)
    return out


def test_train_learned_is_a_function_of_its_seed_and_resumes_bit_exactly(tmp_path, tiny_prior):
    _train(tmp_path / "b", 3)  # stopped at step 3 ...
    res = _train(tmp_path / "b", 6)  # ... continued to 6 by the same command
    assert res["trained"] == 3 and res["step"] == 6
    a, b = _unet(tiny_prior), _unet(tmp_path / "b")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    _train(tmp_path / "c", 6, ["learned.seed=1"])
    c = _unet(tmp_path / "c")
    assert any(not torch.equal(a[k], c[k]) for k in a)  # another seed, another model
    with pytest.raises(ScalegenError, match="learned.lr"):  # a changed setting does not continue a run
        _train(tmp_path / "b", 8, ["learned.lr=0.01"])


def _run_cfg(model, *extra):
    return load_config(None, WORLD + ["prior.name=learned", f"prior.model={model}", *extra])


def test_loads_through_from_pretrained_as_prior_name_learned(tiny_prior):
    from scalegen.priors import build_ground_truth, build_prior
    from scalegen.priors.base import Guidance, ddpm_alphas_cumprod
    from scalegen.priors.learned import LearnedPrior

    cfg = _run_cfg(tiny_prior)
    prior = build_prior(cfg)
    assert isinstance(prior, LearnedPrior) and prior.resolution == 16 and prior.latent_channels == 3
    assert prior.ground_truth() is not None and build_ground_truth(cfg) is not None  # its runs have a truth
    assert torch.allclose(prior.alphas_cumprod, ddpm_alphas_cumprod())  # SD's schedule
    rgb = torch.rand(2, 3, 16, 16)
    z = prior.encode(rgb)
    assert torch.allclose(prior.decode(z), rgb, atol=1e-6)
    text = prior.text_embeddings(["a small red sphere", "a small blue cube"])
    x, t = torch.randn(4, 3, 16, 16), torch.tensor([10, 500, 10, 500])
    cams = orbit_cameras(4, 15.0, 1.5, 60.0, 16)
    g = Guidance.branches(2, [False, True], [(0, 1)])
    eps = prior.predict_eps(x, t, torch.cat([text, text]), cams, g)
    assert eps.shape == x.shape and torch.isfinite(eps).all()
    assert not torch.allclose(eps[:2], eps[2:])  # the null condition is another input than the prompt
    with pytest.raises(ScalegenError, match="camera.resolution=16"):
        prior.encode(torch.rand(1, 3, 32, 32))
    with pytest.raises(ScalegenError, match="camera.resolution=16"):
        build_prior(_run_cfg(tiny_prior, "camera.resolution=32"))
    with pytest.raises(ScalegenError, match="another world"):
        build_prior(_run_cfg(tiny_prior, "world.n_unseen=0"))
    with pytest.raises(ScalegenError, match="not a learned prior"):
        build_prior(_run_cfg(tiny_prior / "unet"))


@pytest.mark.parametrize("name", ["sds", "vsd"])
def test_one_distillation_step_on_the_learned_prior(tiny_prior, name):
    """SDS and VSD run unchanged on it; VSD's LoRA sits on the learned UNet itself."""
    from scalegen.distill import build_distiller
    from scalegen.priors import build_prior

    if name == "vsd":
        pytest.importorskip("peft")
    cfg = _run_cfg(tiny_prior, f"distill.name={name}")
    prior = build_prior(cfg)
    distiller = build_distiller(cfg, prior, cond_dim=32)
    if name == "vsd":
        assert any("vsd_phi" in n for n, _ in prior.unet.named_parameters())
    rgb = torch.rand(4, 3, 16, 16, requires_grad=True)
    text = prior.text_embeddings(["a small red sphere", "a small blue cube"]).repeat_interleave(2)
    cams = orbit_cameras(4, 15.0, 1.5, 60.0, 16)
    loss, logs = distiller(prior.encode(rgb), text, cams, 0)
    loss.backward()
    assert torch.isfinite(rgb.grad).all() and rgb.grad.abs().sum() > 0
    frozen = [p for n, p in prior.unet.named_parameters() if "vsd_phi" not in n]
    assert all(p.grad is None for p in frozen)


def test_the_learned_eps_moves_toward_the_exact_one(tmp_path):
    """On a trivially learnable case (three training renders, one per prompt) a hundred steps bring the learned
    conditional eps closer to the exact posterior eps of its training mixture than the untrained UNet's."""
    from scalegen.eval.learned import ExactMixture, eps_error
    from scalegen.priors import build_ground_truth
    from scalegen.priors.learned import LearnedPrior, load_bank

    def err(out):
        prior = LearnedPrior(out)
        bank = load_bank(out)
        z = bank["rgb"] * 2 - 1
        seen = build_ground_truth(_run_cfg(out)).world.splits()["seen"]
        exact = ExactMixture(z, bank["prompt"], len(seen), 0.0, prior.alphas_cumprod)
        return eps_error(prior, exact, z, bank["prompt"], seen, ts=(300,), n=32)[0]["mse_cond"]

    opts = ["learned.views_per_prompt=1", "learned.batch=8", "learned.lr=2e-3", "learned.warmup=10"]
    _train(tmp_path / "p", 1, opts + ["learned.lr=1e-12"])  # a step of nothing: the untrained UNet
    before = err(tmp_path / "p")
    _train(tmp_path / "q", 120, opts)
    after = err(tmp_path / "q")
    assert after < 0.5 * before, (before, after)


def test_score_learned_runs_and_its_ground_truth_row_is_the_ceiling(tiny_prior):
    from scalegen.eval.learned import score_learned

    res = score_learned(tiny_prior, ts=(50, 900), n_eps=8, per_prompt=1, steps=4, ref_views=4, log=lambda m: None)
    assert [r["t"] for r in res["eps"]] == [50, 900]
    assert set(res["samples"]) == {"learned", "exact", "ground_truth"}
    gt = res["samples"]["ground_truth"]["seen"]
    assert gt["iou"] > 0.5 and gt["psnr"] > 15  # fresh renders, scored against other views of the same prompt
    assert 0 <= res["samples"]["learned"]["seen"]["r_at_1"] <= 1


def test_train_clip_writes_a_clip_the_eval_loader_reads(tmp_path):
    pytest.importorskip("transformers")
    from scalegen.eval.clip_models import TransformersClip, load_clip
    from scalegen.eval.clip_train import clip_setup, train_clip

    cfg, opts = clip_setup(None, WORLD + ["clip.size=tiny", "clip.steps=3", "clip.views_per_prompt=2",
                                          "clip.render_resolution=16", "clip.image_size=16", "clip.progress=false"])
    res = train_clip(cfg, opts, tmp_path / "clip", log=lambda m: None)
    assert res["steps"] == 3 and set(res["truth_r_at_1"]) == {"seen", "unseen", "chance"}
    clip = load_clip(str(tmp_path / "clip"))
    assert isinstance(clip, TransformersClip) and clip.image_size == 16
    f = clip.encode_text(["a small red sphere", "a small blue cube"])
    assert f.shape == (2, opts.embed_dim) and torch.allclose(f.norm(dim=-1), torch.ones(2))
    with pytest.raises(ScalegenError):  # a new folder only
        train_clip(cfg, opts, tmp_path / "clip", log=lambda m: None)


# Under-specified prompts with two instances per scene: "a sphere" stands for 2 colours x 2 instances.
MULTI = ["world.kind=compositional", "world.colors=[red, blue]", "world.shapes=[sphere, cube]", "world.sizes=[small]",
         "world.patterns=[plain]", "world.relations=[]", "world.underspecified=true", "world.instances=2",
         "world.unseen_attribute_pairs=0", "world.n_prompts=8", "world.n_eval=0", "camera.resolution=12",
         "prior.oracle.samples=8", "prior.oracle.importance_samples=4", "text.dim=32"]


def test_the_bank_of_a_world_with_completions_samples_each_prompts_mixture():
    """Each bank view of a prompt renders one of its components (completions x instances) drawn uniformly, at that
    view's camera: the pixels are that component's own render, the draws are the prompt's components and no
    other, and an under-specified prompt's views are not all one component."""
    from scalegen.data.cameras import Cameras
    from scalegen.priors import build_ground_truth
    from scalegen.train.learned_prior import render_bank

    cfg = load_config(None, MULTI)
    v = 12
    bank = render_bank(cfg, v, seed=0, log=lambda m: None)
    truth = build_ground_truth(cfg)
    world = truth.world
    seen = world.splits()["seen"]
    assert bank["rgb"].shape == (len(seen) * v, 3, 12, 12) and bank["component"].shape == (len(seen) * v,)
    under = 0
    for p, prompt in enumerate(seen):
        own = set(world.completions([world.index(prompt)])[0])
        drawn = bank["component"][p * v:(p + 1) * v].tolist()
        assert set(drawn) <= own
        if len(own) > 1:
            under += 1
            assert len(set(drawn)) > 1, (prompt, drawn)
    assert under > 0  # the world has under-specified prompts
    for row in (0, 5, len(seen) * v - 1):  # each row is its component's render at its camera
        cam = Cameras(bank["c2w"][row].view(1, 1, 4, 4), bank["fovy"][row].view(1, 1), torch.zeros(1, 1),
                      torch.zeros(1, 1), torch.zeros(1, 1), 12, 12)
        ref = truth.draw([int(bank["component"][row])], cam).rgb.clamp(0, 1)[0]
        assert torch.allclose(bank["rgb"][row], ref, atol=1e-5)
    again = render_bank(cfg, v, seed=0, log=lambda m: None)
    assert torch.equal(again["component"], bank["component"]) and torch.equal(again["rgb"], bank["rgb"])
    other = render_bank(cfg, v, seed=1, log=lambda m: None)
    assert not torch.equal(other["component"], bank["component"])
