"""The learned prior: a small diffusers UNet trained on the oracle world's ground-truth renders.

The oracle prior (oracle.py) is exact; a real prior is not, and its errors (an inexact unconditional,
over-saturation under high CFG, a denoiser that has not seen a view) are what ASD, VSD and VDM were
invented for. This prior is a real, trained diffusion model whose truth is known: a pixel-space
``UNet2DConditionModel`` trained by `scalegen prior train-learned` (train/learned_prior.py) on renders of
the world's training prompts from the training camera distribution, conditioned on the world's own text
encoder (the bag of words), with 10% condition dropout for classifier-free guidance, on Stable Diffusion's
noise schedule (DDPM, T = 1000, scaled_linear betas 0.00085 -> 0.012, epsilon prediction), so every
distiller runs on it unchanged.

Folder layout (diffusers'; loaded with ``from_pretrained``, never unpickled)::

    DIR/unet/                  UNet2DConditionModel (config.json + diffusion_pytorch_model.safetensors)
    DIR/scheduler/             DDPMScheduler config
    DIR/text_encoder/config.json   the bag-of-words encoder's settings (it has no weights)
    DIR/learned_prior.json     what it was trained on: the world, cameras, renderer, resolution, steps
    DIR/model_index.json       the components, as a diffusers pipeline folder names them

Like the oracle: pixel space (``z = 2 rgb - 1``), renders at the model's own resolution; text handles
are prompt ids whose token embeddings [L, D] are computed once; the unconditional (and the 10% dropped
condition in training) is the all-zero token set, the bag of words' "no words". It is conditioned on
the prompt only (Stable-Diffusion-like: it does not know the view). ``denoiser_net`` exposes the UNet
so VSD puts its LoRA on it, and ``ground_truth`` is the world it was trained on, so a run distilled
from it is scored against the truth like an oracle run.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import Tensor

from scalegen import atomic
from scalegen.data.cameras import Cameras
from scalegen.errors import ConfigError, WeightsError
from scalegen.priors.base import T, DenoiserNet, Guidance, Prior
from scalegen.priors.text_cache import PromptTable
from scalegen.priors.world import GroundTruth, World
from scalegen.text.bow import BagOfWordsEncoder

INFO_FILE = "learned_prior.json"
BANK_FILE = "bank.safetensors"  # the training renders (rgb, opacity, prompt, c2w, fovy): the data distribution
# UNet sizes (``preset``): "small" is the default world's model (3.9M parameters at 32 px with the
# bag of words' 128-wide tokens; cross-attention at 8x8 and in the middle only, where it is cheap on a CPU);
# "tiny" is for tests (seconds).
UNET_PRESETS: dict[str, dict] = {
    "small": dict(block_out_channels=(32, 64, 128), layers_per_block=1,
                  down_block_types=("DownBlock2D", "DownBlock2D", "CrossAttnDownBlock2D"),
                  up_block_types=("CrossAttnUpBlock2D", "UpBlock2D", "UpBlock2D"), attention_head_dim=4),
    "tiny": dict(block_out_channels=(32, 32), layers_per_block=1,
                 down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
                 up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), attention_head_dim=2),
}


def unet_config(preset: str, resolution: int, text_dim: int) -> dict:
    """``UNet2DConditionModel`` keyword arguments of a pixel-space (3-channel) model of ``preset``."""
    if preset not in UNET_PRESETS:
        raise ConfigError(f"unknown learned-prior size {preset!r}; choose {' or '.join(UNET_PRESETS)}")
    return dict(sample_size=resolution, in_channels=3, out_channels=3, cross_attention_dim=text_dim,
                norm_num_groups=32, use_linear_projection=True, **UNET_PRESETS[preset])


def sd_scheduler():
    """Stable Diffusion's training noise schedule as a diffusers DDPMScheduler (T = 1000, scaled_linear
    betas 0.00085 -> 0.012, epsilon prediction): the one ``base.ddpm_alphas_cumprod`` computes."""
    from diffusers import DDPMScheduler  # noqa: PLC0415 - the [sd] extra

    return DDPMScheduler(num_train_timesteps=T, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                         prediction_type="epsilon", clip_sample=False)


def read_info(model: str | Path) -> dict:
    """``learned_prior.json`` of a learned-prior folder, or a one-line error saying what the folder lacks."""
    path = Path(model)
    if not path.is_dir():
        raise WeightsError(f"prior.model='{model}' is not a folder; prior.name=learned loads a folder written by "
                           "`scalegen prior train-learned --out DIR`")
    missing = [s for s in ("unet", "scheduler") if not (path / s).is_dir()] + \
              ([INFO_FILE] if not (path / INFO_FILE).is_file() else [])
    if missing:
        raise WeightsError(f"'{model}' (prior.model) has no {', '.join(missing)}: it is not a learned prior (or its "
                           "training has not written one yet); train one with `scalegen prior train-learned --out DIR`")
    try:
        return json.loads((path / INFO_FILE).read_text())
    except ValueError as e:
        raise WeightsError(f"'{path / INFO_FILE}' is not valid JSON ({e}); train the prior again") from None


def text_encoder_of(info: dict) -> BagOfWordsEncoder:
    """The bag-of-words encoder a learned prior was trained with (its settings are in the folder)."""
    t = info["text"]
    return BagOfWordsEncoder(dim=int(t["dim"]), max_tokens=int(t["max_tokens"]), word_order=t["word_order"])


def config_of(info: dict, overrides: list[str] | None = None):
    """The Config of the world a learned prior was trained in (world, camera, render, text, oracle renderer)."""
    from scalegen.config import compose_config  # noqa: PLC0415

    t = info["text"]
    layer = {"world": info["world"], "camera": info["camera"], "render": info["render"],
             "text": {"encoder": "bow", "dim": t["dim"], "max_tokens": t["max_tokens"], "word_order": t["word_order"]},
             "prior": {"oracle": dict(info["oracle_renderer"])}}
    return compose_config([layer], overrides)


def load_bank(model: str | Path) -> dict[str, Tensor]:
    """The training renders of a learned prior's folder (``BANK_FILE``)."""
    from safetensors.torch import load_file  # noqa: PLC0415

    path = Path(model) / BANK_FILE
    try:
        return load_file(str(path))
    except Exception as e:  # noqa: BLE001 - missing or unreadable: the same to a user
        raise WeightsError(f"'{path}' is missing or unreadable ({e.__class__.__name__}); `scalegen prior "
                           "train-learned` renders it again when it is deleted (with checkpoints/)") from None


