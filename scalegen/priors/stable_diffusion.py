"""Stable Diffusion (2.1-base by default) as a frozen prior, through diffusers.

What the trainer sees (``Prior`` interface, see ``base.py``):

* ``encode(rgb)``: the reference path of ScaleDreamer/threestudio: bilinear upsample of the render
  to ``encode_resolution`` (512), ``2 rgb - 1``, VAE encode WITH grad (a posterior sample), times
  the VAE's ``scaling_factor`` (0.18215). Gradients reach the render only through the VAE
  encoder's activations (the VAE's weights are frozen). ``encode_resolution=256`` is the cheap
  option: 4x fewer VAE FLOPs, latents 32x32 upsampled (bilinear) to ``latent_resolution`` for the
  UNet; it loses latent detail above 32x32 (docs/results/flops-sd.json has the numbers).
* ``text_embeddings(prompts)``: integer ids (one per prompt, stable for the prior's life). The
  UNet embeddings behind an id (the prompt itself and, with view-dependent prompting, its 4
  variants ``view_prompt(p, v)`` for ``v`` in ``VIEWS``) are computed once per prompt by the SAME
  ``CLIPTextEncoder`` that conditions the generator and kept in an LRU on the device; an evicted
  prompt is re-encoded on its next use. Precomputed embeddings (shards built by the same tower,
  ``stored_tokens``) go in through ``text_embeddings(prompts, tokens=...)``.
* ``predict_eps(x_t, t, text, cameras, guidance)``: ONE UNet call for every row. Unconditional rows
  (``guidance.uncond``) use ``negative_prompt``; each conditional row's embedding is chosen from
  its camera: threestudio's view-dependent prompting (front if
  ``|azimuth| < front_threshold``, back if ``|azimuth| > 180 - back_threshold``, overhead if
  ``elevation > overhead_threshold``, else side; azimuth 0 is +x, counter-clockwise from above).

Perp-Neg (Armandpour et al. 2023, as in threestudio/ScaleDreamer), with ``perp_neg > 0``. The
positive embedding interpolates between views by azimuth: ``|az| < 90``: ``r = 1 - |az|/90``,
``pos = r front + (1 - r) side``, negatives (front, side) with weights ``f_fs(r), f_sf(1 - r)``;
else ``r = 2 - |az|/90``, ``pos = r side + (1 - r) back``, negatives (side, front) with weights
``f_sb(r), f_fsb(r)``; overhead rows use the overhead prompt and no negatives. ``f(r) = a e^(-b r) + c``
and each weight is ``w = -perp_neg * f(r)``. Perp-Neg applies to the conditional rows of the
caller's CFG pairs (``guidance.pairs``; ASD's ``cond @ t+dt`` is not paired and stays plain). For
a paired row the prior appends its two negative branches to the same UNet batch and returns

    eps_c' = eps_c + sum_i w_i perp(eps_neg_i - eps_u, eps_c - eps_u),
    perp(x, y) = x - (<x, y> / max(<y, y>, 1e-6)) y            (per image)

so any distiller's CFG ``eps_u + s (eps_c' - eps_u)`` is exactly Perp-Neg guidance
``eps_u + s (e_pos + sum_i w_i perp(...))``: SDS/ASD stay prior-agnostic and a step is still one
UNet forward (ASD: cond@t, uncond@t, 2 negatives@t, cond@t+dt = 5 branches).
"""
from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import Tensor

from scalegen.data.cameras import Cameras
from scalegen.errors import WeightsError
from scalegen.priors.base import T, DenoiserNet, Guidance, Prior
from scalegen.priors.latent import DTYPES, vae_decode, vae_encode, weights_dtype  # noqa: F401 - DTYPES re-exported
from scalegen.priors.text_cache import PromptTable
from scalegen.priors.views import (BACK, FRONT, OVERHEAD, PERP_NEG_F, SIDE, exp_decay, perp_neg_plan,  # noqa: F401
                                   perpendicular, shift_azimuth, view_index)
from scalegen.text.base import VIEWS, view_prompt
from scalegen.text.clip import local_weights, same_model

