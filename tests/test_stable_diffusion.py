"""The Stable Diffusion prior, with a tiny random SD written by `scalegen prior make-tiny` and
loaded through the same from_pretrained calls real weights take."""
import json
import math
from pathlib import Path

import pytest
import torch

from scalegen.data.cameras import make_cameras
from scalegen.errors import WeightsError
from scalegen.priors.base import Guidance
from scalegen.text.base import VIEWS, view_prompt

pytest.importorskip("diffusers")
pytest.importorskip("transformers")
pytest.importorskip("open_clip")

ROOT = Path(__file__).resolve().parents[1]
SD_CONFIG = str(ROOT / "configs" / "sd" / "hyper_ingp_asd_mg15.yaml")
# CPU-sized overrides of the real SD config (everything else, e.g. ASD + Perp-Neg, stays as configured).
SD_TINY = [
    "train.logger=none", "train.progress=false", "train.threads=1", "camera.resolution=16",
    "camera.eval_resolution=16", "render.samples=12", "render.importance_samples=8", "render.eikonal_points=256",
    "eval.samples=12", "eval.importance_samples=8", "generator.hash_levels=4", "generator.hash_log2_size=12",
    "generator.hash_max_resolution=64", "generator.mlp_hidden=16", "generator.hyper_hidden=16",
    "prior.encode_resolution=64", "prior.latent_resolution=8",
]


@pytest.fixture(scope="module")
def tiny_sd(tmp_path_factory):
    """Made by the CLI command users run (`scalegen prior make-tiny --out DIR`)."""
    from scalegen.cli import main

    out = tmp_path_factory.mktemp("sd") / "tiny-sd"
    assert main(["prior", "make-tiny", "--out", str(out)]) == 0
    return str(out)


@pytest.fixture(scope="module")
def encoder(tiny_sd):
    from scalegen.text.clip import CLIPTextEncoder

    return CLIPTextEncoder(tiny_sd)


def _prior(tiny_sd, encoder, **kw):
    from scalegen.priors.stable_diffusion import StableDiffusionPrior

    return StableDiffusionPrior(tiny_sd, text_encoder=encoder, **kw)


def _cams(az, el):
    n = len(az)
    t = lambda v: torch.tensor(v, dtype=torch.float32).view(1, n)  # noqa: E731
    return make_cameras(t(el), t(az), t([1.2] * n), t([50.0] * n), 16, 16)


def _direct_unet(prior, x, t, emb):
    """The UNet on each row alone (no batching, no prior logic)."""
    out = [prior.unet(x[i:i + 1], t[i:i + 1], encoder_hidden_states=emb[i:i + 1].to(prior.dtype)).sample
           for i in range(len(x))]
    return torch.cat(out).float()


# ---------------------------------------------------------------------------------------------


def test_tiny_sd_loads_from_disk_in_the_real_layout(tiny_sd, encoder):
    from diffusers import StableDiffusionPipeline

    from scalegen.priors.base import ddpm_alphas_cumprod

    index = json.loads(open(f"{tiny_sd}/model_index.json").read())
    assert index["unet"] == ["diffusers", "UNet2DConditionModel"] and index["vae"] == ["diffusers", "AutoencoderKL"]
    # The folder is a valid diffusers Stable Diffusion pipeline (what users download).
    pipe = StableDiffusionPipeline.from_pretrained(tiny_sd, safety_checker=None)
    assert pipe.unet.config.cross_attention_dim == pipe.text_encoder.config.hidden_size == 32
    prior = _prior(tiny_sd, encoder)
    assert prior.text_encoder is encoder  # one CLIP tower for the generator and the UNet
    # SD 2.1's DDPM schedule, read from the folder's scheduler config.
    assert torch.allclose(prior.alphas_cumprod, ddpm_alphas_cumprod(), atol=1e-6)
    assert prior.scaling == pytest.approx(0.18215)
    for module in (prior.unet, prior.vae):
        assert not module.training and not any(p.requires_grad for p in module.parameters())
    z = prior.encode(torch.rand(2, 3, 16, 16))
    assert z.shape == (2, 4, 64, 64)  # 16 -> 512 (bilinear) -> VAE (8x) -> 64x64 latents
    assert prior.decode(z).shape == (2, 3, 512, 512)


