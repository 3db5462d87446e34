"""The MVDream prior: the official checkpoint's layout on the full-size model (meta device), the
official implementation's outputs on a tiny model (fixtures in ../shared), multi-view attention that
survives saving, objects that do not leak into each other, the converter and the prior on a tiny
converted model loaded through the same code real weights take."""
import json
import math
from pathlib import Path

import pytest
import torch

from conftest import shared_path
from scalegen.data.cameras import make_cameras
from scalegen.errors import ConfigError, WeightsError
from scalegen.priors.base import Guidance

pytest.importorskip("diffusers")
pytest.importorskip("transformers")
pytest.importorskip("open_clip")

ROOT = Path(__file__).resolve().parents[1]
MV_CONFIG = str(ROOT / "configs" / "mvdream" / "triplane_asd_dl17k.yaml")
TOL = 5e-6  # fp32 relative error against the official implementation (its floor is ~1e-6)
# CPU-sized overrides of the real MVDream config (ASD, MVDream cameras, 2 micro-batches stay as configured).
MV_TINY = [
    "train.logger=none", "train.progress=false", "train.threads=1", "generator.preset=small", "camera.resolution=16",
    "camera.eval_resolution=16", "render.samples=12", "render.importance_samples=8", "render.eikonal_points=256",
    "eval.samples=12", "eval.importance_samples=8", "prior.encode_resolution=64", "prior.latent_resolution=8",
]


def _rel(a, b) -> float:
    return float((a - b).norm() / b.norm())


@pytest.fixture(scope="module")
def reference():
    """(tensors, unet_config) of the tiny official-layout model with the official implementation's outputs."""
    from scalegen.priors.mvdream_convert import read_checkpoint

    state, meta = read_checkpoint(shared_path("fixtures", "tiny_mvdream_reference.safetensors"))
    return state, json.loads(meta["unet_config"])


@pytest.fixture(scope="module")
def reference_unet(reference):
    from scalegen.priors.mvdream_convert import build_unet, split_checkpoint

    state, cfg = reference
    return build_unet(split_checkpoint(state)[0], cfg["num_head_channels"]).eval()


def _run(unet, state, num_frames):
    with torch.no_grad():
        return unet(state["inputs.x"], state["inputs.timesteps"], state["inputs.context"], state["inputs.camera"],
                    num_frames=num_frames).sample


# ---------------------------------------------------------------------------------------------
# The official layout and the official outputs


def test_official_checkpoint_keys_map_one_to_one_onto_the_full_size_model():
    """Every one of the 690 UNet tensors of sd-v2.1-base-4view.pt lands on exactly one parameter of our
    full-size model with the same shape, and every parameter of ours gets one (meta device: no memory)."""
    from scalegen.priors.mvdream_convert import infer_unet_config, map_key, unet_key_map
    from scalegen.priors.mvdream_unet import MultiViewUNet, mvdream_unet_config

    data = json.loads(shared_path("fixtures", "mvdream_sd21_base_4view_unet_keys.json").read_text())
    keys = {k[len("model.diffusion_model."):]: tuple(s) for k, s in data["keys"].items()}
    assert len(keys) == data["num_keys"] == 690
    config = mvdream_unet_config()
    # the converter reads the same config from the tensors' shapes alone (heads: the official 64 channels)
    meta = {k: torch.empty(s, device="meta") for k, s in keys.items()}
    assert infer_unet_config(meta, 64) == config
    with torch.device("meta"):
        ours = {k: tuple(v.shape) for k, v in MultiViewUNet(**config).state_dict().items()}
    table = unet_key_map(config)
    mapped = {k: map_key(k, table) for k in keys}
    assert [k for k, v in mapped.items() if v is None] == []
    assert sorted(set(mapped.values()) - set(ours)) == []
    assert len(set(mapped.values())) == len(keys)  # no two official tensors on one parameter
    assert sorted(set(ours) - set(mapped.values())) == []  # none of ours left unmapped
    assert {k: s for k, s in keys.items() if ours[mapped[k]] != s} == {}
    assert len(ours) == 690 and sum(math.prod(s) for s in ours.values()) == 865_910_724 + 1_661_440  # SD 2.1 + camera


@pytest.mark.parametrize("num_frames", [4, 1])
def test_tiny_model_reproduces_the_official_implementation(reference, reference_unet, num_frames):
    state, _ = reference
    out = _run(reference_unet, state, num_frames)
    assert _rel(out, state[f"outputs.num_frames_{num_frames}"]) <= TOL