class LearnedPrior(Prior):
    latent_channels = 3

    def __init__(self, model: str | Path, world: World | None = None, renderer=None, text_encoder=None,
                 device: str | torch.device = "cpu", text_cache_size: int = 1024):
        from diffusers import DDPMScheduler, UNet2DConditionModel  # noqa: PLC0415 - the [sd] extra

        self.info = read_info(model)
        self.device = torch.device(device)
        try:
            self.scheduler = DDPMScheduler.from_pretrained(model, subfolder="scheduler", local_files_only=True)
            unet = UNet2DConditionModel.from_pretrained(model, subfolder="unet", local_files_only=True)
        except Exception as e:  # noqa: BLE001 - any loader failure means the same to a user
            raise WeightsError(f"cannot load the learned prior in '{model}' ({e.__class__.__name__}: its files are "
                               "there but unreadable); train it again with `scalegen prior train-learned`") from None
        sc = self.scheduler.config
        if sc.num_train_timesteps != T or sc.prediction_type != "epsilon":
            raise WeightsError(f"'{model}' has a {sc.num_train_timesteps}-step {sc.prediction_type} schedule; the learned "
                               f"prior predicts epsilon on T = {T} steps (Stable Diffusion's schedule)")
        self.alphas_cumprod = self.scheduler.alphas_cumprod.float().clone()
        self.unet = unet.to(self.device).eval().requires_grad_(False)
        self.resolution = int(self.unet.config.sample_size)
        own = text_encoder_of(self.info)
        if text_encoder is not None and text_encoder.id != own.id:
            raise WeightsError(f"the run's text encoder ({text_encoder.id}) is not the one the learned "
                               f"prior in '{model}' was trained with ({own.id}); set text.* as in its {INFO_FILE}")
        self.text_encoder = own
        self.null = torch.zeros(own.max_tokens, own.dim, device=self.device)  # the unconditional: no words
        self.table = PromptTable(self._encode_strings, lambda p: [p], text_cache_size)
        self.world, self.renderer = world, renderer
        self.n_calls = 0

    # --- image space -------------------------------------------------------------------------------
    def encode(self, rgb: Tensor) -> Tensor:
        if rgb.shape[-2:] != (self.resolution, self.resolution):
            raise ConfigError(f"the learned prior denoises {self.resolution}x{self.resolution} images, got renders of "
                              f"{rgb.shape[-2]}x{rgb.shape[-1]}; set camera.resolution={self.resolution}")
        return rgb * 2.0 - 1.0

    def decode(self, latents: Tensor) -> Tensor:
        return (latents + 1.0) * 0.5

    # --- text --------------------------------------------------------------------------------------
    def _encode_strings(self, strings: list[str]) -> Tensor:
        return self.text_encoder.encode(strings).tokens.to(self.device)

    def text_embeddings(self, prompts: list[str], tokens: Tensor | None = None) -> Tensor:
        """Prompt ids (long [B]); their token embeddings are computed once per prompt."""
        ids = self.table.ids(prompts)
        self.table.lookup(ids)
        return torch.tensor(ids, dtype=torch.long)

    def embed(self, text: Tensor, uncond: Tensor | None = None) -> Tensor:
        """UNet conditions [N, L, D] of prompt ids ``text``; rows with ``uncond`` True get the null condition."""
        table = self.table.lookup(text.tolist())
        emb = torch.stack([table[int(i)][0] for i in text.tolist()]) if len(text) else self.null[None][:0]
        if uncond is not None and bool(uncond.any()):
            emb = torch.where(uncond.to(self.device).view(-1, 1, 1), self.null, emb)
        return emb

    # --- the denoiser ------------------------------------------------------------------------------
    def denoiser_net(self) -> DenoiserNet:
        return DenoiserNet(self.unet, embed=self.embed, to_eps=lambda out, x, t: out, device=self.device)

    def ground_truth(self) -> GroundTruth | None:
        """The world it was trained on (given by the builder), so its runs are scored against the truth."""
        return GroundTruth(self.world, self.renderer) if self.world is not None else None

    @torch.no_grad()
    def predict_eps(self, x_t: Tensor, t: Tensor, text: Tensor, cameras: Cameras,
                    guidance: Guidance | None = None) -> Tensor:
        """One UNet call for every row; unconditional rows get the null condition."""
        self.n_calls += 1
        n = x_t.shape[0]
        guidance = guidance or Guidance.all_conditional(n)
        emb = self.embed(text.cpu(), guidance.uncond.cpu())
        out = self.unet(x_t.to(self.device).float(), t.to(self.device), encoder_hidden_states=emb).sample
        return out.float().to(x_t.device, x_t.dtype)


