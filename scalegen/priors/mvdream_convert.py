"""The official MVDream checkpoint (LDM layout) -> a diffusers folder the MVDream prior loads.

``sd-v2.1-base-4view.pt`` holds the UNet under ``model.diffusion_model.`` (``time_embed``, ``camera_embed``,
``input_blocks``, ``middle_block``, ``output_blocks``, ``out``), the VAE under ``first_stage_model.``
(``encoder.down.i.block.j``, ``decoder.up.i.block.j``, ``mid.attn_1`` with 1x1-conv q/k/v, ``quant_conv``)
and its own OpenCLIP text tower under ``cond_stage_model.``. ``convert_mvdream`` writes

    OUT/unet/         MultiViewUNet (config.json + safetensors)
    OUT/vae/          AutoencoderKL
    OUT/scheduler/    DDPM, scaled_linear betas 0.00085 -> 0.012, T = 1000, epsilon (sd-v2-base.yaml)
    OUT/tokenizer/, OUT/text_encoder/   copied from a Stable Diffusion 2.1(-base) folder (``text_from``)

The text tower is SD 2.1's OpenCLIP ViT-H as diffusers/transformers ship it: its ``last_hidden_state``
(23 layers, final layer norm) is the penultimate-layer embedding MVDream conditions on, so MVDream's
``cond_stage_model`` is not converted. The key names are mapped by tables built from the model's
config (``unet_key_map``, ``vae_key_map``); nothing is guessed from substrings. The number of
attention heads is not visible in the weights: it comes from the checkpoint's ``unet_config``
metadata (safetensors) or ``num_head_channels`` (64 in the official config).
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
from torch import Tensor

from scalegen import atomic
from scalegen.errors import WeightsError
from scalegen.priors.mvdream_unet import MultiViewUNet, mvdream_unet_config

UNET_PREFIX = "model.diffusion_model."
VAE_PREFIX = "first_stage_model."
TEXT_PREFIX = "cond_stage_model."
VAE_SCALING = 0.18215  # sd-v2-base.yaml: scale_factor
# LDM module names inside a ResBlock / VAE ResnetBlock / VAE AttnBlock -> diffusers'.
UNET_RESNET = {"in_layers.0": "norm1", "in_layers.2": "conv1", "emb_layers.1": "time_emb_proj",
               "out_layers.0": "norm2", "out_layers.3": "conv2", "skip_connection": "conv_shortcut"}
VAE_RESNET = {"norm1": "norm1", "conv1": "conv1", "norm2": "norm2", "conv2": "conv2", "nin_shortcut": "conv_shortcut"}
VAE_ATTN = {"norm": "group_norm", "q": "to_q", "k": "to_k", "v": "to_v", "proj_out": "to_out.0"}


# ---------------------------------------------------------------------------------------------
# Name tables: {LDM module prefix: (diffusers module prefix, inner renames or None)}


def unet_key_map(config: dict) -> dict[str, tuple[str, dict | None]]:
    """Module prefixes of the official MultiViewUNetModel -> ``MultiViewUNet`` for a diffusers ``config``."""
    levels = len(config["block_out_channels"])
    nres = config["layers_per_block"]
    m: dict[str, tuple[str, dict | None]] = {
        "time_embed.0": ("time_embedding.linear_1", None), "time_embed.2": ("time_embedding.linear_2", None),
        "camera_embed.0": ("class_embedding.linear_1", None), "camera_embed.2": ("class_embedding.linear_2", None),
        "input_blocks.0.0": ("conv_in", None), "out.0": ("conv_norm_out", None), "out.2": ("conv_out", None),
        "middle_block.0": ("mid_block.resnets.0", UNET_RESNET), "middle_block.1": ("mid_block.attentions.0", None),
        "middle_block.2": ("mid_block.resnets.1", UNET_RESNET),
    }
    for level in range(levels):
        attn = config["down_block_types"][level].startswith("CrossAttn")
        for j in range(nres):
            k = 1 + level * (nres + 1) + j
            m[f"input_blocks.{k}.0"] = (f"down_blocks.{level}.resnets.{j}", UNET_RESNET)
            if attn:
                m[f"input_blocks.{k}.1"] = (f"down_blocks.{level}.attentions.{j}", None)
        if level < levels - 1:
            m[f"input_blocks.{1 + level * (nres + 1) + nres}.0.op"] = (f"down_blocks.{level}.downsamplers.0.conv", None)
    for u in range(levels):  # output_blocks run from the deepest level up
        attn = config["up_block_types"][u].startswith("CrossAttn")
        for i in range(nres + 1):
            k = u * (nres + 1) + i
            m[f"output_blocks.{k}.0"] = (f"up_blocks.{u}.resnets.{i}", UNET_RESNET)
            if attn:
                m[f"output_blocks.{k}.1"] = (f"up_blocks.{u}.attentions.{i}", None)
            if u < levels - 1 and i == nres:
                m[f"output_blocks.{k}.{2 if attn else 1}.conv"] = (f"up_blocks.{u}.upsamplers.0.conv", None)
    return m


def vae_key_map(config: dict) -> dict[str, tuple[str, dict | None]]:
    """Module prefixes of LDM's AutoencoderKL -> diffusers' ``AutoencoderKL`` for a diffusers ``config``."""
    levels = len(config["block_out_channels"])
    nres = config["layers_per_block"]
    m: dict[str, tuple[str, dict | None]] = {"quant_conv": ("quant_conv", None),
                                             "post_quant_conv": ("post_quant_conv", None)}
    for part in ("encoder", "decoder"):
        m.update({f"{part}.conv_in": (f"{part}.conv_in", None), f"{part}.norm_out": (f"{part}.conv_norm_out", None),
                  f"{part}.conv_out": (f"{part}.conv_out", None),
                  f"{part}.mid.block_1": (f"{part}.mid_block.resnets.0", VAE_RESNET),
                  f"{part}.mid.attn_1": (f"{part}.mid_block.attentions.0", VAE_ATTN),
                  f"{part}.mid.block_2": (f"{part}.mid_block.resnets.1", VAE_RESNET)})
    for i in range(levels):
        for j in range(nres):
            m[f"encoder.down.{i}.block.{j}"] = (f"encoder.down_blocks.{i}.resnets.{j}", VAE_RESNET)
        if i < levels - 1:
            m[f"encoder.down.{i}.downsample.conv"] = (f"encoder.down_blocks.{i}.downsamplers.0.conv", None)
    for u in range(levels):  # decoder.up is indexed by level; diffusers' up_blocks run from the deepest
        i = levels - 1 - u
        for j in range(nres + 1):
            m[f"decoder.up.{i}.block.{j}"] = (f"decoder.up_blocks.{u}.resnets.{j}", VAE_RESNET)
        if i > 0:
            m[f"decoder.up.{i}.upsample.conv"] = (f"decoder.up_blocks.{u}.upsamplers.0.conv", None)
    return m


def map_key(key: str, table: dict[str, tuple[str, dict | None]]) -> str | None:
    """The diffusers name of LDM parameter ``key`` (None if no module of ``table`` holds it)."""
    parts = key.split(".")
    for cut in range(len(parts) - 1, 0, -1):  # longest module prefix first
        hit = table.get(".".join(parts[:cut]))
        if hit is None:
            continue
        target, inner = hit
        rest = ".".join(parts[cut:])
        if inner is not None:
            sub = ".".join(parts[cut:-1])
            if sub not in inner:
                return None
            rest = f"{inner[sub]}.{parts[-1]}"
        return f"{target}.{rest}"
    return None


def convert_state(ldm: dict[str, Tensor], table: dict, what: str, conv_to_linear: bool = False) -> dict[str, Tensor]:
    """Rename every tensor of ``ldm`` (prefix already stripped); 1x1-conv attention weights become
    linear ones with ``conv_to_linear`` (the VAE's q/k/v/proj_out)."""
    out: dict[str, Tensor] = {}
    for key, value in ldm.items():
        name = map_key(key, table)
        if name is None:
            raise WeightsError(f"the checkpoint's {what} has a tensor '{key}' that no MVDream {what} layer holds; "
                               "it is not an MVDream sd-v2.1-base-4view checkpoint (or a differently configured one)")
        if name in out:
            raise WeightsError(f"two tensors of the checkpoint's {what} map to '{name}'")
        if conv_to_linear and ".attentions." in name and value.dim() == 4 and name.endswith("weight"):
            value = value[:, :, 0, 0]
        out[name] = value
    return out


# ---------------------------------------------------------------------------------------------
# Configs inferred from the tensors' shapes


def _count(state: dict, fmt: str) -> int:
    n = 0
    while any(k.startswith(fmt.format(n) + ".") for k in state):
        n += 1
    return n


def infer_unet_config(unet: dict[str, Tensor], num_head_channels: int) -> dict:
    """The diffusers config of an official-layout UNet state dict (keys without the prefix)."""
    try:
        mc, cin = unet["input_blocks.0.0.weight"].shape[:2]
        cout = unet["out.2.weight"].shape[0]
        cam = unet["camera_embed.0.weight"].shape[1]
        ctx = next(v.shape[1] for k, v in unet.items() if k.endswith("attn2.to_k.weight"))
    except (KeyError, StopIteration) as e:
        raise WeightsError(f"the checkpoint has no MVDream UNet tensor '{e}' under '{UNET_PREFIX}'; give the official "
                           "sd-v2.1-base-4view checkpoint") from None
    # input block k holds a resnet (k.0) whose output width gives the level; downsamplers hold `op`
    n_inputs = _count(unet, "input_blocks.{}")
    widths, downs, attn = [], [], []
    for k in range(1, n_inputs):
        if f"input_blocks.{k}.0.op.weight" in unet:
            downs.append(len(widths))
            continue
        widths.append(unet[f"input_blocks.{k}.0.out_layers.3.weight"].shape[0])
        attn.append(f"input_blocks.{k}.1.proj_in.weight" in unet)
    levels = len(downs) + 1
    nres = len(widths) // levels
    if nres * levels != len(widths):
        raise WeightsError("the checkpoint's UNet has levels with different numbers of res blocks; not an MVDream UNet")
    mult = [widths[level * nres] // mc for level in range(levels)]
    has_attn = [attn[level * nres] for level in range(levels)]
    depth = _count(unet, "input_blocks.1.1.transformer_blocks.{}") or 1
    linear = unet.get("middle_block.1.proj_in.weight", torch.zeros(1, 1)).dim() == 2
    return mvdream_unet_config(model_channels=mc, channel_mult=tuple(mult), num_res_blocks=nres,
                               attention_resolutions=tuple(2**lv for lv in range(levels) if has_attn[lv]),
                               num_head_channels=num_head_channels, context_dim=ctx, in_channels=cin,
                               out_channels=cout, camera_dim=cam, use_linear_in_transformer=linear,
                               transformer_depth=depth)


def infer_vae_config(vae: dict[str, Tensor]) -> dict:
    """The diffusers ``AutoencoderKL`` config of an LDM-layout VAE (keys without the prefix); LDM's
    VAE normalises with 32 groups everywhere."""
    try:
        levels = _count(vae, "encoder.down.{}")
        nres = _count(vae, "encoder.down.0.block.{}")
        widths = tuple(vae[f"encoder.down.{i}.block.0.conv1.weight"].shape[0] for i in range(levels))
        cin = vae["encoder.conv_in.weight"].shape[1]
        cout = vae["decoder.conv_out.weight"].shape[0]
        latent = vae["post_quant_conv.weight"].shape[0]
    except KeyError as e:
        raise WeightsError(f"the checkpoint has no VAE tensor '{e}' under '{VAE_PREFIX}'; give the official "
                           "sd-v2.1-base-4view checkpoint") from None
    return dict(in_channels=cin, out_channels=cout, latent_channels=latent, block_out_channels=widths,
                layers_per_block=nres, down_block_types=("DownEncoderBlock2D",) * levels,
                up_block_types=("UpDecoderBlock2D",) * levels, norm_num_groups=32, act_fn="silu", sample_size=256,
                scaling_factor=VAE_SCALING)


# ---------------------------------------------------------------------------------------------
# Reading and writing


def read_checkpoint(path: str | Path) -> tuple[dict[str, Tensor], dict]:
    """(tensors, metadata) of a ``.safetensors`` file or a PyTorch state dict (``.pt``/``.ckpt``/``.pth``,
    read with ``weights_only=True``: no pickled code runs)."""
    p = Path(path)
    if not p.is_file():
        raise WeightsError(f"'{path}' does not exist; download sd-v2.1-base-4view.pt from the MVDream/MVDream "
                           "repository on the Hugging Face hub and pass its path")
    try:
        if p.suffix == ".safetensors":
            from safetensors import safe_open  # noqa: PLC0415

            with safe_open(str(p), "pt") as f:
                return {k: f.get_tensor(k) for k in f.keys()}, dict(f.metadata() or {})
        state = torch.load(str(p), map_location="cpu", weights_only=True, mmap=True)
    except Exception as e:  # noqa: BLE001 - a truncated download or a foreign format: the same to a user
        raise WeightsError(f"cannot read '{path}' as a checkpoint ({e.__class__.__name__}); download it again") from None
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):  # a Lightning checkpoint
        state = state["state_dict"]
    if not isinstance(state, dict) or not all(isinstance(v, Tensor) for v in state.values()):
        raise WeightsError(f"'{path}' is not a state dict of tensors; give the official sd-v2.1-base-4view checkpoint")
    return state, {}


def _strip(state: dict[str, Tensor], prefix: str) -> dict[str, Tensor]:
    return {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}


def split_checkpoint(state: dict[str, Tensor]) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
    """(UNet, VAE) tensors of an official checkpoint, prefixes stripped."""
    unet, vae = _strip(state, UNET_PREFIX), _strip(state, VAE_PREFIX)
    if not unet:
        raise WeightsError(f"the checkpoint holds no tensor under '{UNET_PREFIX}'; give the official "
                           "sd-v2.1-base-4view checkpoint (LDM layout)")
    return unet, vae


def build_unet(unet: dict[str, Tensor], num_head_channels: int) -> MultiViewUNet:
    """A ``MultiViewUNet`` holding the official-layout ``unet`` tensors (keys without the prefix)."""
    config = infer_unet_config(unet, num_head_channels)
    state = convert_state(unet, unet_key_map(config), "UNet")
    with torch.device("meta"):
        model = MultiViewUNet(**config)
    _load(model, state, "UNet")
    return model


def build_vae(vae: dict[str, Tensor]):
    from diffusers import AutoencoderKL  # noqa: PLC0415

    config = infer_vae_config(vae)
    state = convert_state(vae, vae_key_map(config), "VAE", conv_to_linear=True)
    with torch.device("meta"):
        model = AutoencoderKL(**config)
    _load(model, state, "VAE")
    return model


def _load(model, state: dict[str, Tensor], what: str) -> None:
    ours = model.state_dict()
    unexpected = sorted(set(state) - set(ours))
    if unexpected:
        raise WeightsError(f"the checkpoint's {what} has {len(unexpected)} tensor(s) the model does not (e.g. "
                           f"'{unexpected[0]}'); it is not an MVDream sd-v2.1-base-4view checkpoint")
    missing = sorted(set(ours) - set(state))
    if missing:
        raise WeightsError(f"the checkpoint's {what} lacks {len(missing)} tensor(s) (e.g. '{missing[0]}'); the "
                           "download is incomplete or not sd-v2.1-base-4view")
    for k, v in state.items():
        if tuple(v.shape) != tuple(ours[k].shape):
            raise WeightsError(f"the checkpoint's {what} tensor for '{k}' has shape {tuple(v.shape)}, the model "
                               f"expects {tuple(ours[k].shape)}; check num_head_channels / the checkpoint")
    model.load_state_dict({k: v.contiguous() for k, v in state.items()}, assign=True)


def mvdream_schedule():
    """sd-v2-base.yaml's DDPM schedule: linear_start 0.00085, linear_end 0.012 on sqrt(beta) (diffusers'
    scaled_linear), 1000 steps, epsilon parameterisation."""
    from diffusers import DDPMScheduler  # noqa: PLC0415

    return DDPMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", num_train_timesteps=1000,
                         prediction_type="epsilon", clip_sample=False)