def test_multiview_attention_matters_far_beyond_the_tolerance(reference, reference_unet):
    """Without the multi-view self-attention the 4-view outputs are off by ~1e-2, 2000x the tolerance."""
    state, _ = reference
    four, one = state["outputs.num_frames_4"], state["outputs.num_frames_1"]
    assert _rel(one, four) > 1000 * TOL


def test_multiview_attention_survives_save_and_reload(reference, reference_unet, tmp_path):
    """diffusers saves no attention processor: MultiViewUNet installs its own when it is rebuilt from
    config.json, so a reloaded model still reproduces the official 4-view outputs."""
    from diffusers import UNet2DConditionModel

    from scalegen.priors.mvdream_unet import MultiViewAttnProcessor, MultiViewUNet

    state, _ = reference
    reference_unet.save_pretrained(tmp_path / "unet")
    assert json.loads((tmp_path / "unet" / "config.json").read_text())["_class_name"] == "MultiViewUNet"
    reloaded = MultiViewUNet.from_pretrained(tmp_path / "unet").eval()
    assert all(isinstance(p, MultiViewAttnProcessor) for p in reloaded.attn_processors.values())
    assert _rel(_run(reloaded, state, 4), state["outputs.num_frames_4"]) <= TOL
    # a plain diffusers UNet cannot silently stand in: it has no camera input
    plain = UNet2DConditionModel.from_pretrained(tmp_path / "unet").eval()
    with pytest.raises(ValueError, match="class_labels"):
        plain(state["inputs.x"], state["inputs.timesteps"], state["inputs.context"])


def test_our_cameras_convert_to_the_official_camera_condition(reference):
    """The fixture's cameras are the official get_camera (elevation 15, azimuths 0/90/180/270; elevation 30,
    azimuths 45/135/225/315). Our z-up OpenGL cameras at the same places (MVDream's azimuth is ours + 90)
    convert to exactly those 16 numbers."""
    from scalegen.priors.mvdream import mvdream_camera

    state, _ = reference
    el = torch.tensor([[15.0] * 4 + [30.0] * 4])
    az = torch.tensor([[0.0, 90, 180, 270, 45, 135, 225, 315]]) - 90.0
    cams = make_cameras(el, az, torch.tensor([[3.0, 1, 2, 7, 0.5, 4, 1.2, 9]]), torch.full((1, 8), 40.0), 8, 8)
    got = mvdream_camera(cams.rows().c2w[0])
    assert (got - state["inputs.camera"]).abs().max() < 1e-6
    # a camera a quarter turn off (the azimuth offset forgotten) is a different condition
    wrong = make_cameras(el, az + 90.0, torch.ones(1, 8), torch.full((1, 8), 40.0), 8, 8)
    assert (mvdream_camera(wrong.rows().c2w[0]) - state["inputs.camera"]).abs().max() > 0.5


# ---------------------------------------------------------------------------------------------
# The converter


def test_vae_names_agree_with_diffusers_own_ldm_converter():
    """Our VAE table turns LDM names into the same diffusers tensors as diffusers' single-file loader
    (an independent implementation), including the 1x1-conv -> linear attention weights."""
    from diffusers import AutoencoderKL
    from diffusers.loaders.single_file_utils import convert_ldm_vae_checkpoint

    from scalegen.priors.mvdream_convert import VAE_PREFIX, build_vae, to_official_layout
    from scalegen.priors.mvdream_unet import MultiViewUNet, mvdream_unet_config

    torch.manual_seed(0)
    vae = AutoencoderKL(block_out_channels=(32, 64), layers_per_block=2, norm_num_groups=32,
                        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2)
    unet = MultiViewUNet(**mvdream_unet_config(model_channels=32, channel_mult=(1,), num_res_blocks=1,
                                               attention_resolutions=(1,), num_head_channels=8, context_dim=8))
    official = to_official_layout(unet, vae)
    assert "first_stage_model.encoder.mid.attn_1.q.weight" in official
    assert official["first_stage_model.encoder.mid.attn_1.q.weight"].shape == (64, 64, 1, 1)
    theirs = convert_ldm_vae_checkpoint({k: v for k, v in official.items() if k.startswith(VAE_PREFIX)},
                                        dict(vae.config))
    ours = build_vae({k[len(VAE_PREFIX):]: v for k, v in official.items() if k.startswith(VAE_PREFIX)}).state_dict()
    assert sorted(theirs) == sorted(ours) == sorted(vae.state_dict())
    for k, v in vae.state_dict().items():
        assert torch.equal(ours[k], v) and torch.equal(theirs[k].reshape(v.shape), v), k