# The published config of stabilityai/stable-diffusion-2-1-base's unet/config.json (benchmarks build it on meta).
SD21_BASE_UNET = dict(
    sample_size=64, in_channels=4, out_channels=4, layers_per_block=2, block_out_channels=(320, 640, 1280, 1280),
    down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    cross_attention_dim=1024, attention_head_dim=(5, 10, 20, 20), use_linear_projection=True, norm_num_groups=32,
    act_fn="silu", flip_sin_to_cos=True, freq_shift=0, downsample_padding=1, mid_block_scale_factor=1,
)
# ---------------------------------------------------------------------------------------------
# Loading


def _load_error(model: str, what: str, err: Exception) -> WeightsError:
    return WeightsError(f"cannot load the Stable Diffusion {what} from '{model}' ({err.__class__.__name__}: the files "
                        "are there but unreadable); download the model again (`huggingface-cli download "
                        "stabilityai/stable-diffusion-2-1-base --local-dir DIR`) and set prior.model=DIR")


class StableDiffusionPrior(Prior):
    def __init__(self, model: str = "stabilityai/stable-diffusion-2-1-base", text_encoder=None,
                 device: str | torch.device = "cpu", dtype: str = "fp16", channels_last: bool = True,
                 compile: bool = False, encode_resolution: int = 512, latent_resolution: int = 64,
                 negative_prompt: str = "", view_dependent: bool = True, front_threshold: float = 30.0,
                 back_threshold: float = 30.0, overhead_threshold: float = 60.0, perp_neg: float = 0.0,
                 perp_neg_f: dict | None = None, text_cache_size: int = 1024):
        from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel  # noqa: PLC0415 - [sd] extra

        self.device = torch.device(device)
        # Half precision on CPU is slow or unsupported for some kernels: CPU runs use fp32.
        self.dtype = weights_dtype(dtype, self.device)
        path = local_weights(model, "prior.model", ("unet", "vae", "scheduler"))
        kw = {"local_files_only": True}
        try:
            self.scheduler = DDPMScheduler.from_pretrained(path, subfolder="scheduler", **kw)
        except Exception as e:  # noqa: BLE001 - many loader exceptions mean the same to a user
            raise _load_error(model, "noise schedule", e) from None
        try:
            unet = UNet2DConditionModel.from_pretrained(path, subfolder="unet", torch_dtype=self.dtype, **kw)
        except Exception as e:  # noqa: BLE001
            raise _load_error(model, "UNet", e) from None
        try:
            vae = AutoencoderKL.from_pretrained(path, subfolder="vae", torch_dtype=self.dtype, **kw)
        except Exception as e:  # noqa: BLE001
            raise _load_error(model, "VAE", e) from None
        if self.scheduler.config.num_train_timesteps != T:
            raise WeightsError(f"'{model}' has a {self.scheduler.config.num_train_timesteps}-step noise schedule; "
                               f"scalegen's timestep schedules assume T = {T} (Stable Diffusion's)")
        self.prediction_type = self.scheduler.config.prediction_type
        if self.prediction_type not in ("epsilon", "v_prediction"):
            raise WeightsError(f"'{model}' predicts {self.prediction_type!r}; scalegen supports epsilon and "
                               "v_prediction Stable Diffusion models")
        self.alphas_cumprod = self.scheduler.alphas_cumprod.float().clone()
        # Frozen: eval mode, no parameter needs a gradient (the VAE still passes gradients to its input).
        self.unet = unet.to(self.device).eval().requires_grad_(False)
        self.vae = vae.to(self.device).eval().requires_grad_(False)
        if channels_last:
            self.unet.to(memory_format=torch.channels_last)
        self.channels_last = channels_last
        self._unet_fn = torch.compile(self.unet) if compile else self.unet
        self.latent_channels = self.unet.config.in_channels
        self.scaling = float(getattr(self.vae.config, "scaling_factor", None) or 0.18215)
        self.encode_resolution, self.latent_resolution = encode_resolution, latent_resolution

        if text_encoder is None:
            from scalegen.text.clip import CLIPTextEncoder  # noqa: PLC0415

            text_encoder = CLIPTextEncoder(model, device=self.device, key="prior.model")
        if text_encoder.dim != self.unet.config.cross_attention_dim:
            raise WeightsError(f"the text encoder's width {text_encoder.dim} does not match the UNet's "
                               f"cross_attention_dim {self.unet.config.cross_attention_dim}; set text.model to the "
                               "same folder as prior.model")
        self.text_encoder = text_encoder
        self.view_dependent = view_dependent
        self.thresholds = (front_threshold, back_threshold, overhead_threshold)
        self.perp_neg, self.perp_neg_f = perp_neg, {**PERP_NEG_F, **(perp_neg_f or {})}
        self.negative_prompt = negative_prompt
        self.uncond_tokens = self._encode_strings([negative_prompt])[0]  # [L, D]
        self.table = PromptTable(self._encode_strings, self._variants, text_cache_size)
        self.n_calls = 0  # predict_eps calls

    # --- image space <-> latents ---------------------------------------------------------------
    def encode(self, rgb: Tensor) -> Tensor:
        """rgb [N, 3, h, w] in [0, 1] -> latents [N, 4, latent_resolution, latent_resolution] (with grad)."""
        return vae_encode(self.vae, rgb, self.encode_resolution, self.latent_resolution, self.scaling, self.dtype)

    def decode(self, latents: Tensor) -> Tensor:
        return vae_decode(self.vae, latents, self.scaling, self.dtype)

    # --- text ------------------------------------------------------------------------------------
    def _encode_strings(self, strings: list[str]) -> Tensor:
        return self.text_encoder.encode(strings).tokens.to(self.device, self.dtype)

    def _variants(self, prompt: str) -> list[str]:
        """The strings whose embeddings stand behind a prompt id: the prompt itself, then (with
        view-dependent prompting) ``view_prompt(prompt, v)`` for ``v`` in ``VIEWS``; the layout of
        shards built with ``--store views``."""
        return [prompt] + ([view_prompt(prompt, v) for v in VIEWS] if self.view_dependent else [])

    def text_embeddings(self, prompts: list[str], tokens: Tensor | None = None) -> Tensor:
        """Ids of ``prompts`` (long [B]); their UNet embeddings are computed now (once per prompt)
        unless cached. ``tokens`` [B, K, L, D] are precomputed embeddings of ``_variants(prompt)``
        (K = 5 with view-dependent prompting, else 1), e.g. read from shards."""
        ids = self.table.ids(prompts)
        if tokens is not None:
            k = 1 + len(VIEWS) if self.view_dependent else 1
            if tokens.dim() != 4 or tokens.shape[:2] != (len(prompts), k):
                raise WeightsError(f"precomputed text embeddings have shape {tuple(tokens.shape)}, expected "
                                   f"[{len(prompts)}, {k}, L, D] (the prompt{', then views ' if k > 1 else ''}"
                                   f"{VIEWS if k > 1 else ''})")
            self.table.put(ids, tokens.to(self.device, self.dtype))
        else:
            self.table.lookup(ids)
        return torch.tensor(ids, dtype=torch.long)

    def stored_tokens(self, info: dict):
        """Shards built by this prior's own text tower carry the embeddings it needs: all variants
        (``store=views``) with view-dependent prompting, the prompt's (``plain`` or ``views``) without."""
        if info.get("id") != self.text_encoder.id or info.get("store") not in ("plain", "views"):
            return None
        if self.view_dependent:
            return "views" if info["store"] == "views" else None
        return "plain"

    @property
    def n_text_encodes(self) -> int:
        """Prompts encoded so far (cache misses)."""
        return self.table.n_encodes

    def prompt_of(self, text_id: int) -> str:
        return self.table.prompt_of(text_id)

    # --- the denoiser ----------------------------------------------------------------------------
    def plain_embeddings(self, text: Tensor) -> Tensor:
        """UNet embeddings [N, L, D] of the prompts themselves (no view suffix): what VSD's LoRA
        is conditioned on (threestudio's ProlificDreamer uses the view-independent prompt)."""
        table = self.table.lookup(text.tolist())
        return torch.stack([table[int(i)][0] for i in text.tolist()])

    def denoiser_net(self) -> DenoiserNet:
        return DenoiserNet(self.unet, embed=self.plain_embeddings, to_eps=self._to_eps, device=self.device)

    def _to_eps(self, out: Tensor, x: Tensor, t: Tensor) -> Tensor:
        """The UNet's output as eps: for v-prediction eps = a_t v + s_t x_t."""
        if self.prediction_type == "v_prediction":
            ab = self.alphas_cumprod.to(out.device)[t.to(out.device)].view(-1, 1, 1, 1)
            return ab.sqrt() * out + (1 - ab).sqrt() * x.float()
        return out

    def _unet(self, x: Tensor, t: Tensor, emb: Tensor) -> Tensor:
        x = x.to(self.device, self.dtype)
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        out = self._unet_fn(x, t.to(self.device), encoder_hidden_states=emb).sample.float()
        return self._to_eps(out, x, t).contiguous()

    @torch.no_grad()
    def predict_eps(self, x_t: Tensor, t: Tensor, text: Tensor, cameras: Cameras,
                    guidance: Guidance | None = None) -> Tensor:
        self.n_calls += 1
        n = x_t.shape[0]
        guidance = guidance or Guidance.all_conditional(n)
        text, t, uncond = text.cpu(), t.cpu(), guidance.uncond.cpu()
        rows = cameras.rows()
        az, el = rows.azimuth.reshape(-1).float().cpu(), rows.elevation.reshape(-1).float().cpu()
        if az.shape[0] != n or text.shape[0] != n or uncond.shape[0] != n:
            raise ValueError(f"predict_eps got {n} rows but {az.shape[0]} cameras, {text.shape[0]} text rows and "
                             f"{uncond.shape[0]} guidance rows")
        cond_rows = (~uncond).nonzero().flatten().tolist()
        table = self.table.lookup(text[~uncond].tolist())
        emb = self.uncond_tokens.expand(n, *self.uncond_tokens.shape).clone()
        front, back, overhead = self.thresholds
        use_pn = self.perp_neg > 0 and self.view_dependent
        if use_pn:
            mix, neg_views, neg_w = perp_neg_plan(az, el, overhead, self.perp_neg, self.perp_neg_f)
        elif self.view_dependent:
            views = view_index(az, el, front, back, overhead)
        for i in cond_rows:
            vd = table[int(text[i])]  # [prompt, front, side, back, overhead] or [prompt]
            if use_pn:
                emb[i] = torch.einsum("k,kld->ld", mix[i].to(vd), vd[1:])
            else:
                emb[i] = vd[1 + views[i]] if self.view_dependent else vd[0]

        x_all, t_all, emb_all = [x_t], [t], [emb]
        ci, ui = [], []
        if use_pn and len(guidance.pairs):
            pairs = guidance.pairs.cpu().tolist()
            ci = [c for c, u in pairs if bool((neg_w[c] != 0).any())]  # overhead views have no negatives
            ui = [u for c, u in pairs if bool((neg_w[c] != 0).any())]
            if ci:
                src = torch.tensor(ci).repeat_interleave(2)
                x_all.append(x_t[src.to(x_t.device)])
                t_all.append(t[src])
                emb_all.append(torch.stack([table[int(text[i])][1 + neg_views[i, k]] for i in ci for k in range(2)]))
        eps_all = self._unet(torch.cat(x_all), torch.cat(t_all), torch.cat(emb_all))
        eps = eps_all[:n]
        if ci:
            c, u = torch.tensor(ci, device=eps.device), torch.tensor(ui, device=eps.device)
            e_u = eps[u]
            e_pos = eps[c] - e_u
            e_neg = eps_all[n:].view(len(ci), 2, *eps.shape[1:]) - e_u[:, None]
            w = neg_w[ci].to(eps)
            acc = sum(w[:, k].view(-1, 1, 1, 1) * perpendicular(e_neg[:, k], e_pos) for k in range(2))
            eps = eps.clone()
            eps[c] = eps[c] + acc
        return eps.to(x_t.device, x_t.dtype)