def test_missing_weights_say_where_to_put_them(tmp_path, monkeypatch, small_corpus, capsys):
    """A hub id that is not in the local cache fails at once with the command that fetches it: no
    network attempt (which would retry for a minute on a machine without network)."""
    import socket

    from scalegen.cli import main
    from scalegen.priors.stable_diffusion import StableDiffusionPrior

    connects = []
    monkeypatch.setattr(socket.socket, "connect", lambda self, *a: connects.append(a) or (_ for _ in ()).throw(
        OSError("no network in this test")))
    monkeypatch.setenv("HF_HOME", str(tmp_path / "empty-hf-home"))  # an empty local cache
    with pytest.raises(WeightsError, match="neither a local folder nor in the local Hugging Face cache") as e:
        StableDiffusionPrior("someone/not-a-downloaded-model")
    assert "prior.model" in str(e.value) and "huggingface-cli download someone/not-a-downloaded-model" in str(e.value)
    with pytest.raises(WeightsError, match="has no unet/, vae/, scheduler/ folder"):
        StableDiffusionPrior(str(tmp_path))
    # Through the CLI, with text.model left to follow prior.model: one line, no traceback, exit 2.
    rc = main(["train", "--config", SD_CONFIG, "--out", str(tmp_path / "run"),
               "prior.model=someone/not-a-downloaded-model", f"data.prompts={small_corpus}", *SD_TINY])
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert rc == 2 and len(errors) == 1 and "huggingface-cli download" in errors[0] and "Traceback" not in err
    assert connects == []  # nothing tried the network


@pytest.mark.parametrize("az,el,view", [
    (0, 0, "front"), (29, 10, "front"), (-29, 10, "front"), (31, 0, "side"), (-31, 0, "side"),
    (90, 0, "side"), (-90, 30, "side"), (149, 0, "side"), (151, 0, "back"), (-151, 0, "back"),
    (180, 45, "back"), (-180, 0, "back"), (370, 0, "front"), (-190, 0, "back"), (200, 0, "back"), (210, 0, "side"),
    (0, 59, "front"), (0, 61, "overhead"), (180, 61, "overhead"), (90, 89, "overhead"),
])
def test_view_chosen_by_azimuth_and_elevation(az, el, view):
    """threestudio's rule (front 30, back 30, overhead 60; azimuth 0 = +x, counter-clockwise)."""
    from scalegen.priors.stable_diffusion import view_index

    assert VIEWS[int(view_index(torch.tensor([float(az)]), torch.tensor([float(el)]))[0])] == view


def test_view_dependent_embeddings_and_cfg_against_direct_unet(tiny_sd, encoder):
    prior = _prior(tiny_sd, encoder)
    _amplify_text(prior)
    prompt = "a DSLR photo of a hamburger"
    ids = prior.text_embeddings([prompt] * 4)
    az, el = [0.0, 90.0, 180.0, 20.0], [10.0, 0.0, 5.0, 70.0]
    views = ["front", "side", "back", "overhead"]
    x = torch.randn(4, 4, 8, 8)
    t = torch.tensor([100, 400, 700, 950])
    eps = prior.predict_eps(torch.cat([x, x]), torch.cat([t, t]), torch.cat([ids, ids]), _cams(az + az, el + el),
                            Guidance.branches(4, [False, True], [(0, 1)]))
    cond_emb = encoder.encode([view_prompt(prompt, v) for v in views]).tokens
    unc_emb = encoder.encode([""]).tokens.expand(4, -1, -1)
    with torch.no_grad():
        e_c, e_u = _direct_unet(prior, x, t, cond_emb), _direct_unet(prior, x, t, unc_emb)
    assert (eps[:4] - e_c).norm() < 1e-4 * e_c.norm() and (eps[4:] - e_u).norm() < 1e-4 * e_u.norm()
    with torch.no_grad():  # a wrong view's prompt would be far outside that tolerance
        wrong = _direct_unet(prior, x, t, cond_emb[[1, 2, 3, 0]])
    assert (wrong - e_c).norm() > 1e-2 * e_c.norm()
    from scalegen.distill.common import cfg_combine

    s = 7.5
    assert torch.allclose(cfg_combine(eps[4:], eps[:4], s), e_u + s * (e_c - e_u), atol=1e-3)