@pytest.fixture(scope="module")
def tiny_sd(tmp_path_factory):
    from scalegen.cli import main

    out = tmp_path_factory.mktemp("mvsd") / "tiny-sd"
    assert main(["prior", "make-tiny", "--out", str(out)]) == 0
    return str(out)


@pytest.fixture(scope="module")
def tiny_mv(tmp_path_factory, tiny_sd):
    """A tiny MVDream checkpoint in the official layout, converted by the command users run."""
    from scalegen.cli import main

    d = tmp_path_factory.mktemp("mv")
    assert main(["prior", "make-tiny-mvdream", "--out", str(d / "tiny-mvdream.safetensors")]) == 0
    assert main(["prior", "convert-mvdream", str(d / "tiny-mvdream.safetensors"), str(d / "tiny-mv"),
                 "--text-from", tiny_sd]) == 0
    return str(d / "tiny-mv")


def test_converted_folder_round_trips_the_official_tensors(tiny_mv, tmp_path):
    """Converting the official-layout file and writing the result back in that layout gives the same tensors."""
    from diffusers import AutoencoderKL

    from scalegen.priors.mvdream_convert import read_checkpoint, to_official_layout
    from scalegen.priors.mvdream_unet import MultiViewUNet

    original, _ = read_checkpoint(Path(tiny_mv).parent / "tiny-mvdream.safetensors")
    back = to_official_layout(MultiViewUNet.from_pretrained(tiny_mv, subfolder="unet"),
                              AutoencoderKL.from_pretrained(tiny_mv, subfolder="vae"))
    assert sorted(back) == sorted(k for k in original if k != "alphas_cumprod")
    assert all(torch.equal(back[k], original[k]) for k in back)
    for sub in ("unet", "vae", "scheduler", "tokenizer", "text_encoder"):
        assert (Path(tiny_mv) / sub).is_dir(), sub
    assert not list(Path(tiny_mv).parent.glob(".tmp-*"))  # written under a temporary name, then renamed


def test_converter_errors_are_one_line(tiny_mv, tiny_sd, tmp_path, capsys):
    from safetensors.torch import save_file

    from scalegen.cli import main
    from scalegen.priors.mvdream_convert import convert_mvdream, read_checkpoint

    with pytest.raises(WeightsError, match="does not exist"):
        convert_mvdream(tmp_path / "missing.pt", tmp_path / "out")
    with pytest.raises(WeightsError, match="not empty"):
        convert_mvdream(Path(tiny_mv).parent / "tiny-mvdream.safetensors", tiny_mv)
    # a Stable Diffusion (no camera) checkpoint in LDM layout is not MVDream
    state, _ = read_checkpoint(Path(tiny_mv).parent / "tiny-mvdream.safetensors")
    save_file({k: v for k, v in state.items() if "camera_embed" not in k}, str(tmp_path / "sd.safetensors"))
    with pytest.raises(WeightsError, match="camera_embed"):
        convert_mvdream(tmp_path / "sd.safetensors", tmp_path / "out")
    other = dict(state, alphas_cumprod=torch.linspace(0.999, 0.001, 1000))  # another noise schedule
    save_file(other, str(tmp_path / "other.safetensors"))
    with pytest.raises(WeightsError, match="noise schedule"):
        convert_mvdream(tmp_path / "other.safetensors", tmp_path / "out")
    (tmp_path / "garbage.pt").write_bytes(b"not a checkpoint")
    rc = main(["prior", "convert-mvdream", str(tmp_path / "garbage.pt"), str(tmp_path / "out2")])
    err = capsys.readouterr().err
    assert rc == 2 and len([x for x in err.splitlines() if x.startswith("error:")]) == 1 and "Traceback" not in err
    assert not (tmp_path / "out").exists() and not (tmp_path / "out2").exists()