def check_world(cfg, info: dict, model: str) -> None:
    """A run distilling from a learned prior is in the world the prior was trained on: the same world,
    text encoder and render size; anything else is refused with the keys that differ."""
    from dataclasses import asdict  # noqa: PLC0415

    want = info.get("world", {})
    now = asdict(cfg.world)
    diff = sorted(k for k in set(want) | set(now) if want.get(k) != now.get(k))
    if diff:
        raise WeightsError(f"the learned prior in '{model}' was trained on another world (world.{diff[0]}: "
                           f"{want.get(diff[0])!r}, this run: {now.get(diff[0])!r}); use the world config it was "
                           "trained with (its learned_prior.json)")
    if cfg.text.encoder != "bow":
        raise ConfigError("prior.name=learned is conditioned on the world's bag of words: set text.encoder=bow")
    res = int(info.get("resolution", 0))
    sizes = [cfg.camera.resolution] + [int(r) for _, r, _ in cfg.camera.resolution_milestones]
    if any(s != res for s in sizes):
        raise ConfigError(f"the learned prior in '{model}' denoises {res}x{res} renders; set camera.resolution={res} "
                          "(and no resolution_milestones of another size)")


def build_learned_prior(cfg, world: World, renderer, text_encoder=None, device=None) -> LearnedPrior:
    """The prior of ``prior.name=learned``, ``prior.model=DIR``, in the run's world (``check_world``)."""
    model = cfg.prior.model
    info = read_info(model)
    check_world(cfg, info, model)
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    return LearnedPrior(model, world=world, renderer=renderer, text_encoder=text_encoder, device=device,
                        text_cache_size=cfg.prior.text_cache_size)


def write_learned(out: str | Path, unet, info: dict) -> Path:
    """Write (or replace) a learned prior's folder: ``unet`` (a UNet2DConditionModel), the scheduler, the
    text encoder's settings, ``info`` (written last) and model_index.json, each part atomically
    (``scalegen.atomic``), so a reader never loads half a UNet."""
    import diffusers  # noqa: PLC0415

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    with atomic.staged_folder(out / "unet", overwrite=True) as stage:
        unet.save_pretrained(stage, safe_serialization=True)
    with atomic.staged_folder(out / "scheduler", overwrite=True) as stage:
        sd_scheduler().save_pretrained(stage)
    (out / "text_encoder").mkdir(exist_ok=True)
    atomic.write_json(out / "text_encoder" / "config.json", {"encoder": "bow", **info["text"]}, indent=1)
    atomic.write_json(out / "model_index.json", {
        "_class_name": "ScalegenLearnedPrior", "_diffusers_version": diffusers.__version__,
        "unet": ["diffusers", "UNet2DConditionModel"], "scheduler": ["diffusers", "DDPMScheduler"],
        "text_encoder": ["scalegen", "BagOfWordsEncoder"]}, indent=1)
    atomic.write_json(out / INFO_FILE, info, indent=1)
    return out


__all__ = ["BANK_FILE", "INFO_FILE", "LearnedPrior", "config_of", "load_bank", "UNET_PRESETS", "build_learned_prior", "check_world", "read_info", "sd_scheduler",
           "text_encoder_of", "unet_config", "write_learned"]