def check_schedule(state: dict[str, Tensor]) -> None:
    """LDM checkpoints carry their schedule as a buffer (``alphas_cumprod``): it must be the one we write."""
    if "alphas_cumprod" not in state:
        return
    ours = mvdream_schedule().alphas_cumprod.double()
    theirs = state["alphas_cumprod"].double().flatten()
    if theirs.shape != ours.shape or (theirs - ours).abs().max() > 1e-5:
        raise WeightsError("the checkpoint's noise schedule (alphas_cumprod) is not MVDream's scaled-linear "
                           "0.00085 -> 0.012 over 1000 steps; it is not an sd-v2.1-base-4view checkpoint")


def write_scheduler(out: Path) -> None:
    """The checkpoint's schedule (``mvdream_schedule``) as diffusers' scheduler config."""
    mvdream_schedule().save_pretrained(out)


def convert_mvdream(ckpt: str | Path, out: str | Path, text_from: str | None = None,
                    num_head_channels: int | None = None, dtype: torch.dtype | None = None) -> dict:
    """Write the folder described in the module docstring. ``num_head_channels``: None reads the
    checkpoint's ``unet_config`` metadata, else the official 64. ``dtype``: cast the weights (None keeps
    the checkpoint's). The folder appears at ``out`` only when complete (temp name, then rename)."""
    out = Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise WeightsError(f"'{out}' already exists and is not empty; give a new folder for the converted model")
    text_src = None
    if text_from is not None:
        from scalegen.text.clip import local_weights  # noqa: PLC0415

        text_src = Path(local_weights(text_from, "--text-from", ("tokenizer", "text_encoder")))
    state, meta = read_checkpoint(ckpt)
    if num_head_channels is None:
        num_head_channels = int(json.loads(meta["unet_config"]).get("num_head_channels", 64)) \
            if "unet_config" in meta else 64
    unet_sd, vae_sd = split_checkpoint(state)
    if not vae_sd:
        raise WeightsError(f"'{ckpt}' holds no VAE under '{VAE_PREFIX}'; give the full official checkpoint")
    check_schedule(state)
    unet, vae = build_unet(unet_sd, num_head_channels), build_vae(vae_sd)
    if dtype is not None:
        unet, vae = unet.to(dtype), vae.to(dtype)
    with atomic.staged_folder(out) as tmp:  # an interrupted conversion leaves no half folder at out
        unet.save_pretrained(tmp / "unet", safe_serialization=True)
        vae.save_pretrained(tmp / "vae", safe_serialization=True)
        write_scheduler(tmp / "scheduler")
        if text_src is not None:
            for sub in ("tokenizer", "text_encoder"):
                shutil.copytree(text_src / sub, tmp / sub)
    ignored = sorted({k.split(".")[0] for k in state if not k.startswith((UNET_PREFIX, VAE_PREFIX))})
    return {"out": str(out), "unet_params": sum(v.numel() for v in unet_sd.values()),
            "vae_params": sum(v.numel() for v in vae_sd.values()), "num_head_channels": num_head_channels,
            "text_tower": str(text_src) if text_src is not None else None, "ignored_prefixes": ignored,
            "skipped_text_tensors": sum(k.startswith(TEXT_PREFIX) for k in state)}