def _amplify_text(prior, gain=50.0):
    """A random tiny UNet barely listens to its text; scale its cross-attention outputs so that
    prompts change eps by O(1) and a wrong Perp-Neg term cannot hide in the tolerance."""
    with torch.no_grad():
        for name, m in prior.unet.named_modules():
            if name.endswith("attn2"):
                m.to_out[0].weight.mul_(gain)


def _f(abc, r):
    a, b, c = abc
    return a * math.exp(-b * r) + c


def test_perp_neg_against_direct_computation(tiny_sd, encoder):
    """eps_u + s (eps_c' - eps_u) equals Perp-Neg guidance computed from separate UNet calls, with
    the reference weights (threestudio/ScaleDreamer) written out here independently."""
    scale_pn, s = 0.5, 7.5
    prior = _prior(tiny_sd, encoder, perp_neg=scale_pn)
    _amplify_text(prior)
    calls = []
    hook = prior.unet.register_forward_hook(lambda m, a, k: calls.append(a[0].shape[0]))
    prompt = "a blue motorcycle"
    az, el = [0.0, 45.0, -80.0, 100.0, 170.0, 120.0], [0.0, 10.0, 20.0, -5.0, 30.0, 75.0]
    n = len(az)
    ids = prior.text_embeddings([prompt] * n)
    x = torch.randn(n, 4, 8, 8)
    t = torch.randint(20, 980, (n,))
    eps = prior.predict_eps(torch.cat([x, x]), torch.cat([t, t]), torch.cat([ids, ids]), _cams(az + az, el + el),
                            Guidance.branches(n, [False, True], [(0, 1)]))
    hook.remove()
    assert calls == [2 * n + 2 * (n - 1)]  # one UNet call: cond, uncond, 2 negatives per non-overhead row
    e_c_prime, e_u_prior = eps[:n], eps[n:]

    emb = {v: encoder.encode([view_prompt(prompt, v)]).tokens[0] for v in VIEWS}
    unc = encoder.encode([""]).tokens[0]
    F_FS, F_SF, F_SB, F_FSB = (4, 0.5, -2.426), (4, 0.5, -2.426), (1, 0.5, -0.606), (1, 0.5, 0.967)
    for i in range(n):
        a = abs(az[i])
        if el[i] > 60:
            pos, negs = emb["overhead"], []
        elif a < 90:
            r = 1 - a / 90
            pos = r * emb["front"] + (1 - r) * emb["side"]
            negs = [(emb["front"], -scale_pn * _f(F_FS, r)), (emb["side"], -scale_pn * _f(F_SF, 1 - r))]
        else:
            r = 2 - a / 90
            pos = r * emb["side"] + (1 - r) * emb["back"]
            negs = [(emb["side"], -scale_pn * _f(F_SB, r)), (emb["front"], -scale_pn * _f(F_FSB, r))]
        xi, ti = x[i:i + 1], t[i:i + 1]
        with torch.no_grad():
            e_pos_raw = _direct_unet(prior, xi, ti, pos[None])
            e_u = _direct_unet(prior, xi, ti, unc[None])
            e_pos = e_pos_raw - e_u
            acc = torch.zeros_like(e_pos)
            for ne, w in negs:
                e_n = _direct_unet(prior, xi, ti, ne[None]) - e_u
                acc += w * (e_n - (e_n * e_pos).sum() / (e_pos * e_pos).sum() * e_pos)
        want = e_u + s * (e_pos + acc)
        got = e_u_prior[i:i + 1] + s * (e_c_prime[i:i + 1] - e_u_prior[i:i + 1])
        assert (got - want).norm() < 1e-4 * want.norm(), (az[i], el[i])
        if negs:  # the negatives move the guided prediction by far more than the tolerance
            assert s * (e_c_prime[i:i + 1] - e_pos_raw).norm() > 50 * 1e-4 * want.norm(), (az[i], el[i])