def test_pickle_checkpoints_load_without_running_code(tiny_mv, tmp_path):
    """The official file is a torch.save'd state dict: read with weights_only=True, so a pickle that
    would run code is refused instead of executed."""
    import os

    from scalegen.priors.mvdream_convert import read_checkpoint

    state, _ = read_checkpoint(Path(tiny_mv).parent / "tiny-mvdream.safetensors")
    torch.save({"state_dict": state}, tmp_path / "official.ckpt")  # Lightning's wrapper is unwrapped
    again, _ = read_checkpoint(tmp_path / "official.ckpt")
    assert sorted(again) == sorted(state)

    class Evil:
        def __reduce__(self):
            return (os.system, (f"touch {tmp_path / 'pwned'}",))

    torch.save({"x": Evil()}, tmp_path / "evil.pt", _use_new_zipfile_serialization=True)
    with pytest.raises(WeightsError):
        read_checkpoint(tmp_path / "evil.pt")
    assert not (tmp_path / "pwned").exists()


# ---------------------------------------------------------------------------------------------
# The prior


@pytest.fixture(scope="module")
def encoder(tiny_mv):
    from scalegen.text.clip import CLIPTextEncoder

    return CLIPTextEncoder(tiny_mv)


def _prior(tiny_mv, encoder, **kw):
    from scalegen.priors.mvdream import MVDreamPrior

    return MVDreamPrior(tiny_mv, text_encoder=encoder, encode_resolution=64, latent_resolution=8, **kw)


@pytest.fixture(scope="module")
def prior(tiny_mv, encoder):
    """One prior for the tests that only read it: a negative prompt, and text made to matter."""
    p = _prior(tiny_mv, encoder, negative_prompt="blurry, low quality")
    _amplify_text(p.unet)
    return p


def _cams(n_objects, start=0.0):
    """n_objects x 4 views, 90 degrees apart, as the MVDream sampler makes them."""
    az = (torch.arange(4.0) * 90 + start).repeat(n_objects).view(1, -1)
    el = torch.full_like(az, 15.0)
    return make_cameras(el, az, torch.full_like(az, 3.0), torch.full_like(az, 40.0), 16, 16)


def _amplify_text(unet, gain=50.0):
    """A random tiny UNet barely listens to its text; scale its cross-attention outputs."""
    with torch.no_grad():
        for name, m in unet.named_modules():
            if name.endswith("attn2"):
                m.to_out[0].weight.mul_(gain)


def test_prior_loads_the_converted_folder(prior, encoder):
    from scalegen.priors.base import ddpm_alphas_cumprod
    from scalegen.priors.mvdream_unet import MultiViewAttnProcessor

    assert prior.text_encoder is encoder
    assert torch.allclose(prior.alphas_cumprod, ddpm_alphas_cumprod(), atol=1e-6)
    assert all(isinstance(p, MultiViewAttnProcessor) for p in prior.unet.attn_processors.values())
    for module in (prior.unet, prior.vae):
        assert not module.training and not any(p.requires_grad for p in module.parameters())
    rgb = torch.rand(4, 3, 16, 16, requires_grad=True)
    z = prior.encode(rgb)
    assert z.shape == (4, 4, 8, 8)
    z.sum().backward()
    assert rgb.grad.abs().sum() > 0  # through the frozen VAE encoder


def test_prior_errors_say_how_to_convert(tmp_path, tiny_sd):
    from scalegen.priors.mvdream import MVDreamPrior

    for bad, needle in [("someone/mvdream", "is not a folder"), (str(tmp_path), "has no unet/, vae/, scheduler/"),
                        (tiny_sd, "without MVDream's camera embedding")]:
        with pytest.raises(WeightsError, match=needle) as e:
            MVDreamPrior(bad)
        assert "scalegen prior convert-mvdream" in str(e.value)


def test_objects_do_not_leak_into_each_other_while_views_interact(prior):
    """Two objects x 4 views in one batch (and in every stacked branch): changing object B's inputs leaves
    object A's predictions untouched; changing one view of A changes A's other views (multi-view attention)."""
    ids = prior.text_embeddings(["a red car", "a blue chair"]).repeat_interleave(4)
    x, t = torch.randn(8, 4, 8, 8), torch.tensor([700] * 4 + [300] * 4)
    cams = _cams(2)
    guidance = Guidance.branches(8, [False, True, False], [(0, 1)])

    def eps(x_):  # ASD's three branches in one call
        return prior.predict_eps(torch.cat([x_] * 3), torch.cat([t, t, t + 10]), ids.repeat(3), cams.repeat_rows(3),
                                 guidance).view(3, 2, 4, 4, 8, 8)

    base = eps(x)
    other = x.clone()
    other[4:] += torch.randn(4, 4, 8, 8)  # object B only
    moved = eps(other)
    assert (moved[:, 0] - base[:, 0]).abs().max() < 1e-5  # object A: not a bit
    assert (moved[:, 1] - base[:, 1]).abs().max() > 1e-2  # object B changed
    one_view = x.clone()
    one_view[0] += torch.randn(4, 8, 8)  # view 0 of object A
    seen = eps(one_view)
    assert (seen[:, 0, 1:] - base[:, 0, 1:]).abs().max() > 1e-3  # A's other views notice
    assert (seen[:, 1] - base[:, 1]).abs().max() < 1e-5  # B does not