def build_sd_prior(cfg, text_encoder=None, device=None) -> StableDiffusionPrior:
    """The prior of ``cfg.prior``; reuses ``text_encoder`` when it is the same CLIP tower
    (``text.encoder=clip`` with ``text.model`` unset or = ``prior.model``), so it is loaded once."""
    p = cfg.prior
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    share = (text_encoder is not None and cfg.text.encoder == "clip" and same_model(cfg.text_model(), p.model))
    encode_resolution, latent_resolution = p.resolutions()
    return StableDiffusionPrior(
        p.model, text_encoder=text_encoder if share else None, device=device, dtype=p.dtype,
        channels_last=p.channels_last, compile=p.compile, encode_resolution=encode_resolution,
        latent_resolution=latent_resolution, negative_prompt=p.negative_prompt, view_dependent=p.view_dependent,
        front_threshold=p.front_threshold, back_threshold=p.back_threshold, overhead_threshold=p.overhead_threshold,
        perp_neg=p.perp_neg, text_cache_size=p.text_cache_size,
        perp_neg_f={"fs": tuple(p.perp_neg_f_fs), "sf": tuple(p.perp_neg_f_sf), "sb": tuple(p.perp_neg_f_sb),
                    "fsb": tuple(p.perp_neg_f_fsb)})