# ---------------------------------------------------------------------------------------------
# The inverse, for tiny test checkpoints in the official layout


def to_official_layout(unet: MultiViewUNet, vae) -> dict[str, Tensor]:
    """The official checkpoint's tensors (prefixed LDM names) of a ``MultiViewUNet`` and an
    ``AutoencoderKL``: the inverse of the maps above (1x1-conv attention weights in the VAE)."""
    out = {}
    for model, table, prefix, conv in ((unet, unet_key_map(unet.config), UNET_PREFIX, False),
                                       (vae, vae_key_map(vae.config), VAE_PREFIX, True)):
        ours = model.state_dict()
        inverse = {}
        for ldm_module, (target, inner) in table.items():
            for name in ours:
                if not name.startswith(target + "."):
                    continue
                rest = name[len(target) + 1:]
                if inner is not None:
                    sub, leaf = rest.rsplit(".", 1)
                    back = {v: k for k, v in inner.items()}
                    if sub not in back:
                        continue
                    rest = f"{back[sub]}.{leaf}"
                inverse[name] = f"{ldm_module}.{rest}"
        left = sorted(set(ours) - set(inverse))
        if left:
            raise ValueError(f"no official name for {left[:3]}")
        for name, ldm in inverse.items():
            v = ours[name].detach().clone()
            if conv and ".attentions." in name and name.endswith("weight") and v.dim() == 2:
                v = v[:, :, None, None]
            out[prefix + ldm] = v.contiguous()
    return out