def test_conditional_rows_and_negative_prompt_against_direct_unet(prior, encoder):
    """Conditional rows use the prompt's embedding, unconditional rows the negative prompt's; the camera is
    our c2w in MVDream's form; all in one UNet call."""
    from scalegen.priors.mvdream import mvdream_camera

    calls = []
    hook = prior.unet.register_forward_hook(lambda m, a, k: calls.append(a[0].shape[0]))
    ids = prior.text_embeddings(["a wooden chair"]).repeat(4)
    x, t, cams = torch.randn(4, 4, 8, 8), torch.full((4,), 500), _cams(1, start=20.0)
    got = prior.predict_eps(torch.cat([x, x]), torch.cat([t, t]), torch.cat([ids, ids]), cams.repeat_rows(2),
                            Guidance.branches(4, [False, True], [(0, 1)]))
    hook.remove()
    assert calls == [8]
    cam = mvdream_camera(cams.rows().c2w[0])
    with torch.no_grad():
        want_c = prior.unet(x, t, encoder.encode(["a wooden chair"] * 4).tokens, cam, num_frames=4).sample
        want_u = prior.unet(x, t, encoder.encode(["blurry, low quality"] * 4).tokens, cam, num_frames=4).sample
        plain_u = prior.unet(x, t, encoder.encode([""] * 4).tokens, cam, num_frames=4).sample
    assert _rel(got[:4], want_c) < 1e-5 and _rel(got[4:], want_u) < 1e-5
    assert _rel(plain_u, want_u) > 1e-2  # the negative prompt is really used
    with pytest.raises(ValueError, match="must share"):  # a view group mixing two prompts
        prior.predict_eps(x, t, prior.text_embeddings(["a", "b", "a", "a"]), cams)


def test_text_cache_and_stored_tokens(prior, tiny_mv, encoder):
    assert prior.stored_tokens({"id": encoder.id, "store": "views"}) == "plain"
    assert prior.stored_tokens({"id": encoder.id, "store": "plain"}) == "plain"
    assert prior.stored_tokens({"id": encoder.id, "store": "pooled"}) is None
    assert prior.stored_tokens({"id": "clip:other:h1024-l23", "store": "plain"}) is None
    fresh = _prior(tiny_mv, encoder, text_cache_size=2)
    _amplify_text(fresh.unet)
    x, t, cams = torch.randn(4, 4, 8, 8), torch.full((4,), 300), _cams(1)
    cat = fresh.text_embeddings(["a cat", "a dog", "a cat"])[:1].repeat(4)
    assert fresh.n_text_encodes == 2
    e_cat = fresh.predict_eps(x, t, cat, cams)
    e_dog = fresh.predict_eps(x, t, fresh.text_embeddings(["a dog"]).repeat(4), cams)
    assert fresh.n_text_encodes == 2 and _rel(e_dog, e_cat) > 1e-3  # cached; and the prompt matters
    fresh.text_embeddings(["a bird"])  # evicts "a cat" (least recently used)
    assert fresh.n_text_encodes == 3 and len(fresh.table.cache) == 2
    # precomputed embeddings (shards) enter through the same call, and nothing is encoded
    ids = fresh.text_embeddings(["a cat"], tokens=encoder.encode(["a cat"]).tokens[:, None])
    assert fresh.n_text_encodes == 3 and torch.equal(ids, cat[:1])
    assert torch.allclose(fresh.predict_eps(x, t, ids.repeat(4), cams), e_cat, atol=1e-5)
    with pytest.raises(WeightsError, match="expected"):
        fresh.text_embeddings(["a cow"], tokens=encoder.encode(["a cow"] * 2).tokens[None])