# ---------------------------------------------------------------------------------------------
# A tiny random Stable Diffusion in the real diffusers layout (tests and CPU smoke runs)


def make_tiny_sd(out_dir: str | Path, seed: int = 0, text_hidden: int = 32) -> Path:
    """Write unet/, vae/, scheduler/, text_encoder/, tokenizer/ and model_index.json of a tiny
    randomly initialised Stable Diffusion (SD 2.x architecture: linear projections, 8x VAE,
    scaled-linear DDPM betas 0.00085 -> 0.012, epsilon prediction). Built offline; it loads through
    exactly the ``from_pretrained`` calls real weights take."""
    unet = dict(sample_size=8, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(32, 64),
                down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=text_hidden,
                attention_head_dim=(2, 4), use_linear_projection=True, norm_num_groups=32)
    vae = dict(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(8, 8, 16, 16), layers_per_block=1,
               down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
               norm_num_groups=8, sample_size=64, scaling_factor=0.18215)
    return write_random_sd(out_dir, unet, vae, dict(hidden=text_hidden), seed=seed)


def write_random_sd(out_dir: str | Path, unet: dict, vae: dict, text: dict, seed: int = 0) -> Path:
    """A randomly initialised Stable Diffusion folder in the real diffusers layout from architecture configs:
    ``unet`` (UNet2DConditionModel kwargs), ``vae`` (AutoencoderKL kwargs), ``text`` (``make_tiny_clip``'s
    hidden / layers / heads / projection). Tiny ones for tests (``make_tiny_sd``); SD 2.1-base's published
    configs for true-size CPU runs without a download (``bench paper-step``)."""
    import diffusers  # noqa: PLC0415
    from diffusers import AutoencoderKL, PNDMScheduler, UNet2DConditionModel  # noqa: PLC0415

    from scalegen.text.clip import make_tiny_clip  # noqa: PLC0415

    out = Path(out_dir)
    make_tiny_clip(out, seed=seed, **text)
    torch.manual_seed(seed)
    UNet2DConditionModel(**unet).save_pretrained(out / "unet")
    AutoencoderKL(**vae).save_pretrained(out / "vae")
    # SD 2.1-base ships a PNDM config; the prior reads it as DDPM (same betas), like threestudio.
    PNDMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", num_train_timesteps=T,
                  prediction_type="epsilon", set_alpha_to_one=False, skip_prk_steps=True, steps_offset=1,
                  ).save_pretrained(out / "scheduler")
    index = {"_class_name": "StableDiffusionPipeline", "_diffusers_version": diffusers.__version__,
             "feature_extractor": [None, None], "image_encoder": [None, None], "requires_safety_checker": False,
             "safety_checker": [None, None], "scheduler": ["diffusers", "PNDMScheduler"],
             "text_encoder": ["transformers", "CLIPTextModel"], "tokenizer": ["transformers", "CLIPTokenizer"],
             "unet": ["diffusers", "UNet2DConditionModel"], "vae": ["diffusers", "AutoencoderKL"]}
    (out / "model_index.json").write_text(json.dumps(index, indent=2) + "\n")
    return out


__all__ = ["StableDiffusionPrior", "build_sd_prior", "make_tiny_sd", "write_random_sd", "view_index", "perp_neg_plan",
           "perpendicular", "shift_azimuth", "exp_decay", "PERP_NEG_F"]