def test_perp_neg_only_for_declared_cfg_pairs(tiny_sd, encoder):
    """Perp-Neg corrects the conditional rows the caller declared as CFG pairs, nothing else: ASD's
    cond @ t+dt (here dt = 0: same x_t and t as cond @ t) stays the plain positive prediction
    (ScaleDreamer), and a call that declares no pair gets no negatives even with equal rows."""
    prior = _prior(tiny_sd, encoder, perp_neg=0.5)
    _amplify_text(prior)
    ids = prior.text_embeddings(["a red car"])
    x, t = torch.randn(1, 4, 8, 8), torch.tensor([500])
    cams = _cams([40.0] * 3, [10.0] * 3)
    eps = prior.predict_eps(torch.cat([x, x, x]), torch.cat([t, t, t]), torch.cat([ids, ids, ids]), cams,
                            Guidance.branches(1, [False, True, False], [(0, 1)]))
    plain = prior.predict_eps(x, t, ids, _cams([40.0], [10.0]))  # no pair: no Perp-Neg
    assert torch.allclose(eps[2:], plain, atol=1e-4)
    assert (eps[:1] - plain).norm() > 0.02 * plain.norm()
    undeclared = prior.predict_eps(torch.cat([x, x]), torch.cat([t, t]), torch.cat([ids, ids]), _cams([40.0] * 2, [10.0] * 2),
                                   Guidance.branches(1, [False, True]))
    assert torch.allclose(undeclared[:1], plain, atol=1e-4)


def test_text_embeddings_are_computed_once_and_cached(tiny_sd, encoder):
    prior = _prior(tiny_sd, encoder, text_cache_size=2)
    a = prior.text_embeddings(["a cat", "a dog", "a cat"])
    assert a.tolist() == [0, 1, 0] and prior.n_text_encodes == 2
    prior.text_embeddings(["a dog"])
    assert prior.n_text_encodes == 2  # cached
    prior.text_embeddings(["a bird"])  # evicts "a cat" (least recently used)
    assert prior.n_text_encodes == 3 and 0 not in prior.table.cache
    x, t = torch.randn(1, 4, 8, 8), torch.tensor([300])
    e1 = prior.predict_eps(x, t, a[:1], _cams([0.0], [0.0]))  # "a cat" again: re-encoded, same result
    assert prior.n_text_encodes == 4
    # Precomputed embeddings (e.g. from shards) enter through the same entry point.
    tok = encoder.encode(["a cat"] + [view_prompt("a cat", v) for v in VIEWS]).tokens[None]
    fresh = _prior(tiny_sd, encoder)
    ids = fresh.text_embeddings(["a cat"], tokens=tok)
    assert fresh.n_text_encodes == 0
    assert torch.allclose(fresh.predict_eps(x, t, ids, _cams([0.0], [0.0])), e1, atol=1e-5)
    with pytest.raises(WeightsError, match="expected"):
        fresh.text_embeddings(["a cow"], tokens=tok[:, :2])


def _sd_cfg(tiny_sd, corpus, extra=()):
    from scalegen.config import load_config

    return load_config(SD_CONFIG, [f"prior.model={tiny_sd}", f"data.prompts={corpus}", *SD_TINY, *extra])


def test_asd_gradient_reaches_the_generator_through_the_vae(tiny_sd, small_corpus):
    from scalegen.data.cameras import sample_train_cameras
    from scalegen.distill import build_distiller
    from scalegen.priors import build_prior
    from scalegen.render import build_renderer
    from scalegen.train.model import build_model

    cfg = _sd_cfg(tiny_sd, small_corpus, ["data.prompts_per_step=2", "camera.views_per_prompt=2",
                                          "render.bg_random_prob=0"])
    text_encoder, model = build_model(cfg)
    prior = build_prior(cfg, text_encoder=text_encoder, device="cpu")
    assert prior.text_encoder is text_encoder and prior.perp_neg == 0.5
    distiller, renderer = build_distiller(cfg, prior), build_renderer(cfg)
    prompts = ["a car made out of sushi", "a blue tulip"]
    field, bg = model(text_encoder.encode(prompts))
    cams = sample_train_cameras(cfg.camera, 2)
    out = renderer(field, cams, background=bg)
    out.rgb.retain_grad()
    latents = prior.encode(out.rgb)
    loss, logs = distiller(latents, prior.text_embeddings(prompts).repeat_interleave(2), cams.expand(2), 0)
    loss.backward()
    assert out.rgb.grad is not None and out.rgb.grad.abs().sum() > 0  # through the VAE encoder
    for name, params in model.generator.param_groups().items():
        assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in params), name
    assert all(p.grad is None for p in prior.unet.parameters()) and all(p.grad is None for p in prior.vae.parameters())