# A tiny MVDream in the official layout: the architecture of the reference fixture
# (fixtures/tiny_mvdream_reference.safetensors) with a tiny LDM VAE (32 groups need 32 channels).
TINY_UNET = dict(image_size=8, in_channels=4, out_channels=4, model_channels=32, attention_resolutions=[2, 1],
                 num_res_blocks=1, channel_mult=[1, 2], num_head_channels=8, use_spatial_transformer=True,
                 use_linear_in_transformer=True, transformer_depth=1, context_dim=32, use_checkpoint=False,
                 legacy=False, camera_dim=16)


def make_tiny_mvdream(path: str | Path, seed: int = 0, context_dim: int = 32) -> Path:
    """Write a tiny random MVDream checkpoint in the official layout (``model.diffusion_model.*``,
    ``first_stage_model.*``) as safetensors, with its ``unet_config`` in the metadata like the
    reference fixture. ``context_dim`` must match the text tower it will be used with."""
    from diffusers import AutoencoderKL  # noqa: PLC0415
    from safetensors.torch import save_file  # noqa: PLC0415

    path = Path(path)
    cfg = dict(TINY_UNET, context_dim=context_dim)
    torch.manual_seed(seed)
    unet = MultiViewUNet(**mvdream_unet_config(
        model_channels=cfg["model_channels"], channel_mult=tuple(cfg["channel_mult"]),
        num_res_blocks=cfg["num_res_blocks"], attention_resolutions=tuple(cfg["attention_resolutions"]),
        num_head_channels=cfg["num_head_channels"], context_dim=context_dim, image_size=cfg["image_size"]))
    vae = AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(32, 32, 32, 32),
                        layers_per_block=1, down_block_types=("DownEncoderBlock2D",) * 4,
                        up_block_types=("UpDecoderBlock2D",) * 4, norm_num_groups=32, sample_size=64,
                        scaling_factor=VAE_SCALING)
    state = to_official_layout(unet, vae)
    state["alphas_cumprod"] = mvdream_schedule().alphas_cumprod.float()  # LDM stores its schedule as a buffer
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic.writing(path) as tmp:
        save_file(state, str(tmp), metadata={"unet_config": json.dumps(cfg),
                                             "description": "tiny random MVDream in the official layout (scalegen)"})
    return path


__all__ = ["convert_mvdream", "make_tiny_mvdream", "unet_key_map", "vae_key_map", "map_key", "infer_unet_config",
           "infer_vae_config", "read_checkpoint", "split_checkpoint", "build_unet", "build_vae", "to_official_layout"]