def _mv_cfg(tiny_mv, corpus, extra=()):
    from scalegen.config import load_config

    return load_config(MV_CONFIG, [f"prior.model={tiny_mv}", f"data.prompts={corpus}", *MV_TINY, *extra])


def test_asd_draws_one_timestep_per_view_group(tiny_mv, small_corpus, monkeypatch):
    """distill.t_per=prompt (required with MVDream): the UNet sees one t per 4-view group in every branch,
    and t + dt is shared by the group as well; groups draw their own t."""
    from scalegen.distill import build_distiller
    from scalegen.priors import build_prior
    from scalegen.text import build_text_encoder

    cfg = _mv_cfg(tiny_mv, small_corpus, ["data.prompts_per_step=3"])
    text_encoder = build_text_encoder(cfg)
    prior = build_prior(cfg, text_encoder=text_encoder, device="cpu")
    assert prior.text_encoder is text_encoder and prior.num_frames == 4  # one tower for generator and UNet
    distiller = build_distiller(cfg, prior)
    seen = []
    hook = prior.unet.register_forward_hook(lambda m, a, k: seen.append(a[1].clone()))
    ids = prior.text_embeddings(["a", "b", "c"]).repeat_interleave(4)
    from scalegen.data.cameras import sample_train_cameras

    firsts = set()
    for _ in range(6):
        cams = sample_train_cameras(cfg.camera, 3)
        distiller(torch.randn(12, 4, 8, 8), ids, cams.expand(3), step=0)
        t = seen[-1].view(3, 3, 4)  # branch x object x view
        assert (t == t[..., :1]).all()  # one t per group, in every branch
        assert torch.equal(t[0], t[1]) and (t[2] >= t[0]).all()  # uncond at t; cond at t + dt >= t
        firsts.update(t[0, :, 0].tolist())
    hook.remove()
    assert len(seen) == 6 and len(firsts) > 3  # one UNet call per step; groups differ
    with pytest.raises(ConfigError, match="t_per=prompt"):
        _mv_cfg(tiny_mv, small_corpus, ["distill.t_per=image"])
    with pytest.raises(ConfigError, match="perp_neg is Stable Diffusion's"):
        _mv_cfg(tiny_mv, small_corpus, ["prior.perp_neg=0.5"])


@pytest.mark.slow
def test_mvdream_config_trains_20_steps_from_the_cli(tiny_mv, small_corpus, tmp_path):
    """The README's smoke run: the real MVDream config (ASD, MVDream cameras, 2 micro-batches per step) on a
    tiny converted model; one folder is all it takes (text.model follows prior.model)."""
    from scalegen.cli import main

    run = tmp_path / "run"
    assert main(["train", "--config", MV_CONFIG, "--out", str(run), f"prior.model={tiny_mv}",
                 f"data.prompts={small_corpus}", "train.max_steps=20", *MV_TINY]) == 0
    assert (run / "checkpoints" / "step_0000020" / "model.safetensors").is_file()
    lines = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert lines[-1]["step"] == 20 and all(math.isfinite(x["loss"]) for x in lines)
    data = json.loads((run / "checkpoints" / "step_0000020" / "state.json").read_text())["data"]["0"]
    assert data["epoch"] * 8 + data["cursor"] == 20 * 2  # 2 micro-batches of 1 prompt per step, 8 prompts an epoch


def test_mvdream_config_is_scaledreamers_run():
    from scalegen.config import load_config
    from scalegen.generators import build_generator

    cfg = load_config(MV_CONFIG)
    assert (cfg.prior.name, cfg.distill.name, cfg.distill.t_per, cfg.camera.sampler) == ("mvdream", "asd", "prompt",
                                                                                         "mvdream")
    assert cfg.camera.views_per_prompt == 4 and cfg.train.grad_accum == 2 and cfg.train.max_steps == 100_000
    assert cfg.optim.name == "adan" and cfg.optim.lr == cfg.optim.lr_background == 2e-4
    assert cfg.distill.guidance_scale == 7.5 and cfg.prior.resolutions() == (256, 32)
    with torch.device("meta"):
        gen = build_generator(cfg, 1024)
    assert abs(sum(p.numel() for p in gen.parameters()) / 1e6 - 120.5) < 0.1  # ScaleDreamer's Triplane-Transformer