@pytest.mark.parametrize("name", ["vsd", "vdm", "csd"])
def test_family_on_stable_diffusion(tiny_sd, small_corpus, name):
    """VSD's LoRA on the prior's UNet (fed the view-independent prompt) and VDM's M_psi on latents: the
    renders get a gradient, the distiller's own model learns, the frozen UNet and VAE do not."""
    from scalegen.data.cameras import sample_train_cameras
    from scalegen.distill import build_distiller
    from scalegen.priors import build_prior
    from scalegen.render import build_renderer
    from scalegen.train.model import build_model

    cfg = _sd_cfg(tiny_sd, small_corpus, ["data.prompts_per_step=2", "camera.views_per_prompt=1",
                                          "render.bg_random_prob=0", f"distill.name={name}", "distill.net_width=8"])
    text_encoder, model = build_model(cfg)
    prior = build_prior(cfg, text_encoder=text_encoder, device="cpu")
    distiller, renderer = build_distiller(cfg, prior, cond_dim=text_encoder.dim), build_renderer(cfg)
    prompts = ["a car made out of sushi", "a blue tulip"]
    cond = text_encoder.encode(prompts)
    field, bg = model(cond)
    cams = sample_train_cameras(cfg.camera, 2)
    out = renderer(field, cams, background=bg)
    out.rgb.retain_grad()
    loss, logs = distiller(prior.encode(out.rgb), prior.text_embeddings(prompts), cams.expand(2), 0,
                           pooled=cond.pooled)
    loss.backward()
    assert out.rgb.grad is not None and torch.isfinite(out.rgb.grad).all()
    frozen_unet = [p for n, p in prior.unet.named_parameters() if ".lora_" not in n]
    assert all(p.grad is None for p in frozen_unet) and all(p.grad is None for p in prior.vae.parameters())
    own = list(distiller.parameters())
    assert (name == "csd") == (not own)
    if own:
        assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in own)


@pytest.mark.parametrize("name", ["sds", "asd"])
def test_one_batched_unet_call_per_step(tiny_sd, small_corpus, tmp_path, monkeypatch, name):
    from diffusers import UNet2DConditionModel

    from scalegen.train.loop import train

    calls = []
    original = UNet2DConditionModel.forward

    def counting(self, sample, *a, **k):
        calls.append(sample.shape[0])
        return original(self, sample, *a, **k)

    monkeypatch.setattr(UNet2DConditionModel, "forward", counting)
    cfg = _sd_cfg(tiny_sd, small_corpus, ["train.max_steps=3", f"distill.name={name}", "camera.views_per_prompt=2",
                                          "camera.elevation_range=[0, 40]"])
    train(cfg, tmp_path / name)
    assert len(calls) == 3
    # 2 images per step; Perp-Neg adds 2 negatives per guided image (no overhead views below 60 deg).
    assert calls == [(2 + 2) * 2 if name == "sds" else (3 + 2) * 2] * 3


def test_sd_config_trains_from_the_cli_and_writes_a_checkpoint(tiny_sd, small_corpus, tmp_path):
    """One folder is all a Stable Diffusion user passes: text.model follows prior.model."""
    from scalegen.cli import main

    run = tmp_path / "run"
    rc = main(["train", "--config", SD_CONFIG, "--out", str(run), f"prior.model={tiny_sd}",
               f"data.prompts={small_corpus}", "train.max_steps=20", *SD_TINY])
    assert rc == 0
    assert (run / "checkpoints" / "step_0000020" / "model.safetensors").is_file()
    lines = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert lines[-1]["step"] == 20 and all(math.isfinite(x["loss"]) for x in lines)


def test_every_sd_config_validates_and_builds_its_generator():
    from scalegen.config import load_config
    from scalegen.generators import build_generator

    for path in sorted((ROOT / "configs" / "sd").glob("*.yaml")):
        cfg = load_config(path)
        assert cfg.prior.name == "stable_diffusion", path
        assert f"_{cfg.distill.name}_" in path.stem, path  # <generator>_<distiller>_<corpus>: the file says which
        with torch.device("meta"):  # paper size without allocating it
            build_generator(cfg, 1024)
    cp = load_config(ROOT / "configs" / "sd" / "conv3d_asd_cp100k.yaml")
    assert cp.optim.name == "adan" and cp.train.max_steps == 300_000


