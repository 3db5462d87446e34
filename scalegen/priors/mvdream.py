"""MVDream (sd-v2.1-base-4view) as a frozen prior: a camera-conditioned multi-view UNet that denoises
the F views of an object together, which removes most of the multi-face (Janus) problem.

What the trainer sees (``Prior`` interface, see ``base.py``):

* the model is a folder written by ``scalegen prior convert-mvdream`` (``unet/`` a ``MultiViewUNet``,
  ``vae/``, ``scheduler/``) with SD 2.1's ``tokenizer/`` and ``text_encoder/`` (OpenCLIP ViT-H; its
  ``last_hidden_state`` is the penultimate-layer embedding MVDream conditions on). Nothing is downloaded.
* ``encode(rgb)``: the render resized (bilinear) to ``encode_resolution`` (256, MVDream's training size),
  VAE-encoded with gradient to 32x32 latents (``vae_encode``, shared with Stable Diffusion).
* ``text_embeddings(prompts)``: ids; the UNet embeddings of the prompt itself (MVDream uses no
  view-dependent prompts; the camera says the view), computed once per prompt by the text tower that
  also conditions the generator when both are the same model, kept in an LRU (``PromptTable``).
* ``predict_eps(x_t, t, text, cameras, guidance)``: ONE UNet call for every row. Rows come as groups of
  ``num_frames`` contiguous views of one object (the distillers stack whole branches of B objects x F
  views, so every group lies inside one branch); a group shares its prompt and guidance role, and
  the UNet's self-attention runs over all its views. Unconditional rows use ``negative_prompt``;
  there is no Perp-Neg, so ``guidance.pairs`` need no extra branches.

Cameras are converted inside this adapter only (``mvdream_camera``): our camera-to-world matrices
(z-up world, OpenGL camera axes) are already in MVDream's "blender" frame (MVDream's azimuth is ours
+ 90 degrees, which the matrices absorb), so the conversion is the reference's: translation scaled to
unit length, the 4x4 matrix flattened row-major to 16 numbers.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import Tensor

from scalegen.data.cameras import Cameras
from scalegen.errors import WeightsError
from scalegen.priors.base import T, Guidance, Prior
from scalegen.priors.latent import DTYPES, vae_decode, vae_encode, weights_dtype  # noqa: F401 - DTYPES re-exported
from scalegen.priors.text_cache import PromptTable
from scalegen.text.clip import same_model

CONVERT = ("run `scalegen prior convert-mvdream sd-v2.1-base-4view.pt DIR --text-from SD21_BASE_DIR` "
           "(docs/sd-mvdream.md, \"MVDream runs\") and set prior.model=DIR")


def mvdream_camera(c2w: Tensor) -> Tensor:
    """MVDream's camera condition of camera-to-world matrices [N, 4, 4]: translation normalised to
    unit length (the reference's ``normalize_camera``), flattened to [N, 16]."""
    m = c2w.float().clone()
    m[:, :3, 3] = m[:, :3, 3] / (m[:, :3, 3].norm(dim=-1, keepdim=True) + 1e-8)
    return m.reshape(-1, 16)


def check_folder(model: str) -> Path:
    """The converted MVDream folder ``model``, or a one-line error saying how to make one."""
    path = Path(model)
    if not path.is_dir():
        raise WeightsError(f"prior.model='{model}' is not a folder; MVDream loads a converted checkpoint: {CONVERT}")
    missing = [s for s in ("unet", "vae", "scheduler") if not (path / s).is_dir()]
    if missing:
        raise WeightsError(f"'{model}' (prior.model) has no {'/, '.join(missing)}/ folder; {CONVERT}")
    try:
        unet_cfg = json.loads((path / "unet" / "config.json").read_text())
    except (OSError, ValueError):
        raise WeightsError(f"'{model}/unet/config.json' is missing or unreadable; {CONVERT}") from None
    if unet_cfg.get("class_embed_type") != "projection" or unet_cfg.get("projection_class_embeddings_input_dim") != 16:
        raise WeightsError(f"'{model}/unet' is a UNet without MVDream's camera embedding (a Stable Diffusion "
                           f"folder?); {CONVERT}")
    return path


class MVDreamPrior(Prior):
    def __init__(self, model: str, text_encoder=None, device: str | torch.device = "cpu", dtype: str = "fp16",
                 channels_last: bool = True, compile: bool = False, encode_resolution: int = 256,
                 latent_resolution: int = 32, negative_prompt: str = "", num_frames: int = 4,
                 text_cache_size: int = 1024):
        from diffusers import AutoencoderKL, DDPMScheduler  # noqa: PLC0415 - [sd] extra

        from scalegen.priors.mvdream_unet import MultiViewUNet  # noqa: PLC0415

        self.device = torch.device(device)
        self.dtype = weights_dtype(dtype, self.device)
        path = check_folder(model)
        kw = {"local_files_only": True}
        try:
            self.scheduler = DDPMScheduler.from_pretrained(path, subfolder="scheduler", **kw)
            unet = MultiViewUNet.from_pretrained(path, subfolder="unet", torch_dtype=self.dtype, **kw)
            vae = AutoencoderKL.from_pretrained(path, subfolder="vae", torch_dtype=self.dtype, **kw)
        except Exception as e:  # noqa: BLE001 - many loader exceptions mean the same to a user
            raise WeightsError(f"cannot load the MVDream model from '{model}' ({e.__class__.__name__}: the files are "
                               f"there but unreadable); convert it again: {CONVERT}") from None
        if self.scheduler.config.num_train_timesteps != T or self.scheduler.config.prediction_type != "epsilon":
            raise WeightsError(f"'{model}/scheduler' is not MVDream's ({T}-step DDPM, epsilon prediction); {CONVERT}")
        self.alphas_cumprod = self.scheduler.alphas_cumprod.float().clone()
        self.unet = unet.to(self.device).eval().requires_grad_(False)
        self.vae = vae.to(self.device).eval().requires_grad_(False)
        if channels_last:
            self.unet.to(memory_format=torch.channels_last)
        self.channels_last = channels_last
        self._unet_fn = torch.compile(self.unet) if compile else self.unet
        self.latent_channels = self.unet.config.in_channels
        self.scaling = float(self.vae.config.scaling_factor or 0.18215)
        self.encode_resolution, self.latent_resolution = encode_resolution, latent_resolution
        self.num_frames = num_frames

        if text_encoder is None:
            from scalegen.text.clip import CLIPTextEncoder  # noqa: PLC0415

            text_encoder = CLIPTextEncoder(str(path), device=self.device, key="prior.model")
        if text_encoder.dim != self.unet.config.cross_attention_dim:
            raise WeightsError(f"the text encoder's width {text_encoder.dim} does not match the MVDream UNet's "
                               f"context width {self.unet.config.cross_attention_dim}; the text tower must be "
                               "Stable Diffusion 2.1's (copy its tokenizer/ and text_encoder/ into prior.model)")
        self.text_encoder = text_encoder
        self.negative_prompt = negative_prompt
        self.uncond_tokens = self._encode_strings([negative_prompt])[0]  # [L, D]
        self.table = PromptTable(self._encode_strings, lambda p: [p], text_cache_size)
        self.n_calls = 0  # predict_eps calls

    # --- image space <-> latents -----------------------------------------------------------------
    def encode(self, rgb: Tensor) -> Tensor:
        """rgb [N, 3, h, w] in [0, 1] -> latents [N, 4, latent_resolution, latent_resolution] (with grad)."""
        return vae_encode(self.vae, rgb, self.encode_resolution, self.latent_resolution, self.scaling, self.dtype)

    def decode(self, latents: Tensor) -> Tensor:
        return vae_decode(self.vae, latents, self.scaling, self.dtype)

    # --- text --------------------------------------------------------------------------------------
    def _encode_strings(self, strings: list[str]) -> Tensor:
        return self.text_encoder.encode(strings).tokens.to(self.device, self.dtype)

    def text_embeddings(self, prompts: list[str], tokens: Tensor | None = None) -> Tensor:
        """Ids of ``prompts`` (long [B]); ``tokens`` [B, 1, L, D]: their precomputed embeddings (shards)."""
        ids = self.table.ids(prompts)
        if tokens is not None:
            if tokens.dim() != 4 or tokens.shape[:2] != (len(prompts), 1):
                raise WeightsError(f"precomputed text embeddings have shape {tuple(tokens.shape)}, expected "
                                   f"[{len(prompts)}, 1, L, D] (the prompt's own)")
            self.table.put(ids, tokens.to(self.device, self.dtype))
        else:
            self.table.lookup(ids)
        return torch.tensor(ids, dtype=torch.long)

    def stored_tokens(self, info: dict):
        """Shards built by this prior's own text tower carry the prompt's embeddings (``plain``, and
        ``views`` which holds them too)."""
        if info.get("id") == self.text_encoder.id and info.get("store") in ("plain", "views"):
            return "plain"
        return None

    @property
    def n_text_encodes(self) -> int:
        return self.table.n_encodes

    # --- the denoiser ------------------------------------------------------------------------------
    @torch.no_grad()
    def predict_eps(self, x_t: Tensor, t: Tensor, text: Tensor, cameras: Cameras,
                    guidance: Guidance | None = None) -> Tensor:
        self.n_calls += 1
        n, f = x_t.shape[0], self.num_frames
        guidance = guidance or Guidance.all_conditional(n)
        text, uncond = text.cpu(), guidance.uncond.cpu()
        c2w = cameras.rows().c2w.reshape(-1, 4, 4)
        if c2w.shape[0] != n or text.shape[0] != n or uncond.shape[0] != n:
            raise ValueError(f"predict_eps got {n} rows but {c2w.shape[0]} cameras, {text.shape[0]} text rows and "
                             f"{uncond.shape[0]} guidance rows")
        if n % f:
            raise ValueError(f"{n} rows do not split into objects of {f} views")
        groups_text, groups_uncond = text.view(-1, f), uncond.view(-1, f)
        if (groups_text != groups_text[:, :1]).any() or (groups_uncond != groups_uncond[:, :1]).any():
            raise ValueError(f"each group of {f} contiguous rows (the views of one object) must share its prompt "
                             "and its conditional/unconditional role")
        table = self.table.lookup(text[~uncond].tolist())
        emb = self.uncond_tokens.expand(n, *self.uncond_tokens.shape).clone()
        for i in (~uncond).nonzero().flatten().tolist():
            emb[i] = table[int(text[i])][0]
        x = x_t.to(self.device, self.dtype)
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        camera = mvdream_camera(c2w).to(self.device, self.dtype)
        eps = self._unet_fn(x, t.to(self.device), emb, camera, num_frames=f).sample
        return eps.float().contiguous().to(x_t.device, x_t.dtype)


def build_mvdream_prior(cfg, text_encoder=None, device=None) -> MVDreamPrior:
    """The prior of ``cfg.prior``; reuses ``text_encoder`` when it is the same CLIP tower
    (``text.encoder=clip`` with ``text.model`` unset or = ``prior.model``), so it is loaded once."""
    p = cfg.prior
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    share = text_encoder is not None and cfg.text.encoder == "clip" and same_model(cfg.text_model(), p.model)
    encode_resolution, latent_resolution = p.resolutions()
    return MVDreamPrior(p.model, text_encoder=text_encoder if share else None, device=device, dtype=p.dtype,
                        channels_last=p.channels_last, compile=p.compile, encode_resolution=encode_resolution,
                        latent_resolution=latent_resolution, negative_prompt=p.negative_prompt,
                        num_frames=cfg.camera.views_per_group(), text_cache_size=p.text_cache_size)


__all__ = ["MVDreamPrior", "build_mvdream_prior", "mvdream_camera", "check_folder"]