def test_flop_count_uses_the_real_mvdream_architecture():
    from scalegen.bench.flops_mvdream import mvdream_unet_flops
    from scalegen.bench.flops_sd import unet_flops

    f4, n = mvdream_unet_flops(4, latent=8, num_frames=4)
    f8, _ = mvdream_unet_flops(8, latent=8, num_frames=4)
    one, _ = mvdream_unet_flops(4, latent=8, num_frames=1)
    sd, _ = unet_flops(4, latent=8)
    assert n == 865_910_724 + 1_661_440 and f8 == 2 * f4 > 0
    assert f4 > one  # joint attention over 4 views costs more than per-view attention ...
    assert one - sd < 1e-3 * sd  # ... which is SD 2.1's UNet (+ the camera MLP)


@pytest.mark.parametrize("name", ["sds", "csd", "vsd", "vdm"])
def test_every_distiller_runs_on_mvdream(tiny_mv, small_corpus, name):
    """The rest of the family on the MVDream prior, one step each: one UNet call whose timesteps are one per
    view group (VSD's own t' too); the renders get a finite gradient; the frozen UNet and VAE none."""
    from scalegen.data.cameras import sample_train_cameras
    from scalegen.distill import build_distiller
    from scalegen.priors import build_prior
    from scalegen.render import build_renderer
    from scalegen.train.model import build_model

    cfg = _mv_cfg(tiny_mv, small_corpus, ["data.prompts_per_step=2", f"distill.name={name}", "distill.net_width=8",
                                          "distill.sds_x0_recon=true"])
    text_encoder, model = build_model(cfg)
    prior = build_prior(cfg, text_encoder=text_encoder, device="cpu")
    distiller, renderer = build_distiller(cfg, prior, cond_dim=text_encoder.dim), build_renderer(cfg)
    prompts = ["a car made out of sushi", "a blue tulip"]
    cond = text_encoder.encode(prompts)
    field, bg = model(cond)
    cams = sample_train_cameras(cfg.camera, 2)
    out = renderer(field, cams, background=bg)
    out.rgb.retain_grad()
    seen = []
    hook = prior.unet.register_forward_hook(lambda m, a, k: seen.append(a[1].clone()))
    loss, _ = distiller(prior.encode(out.rgb), prior.text_embeddings(prompts).repeat_interleave(4), cams.expand(2), 0,
                        pooled=cond.pooled.repeat_interleave(4, 0))
    hook.remove()
    loss.backward()
    assert len(seen) == 1 and (seen[0].view(-1, 4) == seen[0].view(-1, 4)[:, :1]).all()
    assert out.rgb.grad is not None and torch.isfinite(out.rgb.grad).all() and out.rgb.grad.abs().sum() > 0
    assert all(p.grad is None for p in prior.unet.parameters()) and all(p.grad is None for p in prior.vae.parameters())


def test_flops_mvdream_bench_options_and_config_are_checked():
    from scalegen.bench import run_bench

    with pytest.raises(ConfigError, match="did you mean 'bench.config'"):
        run_bench("flops-mvdream", ["bench.confg=x.yaml"])
    with pytest.raises(ConfigError, match="flops-sd"):
        run_bench("flops-mvdream", [f"bench.config={ROOT / 'configs' / 'sd' / 'hyper_ingp_asd_mg15.yaml'}"])


def test_shards_feed_the_prior_without_re_encoding(tiny_mv, encoder, small_corpus, tmp_path):
    """`data build --encoder clip` with the converted folder's tower: the training loop hands the stored
    prompt embeddings to the MVDream prior, which never runs its text encoder for them."""
    from types import SimpleNamespace

    from scalegen.cli import main
    from scalegen.data.stream import ShardStream
    from scalegen.train.loop import BatchEncoder

    assert main(["data", "build", "--corpus", str(small_corpus), "--out", str(tmp_path / "sh"), "--encoder", "clip",
                 "--store", "plain", "--shard-size", "4", "--split", "train", "--cpu", f"text.model={tiny_mv}"]) == 0
    stream = ShardStream(str(tmp_path / "sh"), batch_size=3)
    prior = _prior(tiny_mv, encoder)
    be = BatchEncoder(SimpleNamespace(data=SimpleNamespace(embed_cache=8)), encoder, prior, "cpu", stream)
    assert be.prior_tokens == "plain"
    prompts, _, ids = be(stream.next_batch())
    assert prior.n_text_encodes == 0 and be.n_encoded == 0
    assert torch.allclose(prior.table.cache[int(ids[0])][0], encoder.encode(prompts[:1]).tokens[0], atol=2e-3)