def test_adan_matches_its_recurrence():
    from scalegen.train.adan import Adan

    b1, b2, b3, lr, eps, wd = 0.98, 0.92, 0.99, 0.1, 1e-8, 0.01
    p = torch.nn.Parameter(torch.tensor([1.0, -2.0]))
    opt = Adan([p], lr=lr, betas=(b1, b2, b3), eps=eps, weight_decay=wd)
    theta = p.detach().clone()
    m = v = n = torch.zeros(2)
    prev = None
    for k in range(1, 5):
        g = 2 * theta + torch.tensor([0.3, -0.1]) * k  # a gradient that changes every step
        p.grad = g.clone()
        opt.step()
        d = torch.zeros(2) if prev is None else g - prev
        m = b1 * m + (1 - b1) * g
        v = b2 * v + (1 - b2) * d
        n = b3 * n + (1 - b3) * (g + b2 * d) ** 2
        upd = (m / (1 - b1**k) + b2 * v / (1 - b2**k)) / ((n / (1 - b3**k)).sqrt() + eps)
        theta = (theta - lr * upd) / (1 + lr * wd)
        prev = g
        assert torch.allclose(p.detach(), theta, atol=1e-6), k


def test_flop_count_uses_the_real_sd21_architecture():
    """The FLOPs benchmark counts SD 2.1-base's real modules (on the meta device, no weights):
    parameter counts match the published model and the UNet count is linear in stacked branches."""
    from scalegen.bench.flops_sd import text_flops, unet_flops, vae_encode_flops

    f1, n_unet = unet_flops(1, latent=16)
    f3, _ = unet_flops(3, latent=16)
    assert n_unet == 865_910_724 and f3 == 3 * f1 > 0
    vf, vb, n_vae = vae_encode_flops(1, resolution=64)
    assert n_vae == 34_163_664 and 0.8 * vf < vb < 1.2 * vf  # backward to the input only ~ forward
    tf, n_text = text_flops(1)
    assert n_text == 340_387_840 and tf > 2 * 0.9 * 300e6 * 77  # ~2 * params * tokens


def test_v_prediction_models_are_turned_into_eps(tiny_sd, encoder):
    """SD 2.1 (768) predicts v; the prior hands distillers eps = a_t v + s_t x_t."""
    prior = _prior(tiny_sd, encoder, view_dependent=False)
    ids = prior.text_embeddings(["a lamp"])
    x, t = torch.randn(1, 4, 8, 8), torch.tensor([600])
    with torch.no_grad():
        v = _direct_unet(prior, x, t, encoder.encode(["a lamp"]).tokens)
    prior.prediction_type = "v_prediction"
    ab = prior.alphas_cumprod[600]
    eps = prior.predict_eps(x, t, ids, _cams([0.0], [0.0]))
    assert torch.allclose(eps, ab.sqrt() * v + (1 - ab).sqrt() * x, atol=1e-5)


def test_shards_with_view_variants_feed_the_prior_without_re_encoding(tiny_sd, encoder, small_corpus, tmp_path):
    """`data build --encoder clip` stores the prompt and its 4 view-dependent variants; the training
    loop hands them to the prior, which then never runs its text encoder for those prompts."""
    from types import SimpleNamespace

    from scalegen.cli import main
    from scalegen.data.stream import ShardStream
    from scalegen.train.loop import BatchEncoder

    assert main(["data", "build", "--corpus", str(small_corpus), "--out", str(tmp_path / "sh"), "--encoder", "clip",
                 "--shard-size", "4", "--split", "train", "--cpu", f"text.model={tiny_sd}"]) == 0
    stream = ShardStream(str(tmp_path / "sh"), batch_size=3)
    assert stream.info["id"] == encoder.id and stream.info["store"] == "views"
    prior = _prior(tiny_sd, encoder)
    be = BatchEncoder(SimpleNamespace(data=SimpleNamespace(embed_cache=8)), encoder, prior, "cpu", stream)
    assert be.prior_tokens == "views"
    prompts, cond, ids = be(stream.next_batch())
    assert prior.n_text_encodes == 0 and be.n_encoded == 0
    ref = encoder.encode([prompts[0]] + [view_prompt(prompts[0], v) for v in VIEWS]).tokens
    assert torch.allclose(prior.table.cache[int(ids[0])].float(), ref, atol=2e-3)
    assert torch.allclose(cond.tokens[0], encoder.encode(prompts[:1]).tokens[0], atol=2e-3)
