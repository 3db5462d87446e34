"""The memory plan of one training rank before launch: ``scalegen plan --config FILE [key=value ...]``.

Per rank it counts, in bytes:

* the frozen prior and text tower: parameters and buffers at their dtype. Without local weights the
  published architectures (SD 2.1-base's UNet, VAE and OpenCLIP text tower, MVDream's 4-view UNet) are
  built on the ``meta`` device, shapes only (the configs ``bench flops-sd`` / ``flops-mvdream`` use);
  with a local folder (or the oracle) the loaded prior itself is counted;
* the text caches when full (the trainer's prompt LRU ``data.embed_cache``, the prior's ``text_cache_size``),
  capped at the corpus size when the corpus is readable;
* the generator's (and background's) parameters, gradients and optimizer state, the state counted on a
  real optimizer step of the config's optimizer (Adam keeps 2 tensors per parameter, Adan 4), with
  DeepSpeed ZeRO-2 (``zero=2``) partitioning gradients and optimizer state over the ranks:
  ``Psi`` parameters, ``K`` state tensors, ``N`` ranks: fp32 ``4 Psi + (4 Psi + 4 K Psi) / N``, bf16
  ``2 Psi + (2 Psi + 4 Psi + 4 K Psi) / N`` (the fp32 master copy partitioned), as in the ZeRO paper;
* the activations one micro-batch keeps for backward, counted on a REAL step of the config's generator,
  renderer, VAE encode, distiller and regularisers at their true size: every tensor autograd saves
  (``torch.autograd.graph.saved_tensors_hooks``, each storage once, parameters excluded) together with every
  storage created in the forward that is still alive at the loss (what non-reentrant checkpointing keeps
  for its recompute; ``LiveBytes``);
* the largest transient on top of the activations: the prior's forward (the UNet runs without grad; the peak
  of live bytes of the tensors created inside ``predict_eps``, ``LiveBytes``, for the published UNet on
  ``meta`` with the fused attention kernel a GPU uses: output + log-sum-exp, no L x L matrix) or backward's
  (the peak of what backward allocates, less the parameters' gradients), whichever is larger.

The total is their sum. A frozen UNet is not needed for the saved activations (it runs under no_grad and
its output enters the loss only through ``sg``), so without weights a stand-in (``PublishedPrior``) runs
the real-size VAE with random weights on CPU and returns noise as eps while its UNet is measured on meta.
"""
from __future__ import annotations

import weakref
from dataclasses import replace
from pathlib import Path

import torch
from torch import Tensor, nn
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from scalegen.errors import ConfigError
from scalegen.data.cameras import Cameras
from scalegen.priors import build_ground_truth
from scalegen.priors.base import Prior

GIB = 1024 ** 3
CARDS_GB = (24, 40, 80)  # card sizes the table answers for (GiB, as vendors' "GB" on GPUs are)
DTYPE_BYTES = {"fp16": 2, "bf16": 2, "fp32": 4}


# ---------------------------------------------------------------------------------------------
# Counting tensors


def storage_key(t: Tensor) -> int:
    """One key per storage: its data pointer (a live storage's is unique); meta and empty storages, which
    have none, by the address of their StorageImpl."""
    st = t.untyped_storage()
    return st.data_ptr() or st._cdata


def module_keys(*modules) -> set[int]:
    """Storage keys of the parameters and buffers of ``modules`` (weights are not activations)."""
    keys = set()
    for m in modules:
        if m is None:
            continue
        for t in [*m.parameters(), *m.buffers()]:
            keys.add(storage_key(t))
    return keys


class SavedTensors:
    """Bytes autograd saves for backward inside the ``with`` block, each storage counted once (a tensor
    saved twice, or a view of a saved storage, adds nothing) and the storages in ``exclude`` (the
    parameters) not at all. ``part`` names the stage the next saves belong to (``by_part``)."""

    def __init__(self, exclude: set[int] | None = None):
        self.exclude = exclude or set()
        self.seen: dict[int, int] = {}
        self.by_part: dict[str, int] = {}
        self.part = "step"
        self._hooks = torch.autograd.graph.saved_tensors_hooks(self._pack, lambda t: t)

    def _pack(self, t: Tensor) -> Tensor:
        key = storage_key(t)
        if key not in self.exclude and key not in self.seen:
            n = t.untyped_storage().nbytes()
            self.seen[key] = n
            self.by_part[self.part] = self.by_part.get(self.part, 0) + n
        return t

    @property
    def bytes(self) -> int:
        return sum(self.seen.values())

    def __enter__(self):
        self._hooks.__enter__()
        return self

    def __exit__(self, *exc):
        self._hooks.__exit__(*exc)


class LiveBytes(TorchDispatchMode):
    """Live bytes of the storages that ops create inside the ``with`` block: each new (non-aliasing) op
    output adds its storage's bytes and gives them back when the storage is freed (a weakref finalizer);
    ``peak`` is the largest sum seen. Works on real and on ``meta`` tensors."""

    def __init__(self):
        super().__init__()
        self.live: dict[int, int] = {}
        self.current = self.peak = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if any(r.alias_info is not None for r in func._schema.returns):  # a view or an in-place op
            return out
        for t in tree_leaves(out):
            if isinstance(t, Tensor):
                st = t.untyped_storage()
                key = st.data_ptr() or st._cdata
                if key in self.live:
                    continue
                n = st.nbytes()
                self.live[key] = n
                self.current += n
                self.peak = max(self.peak, self.current)
                weakref.finalize(st, self._free, key)
        return out

    def _free(self, key: int) -> None:
        self.current -= self.live.pop(key, 0)

    def alive(self) -> dict[int, int]:
        return dict(self.live)


class FusedAttention(TorchFunctionMode):
    """On ``meta``, ``scaled_dot_product_attention`` decomposes into its math form (the whole L x L score
    matrix); a GPU runs a fused kernel that keeps only the output and the log-sum-exp. This routes it to
    the fused kernel's meta function so a meta forward allocates what a GPU forward does."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if (func is torch.nn.functional.scaled_dot_product_attention and args[0].device.type == "meta"
                and kwargs.get("attn_mask") is None and len(args) == 3):
            kw = {k: v for k, v in kwargs.items() if k in ("dropout_p", "is_causal", "scale")}
            return torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(*args, **kw)[0]
        return func(*args, **kwargs)


def reachable_storages(obj, depth: int = 3) -> dict[int, int]:
    """{storage key: bytes} of every distinct storage reachable from ``obj``: a module's parameters, buffers
    and tensor attributes; the tensors, lists, dicts and attributes of plain objects, ``depth`` levels deep."""
    found: dict[int, int] = {}

    def add(t: Tensor):
        found.setdefault(storage_key(t), t.untyped_storage().nbytes())

    def walk(o, d):
        if isinstance(o, Tensor):
            add(o)
        elif isinstance(o, nn.Module):
            for t in [*o.parameters(), *o.buffers(), *[v for v in vars(o).values() if isinstance(v, Tensor)]]:
                add(t)
        elif d <= 0:
            return
        elif isinstance(o, dict):
            for v in o.values():
                walk(v, d - 1)
        elif isinstance(o, (list, tuple)):
            for v in o:
                walk(v, d - 1)
        elif not isinstance(o, (type, str, bytes, int, float)) and "__dict__" in dir(o):
            for v in vars(o).values():
                walk(v, d - 1)

    walk(obj, depth)
    return found


# ---------------------------------------------------------------------------------------------
# The published architectures, built on meta (no weights, no memory)


def _published_modules(name: str) -> dict[str, nn.Module]:
    """The frozen modules of ``prior.name`` at their published sizes on ``meta``."""
    from diffusers import AutoencoderKL, UNet2DConditionModel  # noqa: PLC0415
    from transformers import CLIPTextConfig, CLIPTextModel  # noqa: PLC0415

    from scalegen.bench.flops_sd import SD21_BASE_VAE, SD21_TEXT  # noqa: PLC0415
    from scalegen.priors.stable_diffusion import SD21_BASE_UNET  # noqa: PLC0415

    with torch.device("meta"):
        if name == "mvdream":
            from scalegen.priors.mvdream_unet import MultiViewUNet, mvdream_unet_config  # noqa: PLC0415

            unet = MultiViewUNet(**mvdream_unet_config())
        else:
            unet = UNet2DConditionModel(**SD21_BASE_UNET)
        vae = AutoencoderKL(**SD21_BASE_VAE)
        text = CLIPTextModel(CLIPTextConfig(**SD21_TEXT))
    return {"unet": unet.eval().requires_grad_(False), "vae": vae.eval().requires_grad_(False),
            "text": text.eval().requires_grad_(False)}


def _numel(m: nn.Module) -> int:
    return sum(t.numel() for t in [*m.parameters(), *m.buffers()])


class PublishedPrior(Prior):
    """Stands in for Stable Diffusion / MVDream when their weights are not here: the real-size VAE with
    random weights encodes on CPU (its activations are what backward keeps), eps is noise (the frozen UNet
    runs under no_grad, so it saves nothing), and every ``predict_eps`` also runs the published UNet on
    ``meta`` with the same rows to measure its forward's transient (``transient_peak``)."""

    latent_channels = 4

    def __init__(self, cfg, dtype: torch.dtype):
        from diffusers import AutoencoderKL  # noqa: PLC0415

        from scalegen.bench.flops_sd import SD21_BASE_VAE  # noqa: PLC0415
        from scalegen.priors.base import ddpm_alphas_cumprod  # noqa: PLC0415

        self.name, self.dtype = cfg.prior.name, dtype
        self.views = cfg.camera.views_per_prompt
        self.alphas_cumprod = ddpm_alphas_cumprod()
        self.device = torch.device("cpu")
        self.encode_resolution, self.latent_resolution = cfg.prior.resolutions()
        self.perp_neg = cfg.prior.name == "stable_diffusion" and cfg.prior.perp_neg > 0 and cfg.prior.view_dependent
        self.meta_dtype = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}[cfg.prior.dtype]
        torch.manual_seed(0)
        # nn.Module.to: diffusers' own .to warns about casting a model that was not loaded
        self.vae = nn.Module.to(AutoencoderKL(**SD21_BASE_VAE), dtype).eval().requires_grad_(False)
        self.unet = nn.Module.to(_published_modules(self.name)["unet"], self.meta_dtype)
        self.transient_peak, self.unet_rows = 0, 0

    def encode(self, rgb: Tensor) -> Tensor:
        from scalegen.priors.latent import vae_encode  # noqa: PLC0415

        return vae_encode(self.vae, rgb, self.encode_resolution, self.latent_resolution, 0.18215, self.dtype)

    def text_embeddings(self, prompts, tokens=None) -> Tensor:
        return torch.arange(len(prompts))

    def frozen_modules(self) -> list[nn.Module]:
        return [self.vae]

    @torch.no_grad()
    def predict_eps(self, x_t: Tensor, t: Tensor, text: Tensor, cameras: Cameras, guidance=None) -> Tensor:
        rows = x_t.shape[0]
        if self.perp_neg and guidance is not None:  # two negative rows per paired conditional row (at most)
            rows += 2 * len(guidance.pairs)
        self.unet_rows = rows
        self.transient_peak = max(self.transient_peak, unet_transient(self.unet, self.name, rows,
                                                                      x_t.shape[-1], self.views, self.meta_dtype))
        return torch.randn_like(x_t)


def unet_transient(unet: nn.Module, name: str, rows: int, latent: int, views: int, dtype: torch.dtype) -> int:
    """Peak live bytes of one no-grad forward of a meta ``unet`` on ``rows`` rows (inputs not counted)."""
    x = torch.empty(rows, 4, latent, latent, device="meta", dtype=dtype)
    t = torch.zeros(rows, dtype=torch.long, device="meta")
    ehs = torch.empty(rows, 77, unet.config.cross_attention_dim, device="meta", dtype=dtype)
    live = LiveBytes()
    with torch.no_grad(), FusedAttention(), live:
        if name == "mvdream":
            unet(x, t, ehs, torch.empty(rows, 16, device="meta", dtype=dtype), num_frames=views)
        else:
            unet(x, t, encoder_hidden_states=ehs)
    return live.peak


class TrackedPrior(Prior):
    """A loaded prior whose ``predict_eps`` runs under ``LiveBytes`` (its forward's transient, measured)."""

    def __init__(self, prior: Prior):
        self.prior, self.transient_peak, self.unet_rows = prior, 0, 0
        self.alphas_cumprod, self.latent_channels, self.device = (prior.alphas_cumprod, prior.latent_channels,
                                                                  prior.device)

    def encode(self, rgb):
        return self.prior.encode(rgb)

    def decode(self, latents):
        return self.prior.decode(latents)

    def text_embeddings(self, prompts, tokens=None):
        return self.prior.text_embeddings(prompts, tokens)

    def denoiser_net(self):
        return self.prior.denoiser_net()

    def frozen_modules(self) -> list[nn.Module]:
        return [m for m in vars(self.prior).values() if isinstance(m, nn.Module)]

    def predict_eps(self, x_t, t, text, cameras: Cameras, guidance=None):
        live = LiveBytes()
        with live:
            eps = self.prior.predict_eps(x_t, t, text, cameras, guidance)
        self.transient_peak = max(self.transient_peak, live.peak)
        self.unet_rows = x_t.shape[0]
        return eps


# ---------------------------------------------------------------------------------------------
# One measured micro-batch


BUILD = object()  # measure_step's ``truth`` when the caller has not built it


def _load_local(cfg, truth) -> bool:
    """Whether the prior is built from files here (the oracle, whose ``truth`` is not None, or a local folder)."""
    return truth is not None or Path(cfg.prior.model).is_dir()


def measure_step(cfg, prompts: int, backward: bool = False, truth=BUILD) -> dict:
    """``_measure_step``, then its graph and models are freed (cycles collected, freed heap handed back to the
    system where glibc allows), so a plan's several measured steps do not pile up in memory. ``truth``: the
    config's ``build_ground_truth`` when the caller has it (built here otherwise)."""
    import ctypes  # noqa: PLC0415
    import gc  # noqa: PLC0415

    try:
        return _measure_step(cfg, prompts, backward, truth)
    finally:
        gc.collect()
        try:
            ctypes.CDLL("libc.so.6").malloc_trim(0)
        except (OSError, AttributeError):  # not glibc
            pass


def _measure_step(cfg, prompts: int, backward: bool = False, truth=BUILD) -> dict:
    """Run one micro-batch of ``cfg`` with ``prompts`` prompts on CPU at the config's true sizes and count
    what it keeps for backward. With ``backward`` also backpropagate and step the config's optimizer once
    (its state is then counted)."""
    from scalegen.config import schedule_value  # noqa: PLC0415
    from scalegen.data.cameras import sample_train_cameras  # noqa: PLC0415
    from scalegen.distill import build_distiller  # noqa: PLC0415
    from scalegen.priors import build_prior  # noqa: PLC0415
    from scalegen.render import build_renderer  # noqa: PLC0415
    from scalegen.text import TextCond, build_text_encoder  # noqa: PLC0415
    from scalegen.text import text_dim_of  # noqa: PLC0415
    from scalegen.train.loop import build_optimizer, regularisers, training_prompts  # noqa: PLC0415
    from scalegen.train.model import build_scene  # noqa: PLC0415

    cfg = replace(cfg, data=replace(cfg.data, prompts_per_step=prompts))
    bf16 = cfg.train.mixed_precision == "bf16"
    torch.manual_seed(cfg.train.seed)
    if truth is BUILD:
        truth = build_ground_truth(cfg)
    world = truth.world if truth is not None else None
    if _load_local(cfg, truth):
        if cfg.text.encoder == "clip":  # on the CPU, where the step is measured
            from scalegen.text.clip import CLIPTextEncoder  # noqa: PLC0415

            text_encoder = CLIPTextEncoder(cfg.text_model(), device="cpu",
                                           key="text.model" if cfg.text.model else "prior.model")
        else:
            text_encoder = build_text_encoder(cfg)
        prior = TrackedPrior(build_prior(cfg, world, text_encoder=text_encoder, device="cpu"))
        text_dim = text_encoder.dim
        batch = (training_prompts(cfg, world) * prompts)[:prompts] if world is not None else [
            f"plan prompt {i}" for i in range(prompts)]
        cond = text_encoder.encode(batch)
    else:
        # Stable Diffusion / MVDream without weights: 2-byte dtypes run as bf16 on CPU (same bytes as fp16)
        prior = PublishedPrior(cfg, torch.float32 if cfg.prior.dtype == "fp32" else torch.bfloat16)
        text_dim = text_dim_of(cfg)
        batch = [f"plan prompt {i}" for i in range(prompts)]
        g = torch.Generator().manual_seed(0)
        cond = TextCond(torch.randn(prompts, text_dim, generator=g), torch.randn(prompts, 77, text_dim, generator=g),
                        torch.ones(prompts, 77, dtype=torch.bool))
    model = build_scene(cfg, text_dim).train()
    renderer = build_renderer(cfg).train()
    distiller = build_distiller(cfg, prior, cond_dim=text_dim)
    prior_text = prior.text_embeddings(batch)
    v = cfg.camera.views_per_prompt
    step = 0
    exclude = module_keys(model, *prior.frozen_modules()) | {storage_key(p) for p in distiller.parameters()}
    saved = SavedTensors(exclude)
    live = LiveBytes()
    with saved, live, torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
        saved.part = "generator"
        field, background = model(cond)
        saved.part = "render"
        cams = sample_train_cameras(cfg.camera, len(batch))
        lam_eik = schedule_value(cfg.loss.eikonal, step, cfg.train.max_steps)
        out = renderer(field, cams, background=background, with_eikonal=lam_eik > 0)
        saved.part = "encode"
        latents = prior.encode(out.rgb)
        saved.part = "distill"
        loss_d, _ = distiller(latents, prior_text.repeat_interleave(v), cams.expand(len(batch)), step,
                              pooled=cond.pooled.repeat_interleave(v, 0))
        saved.part = "regularisers"
        reg, _ = regularisers(cfg, out, step)
        loss = cfg.loss.distill * loss_d + reg
    retained = {k: n for k, n in live.alive().items() if k not in exclude}
    union = dict(retained)
    union.update(saved.seen)
    res = {"prompts": prompts, "images": prompts * v, "saved_bytes": saved.bytes, "saved_by_part": saved.by_part,
           "retained_bytes": sum(retained.values()), "activation_bytes": sum(union.values()),
           "prior_transient_bytes": prior.transient_peak, "unet_rows": prior.unet_rows,
           "loss_finite": bool(torch.isfinite(loss))}
    if backward:
        opt = build_optimizer(cfg, model)
        back = LiveBytes()
        with back:
            loss.backward()
        # what backward allocates above what it leaves (the parameters' gradients, counted as gradients)
        res["backward_transient_bytes"] = max(0, back.peak - sum(back.alive().values()))
        opt.step()
        state = sum(t.untyped_storage().nbytes() for st in opt.state.values() for t in st.values()
                    if isinstance(t, Tensor) and t.dim() > 0)
        params = [p for g in opt.param_groups for p in g["params"]]
        n_params = sum(p.numel() for p in params)
        res.update({"optimizer": cfg.optim.name, "generator_params": n_params,
                    "generator_param_bytes": sum(p.numel() * p.element_size() for p in params),
                    "optimizer_state_bytes": state,
                    "optimizer_states_per_param": round(state / max(1, 4 * n_params), 3),
                    "distiller_param_bytes": sum(p.numel() * p.element_size() for p in distiller.parameters())})
    res["frozen"] = frozen_bytes(cfg, prior, text_encoder if _load_local(cfg, truth) else None, truth is not None)
    return res


ISOLATE_ABOVE = GIB  # activations of the base step above which the table's cells are measured each in its own process


def measure_step_isolated(cfg, prompts: int) -> dict:
    """``measure_step(cfg, prompts)`` in a fresh Python process: a cell's peak cannot add to the heap an earlier
    measurement left behind (CPU allocators keep freed memory), and the process's own peak RSS (``wait4``) comes
    back as ``process_peak_rss_bytes``. A child that fails is one clear line, with the peak it reached."""
    import json  # noqa: PLC0415
    import os  # noqa: PLC0415
    import subprocess  # noqa: PLC0415
    import sys  # noqa: PLC0415
    import tempfile  # noqa: PLC0415

    from scalegen.errors import TrainingError  # noqa: PLC0415

    with tempfile.TemporaryDirectory(prefix="scalegen-plan-") as tmp:
        spec, out = Path(tmp) / "spec.json", Path(tmp) / "measured.json"
        spec.write_text(json.dumps({"config": cfg.to_dict(), "prompts": prompts}))
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join([str(Path(__file__).resolve().parents[2]), env.get("PYTHONPATH", "")])
        p = subprocess.Popen([sys.executable, "-m", "scalegen.bench.plan", str(spec), str(out)], env=env,
                             stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        err = p.stderr.read()
        _, status, ru = os.wait4(p.pid, 0)
        p.stderr.close()
        rc = os.waitstatus_to_exitcode(status)
        peak = ru.ru_maxrss * 1024
        if rc != 0 or not out.is_file():
            last = err.strip().splitlines()[-1] if err.strip() else f"killed by signal {-rc}" if rc < 0 else f"exit {rc}"
            raise TrainingError(f"measuring a table cell failed ({last}) at {peak / GIB:.1f} GiB peak RSS; this machine "
                                "may lack the memory: plan with --no-table, or on a larger machine")
        return {**json.loads(out.read_text()), "process_peak_rss_bytes": peak}


def _isolated_main(spec_path: str, out_path: str) -> int:
    import json  # noqa: PLC0415

    from scalegen import atomic  # noqa: PLC0415
    from scalegen.config import from_dict  # noqa: PLC0415

    spec = json.loads(Path(spec_path).read_text())
    res = measure_step(from_dict(spec["config"]), spec["prompts"])
    atomic.write_text(Path(out_path), json.dumps(res))
    return 0


def frozen_bytes(cfg, prior, text_encoder, exact: bool) -> dict:
    """Bytes of the frozen prior and text tower at their run dtype, and of the text caches when full. ``exact``: the
    prior was built here at its own dtype (the oracle); a loaded one ran in fp32 on CPU and counts at ``prior.dtype``."""
    p = cfg.prior
    size = DTYPE_BYTES[p.dtype]
    if isinstance(prior, PublishedPrior):
        mods = _published_modules(p.name)
        res = {"unet_params": _numel(mods["unet"]), "vae_params": _numel(mods["vae"]),
               "text_params": _numel(mods["text"]), "source": "published architecture (meta)"}
        res["prior_bytes"] = (res["unet_params"] + res["vae_params"]) * size
        res["text_bytes"] = res["text_params"] * 4  # CLIPTextEncoder loads fp32
        text_dim = 1024
    else:
        text = reachable_storages(text_encoder)
        own = {k: n for k, n in reachable_storages(prior.prior).items() if k not in text}
        # a loaded prior ran in fp32 on CPU: its weights count at prior.dtype's bytes
        scale = size / 4 if not exact else 1.0  # built here (the oracle, or the learned prior of an oracle world): fp32
        res = {"source": "loaded" if not exact else f"{p.name} prior (built here)",
               "prior_bytes": int(sum(own.values()) * scale), "text_bytes": sum(text.values())}
        text_dim = text_encoder.dim
    n_corpus = _corpus_size(cfg)
    cap = lambda n: n if n_corpus is None else min(n, n_corpus)  # noqa: E731
    tokens = 77 if cfg.text.encoder == "clip" else cfg.text.max_tokens
    res["corpus_prompts"] = n_corpus
    res["embed_cache_bytes"] = cap(cfg.data.embed_cache) * (tokens + 1) * text_dim * 4
    if p.name != "oracle":
        variants = 5 if (p.name == "stable_diffusion" and p.view_dependent) else 1
        res["prior_text_cache_bytes"] = cap(p.text_cache_size) * variants * 77 * text_dim * size
    else:
        res["prior_text_cache_bytes"] = 0
    return res


def _corpus_size(cfg) -> int | None:
    from scalegen.data.prompts import read_corpus  # noqa: PLC0415

    if cfg.data.prompt is not None:
        return 1
    if cfg.data.prompts == "oracle" or cfg.data.shards:
        return None
    try:
        return len(set(read_corpus(cfg.data.prompts, cfg.data.split)))
    except Exception:  # noqa: BLE001 - an absent corpus: the caches are counted full
        return None


# ---------------------------------------------------------------------------------------------
# The plan


def optimizer_bytes(n_params: int, states: float, world: int, zero: int, bf16: bool) -> dict:
    """Parameters, gradients and optimizer state of the engine-managed model per rank (see module doc)."""
    psi = n_params
    if zero == 2:
        if bf16:
            return {"params": 2 * psi, "grads": 2 * psi / world, "master": 4 * psi / world,
                    "optimizer_state": 4 * states * psi / world, "ddp_buckets": 0}
        return {"params": 4 * psi, "grads": 4 * psi / world, "master": 0,
                "optimizer_state": 4 * states * psi / world, "ddp_buckets": 0}
    # DDP (or one process): fp32 weights and gradients (autocast keeps fp32 masters), a flat copy of the
    # gradients in DDP's buckets when there are several ranks
    return {"params": 4 * psi, "grads": 4 * psi, "master": 0, "optimizer_state": 4 * states * psi,
            "ddp_buckets": 4 * psi if world > 1 else 0}


CELLS = {  # (name, overrides)
    "fp32": ["prior.dtype=fp32", 'train.mixed_precision="no"', "generator.checkpointing=false"],
    "fp32 + ckpt": ["prior.dtype=fp32", 'train.mixed_precision="no"', "generator.checkpointing=true"],
    "bf16": ["prior.dtype=bf16", "train.mixed_precision=bf16", "generator.checkpointing=false"],
    "bf16 + ckpt": ["prior.dtype=bf16", "train.mixed_precision=bf16", "generator.checkpointing=true"],
}
CHECKPOINTED = ("conv3d", "triplane_transformer")  # generators that honour generator.checkpointing


def _with(cfg, items: list[str]):
    from scalegen.config import _deep_merge, from_dict, parse_overrides  # noqa: PLC0415

    return from_dict(_deep_merge(cfg.to_dict(), parse_overrides(items)))


def _total(frozen: dict, opt: dict, distiller_bytes: int, act: float, prior_transient: float,
           backward_transient: float) -> dict:
    """The parts of the peak: everything resident, the activations, and the larger of the two transients that
    come on top of them (the prior's forward runs while the activations are held; backward frees them as it
    allocates gradients, so counting both on top of all activations is the conservative bound)."""
    parts = {"prior": frozen["prior_bytes"], "text_tower": frozen["text_bytes"],
             "text_caches": frozen["embed_cache_bytes"] + frozen["prior_text_cache_bytes"],
             "generator_params": opt["params"], "generator_grads": opt["grads"],
             "master_weights": opt["master"], "optimizer_state": opt["optimizer_state"],
             "ddp_buckets": opt["ddp_buckets"], "distiller_own": distiller_bytes,
             "activations": act, "transient": max(prior_transient, backward_transient)}
    return {"parts": {k: int(v) for k, v in parts.items()}, "total_bytes": int(sum(parts.values())),
            "activation_bytes": int(act), "prior_transient_bytes": int(prior_transient),
            "backward_transient_bytes": int(backward_transient)}


class Curve:
    """Activations and prior transient (bytes) of a micro-batch of B prompts: measured at ``m`` prompts, and
    above it the line through the measurements at ``s1 = max(m, 2)`` and ``s1 + 1`` prompts (a generator may
    take another code path for one prompt than for several: Hyper-iNGP's shared-points MLP), scaled by
    ``ratio`` (a table cell measured at ``m`` only takes the base config's slope times its own ratio at m)."""

    def __init__(self, m: int, at_m: tuple[float, float], s1: int, at_s1: tuple[float, float],
                 slope: tuple[float, float], ratio: tuple[float, float] = (1.0, 1.0)):
        self.m, self.at_m, self.s1, self.at_s1, self.slope, self.ratio = m, at_m, s1, at_s1, slope, ratio

    def __call__(self, prompts: int) -> tuple[float, float]:
        if prompts == self.m:
            return self.at_m
        return tuple(max(0.0, r * (a + (prompts - self.s1) * k))
                     for a, k, r in zip(self.at_s1, self.slope, self.ratio))

    def scaled(self, at_m: tuple[float, float]) -> "Curve":
        ratio = tuple(x / y if y else 1.0 for x, y in zip(at_m, self.at_m))
        return Curve(self.m, at_m, self.s1, self.at_s1, self.slope, ratio)



def max_prompts(fits, limit: int = 100_000) -> int:
    """The largest prompts per micro-batch for which ``fits(n)`` holds (0: not even one; ``limit`` when the
    growth per prompt is zero); ``fits`` is monotone from 2 prompts on (the growth is linear there)."""
    if not fits(1):
        return 0
    if not fits(2):
        return 1
    lo, hi = 2, limit
    if fits(hi):
        return hi
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if fits(mid) else (lo, mid)
    return lo


def _pair(meas: dict) -> tuple[float, float]:
    return float(meas["activation_bytes"]), float(meas["prior_transient_bytes"])


def plan_config(cfg, world_size: int = 1, zero: int = 0, measure_prompts: int | None = None, cells: bool = True,
                growth: bool = True, log=print, isolate_cells: bool | None = None) -> dict:
    """The memory plan of ``cfg`` per rank; ``total_bytes`` is the prediction for the config as it is.
    ``measure_prompts``: prompts of the measured micro-batch (default: ``data.prompts_per_step``, exact); fewer
    are extrapolated along the line measured at 2 and 3 prompts (``Curve``); ``cells``: also measure the
    fp32 / bf16 x checkpointing table; ``growth=False``: no steps at 2 and 3 prompts (less time and memory); the
    largest prompts per step then scales the measured batch in proportion (conservative where part is shared).
    ``isolate_cells``: measure each table cell in a fresh process (default: when the base step's activations exceed
    ``ISOLATE_ABOVE``, where one cell's left-over heap would add to the next one's peak)."""
    if world_size < 1 or zero not in (0, 2):
        raise ConfigError("--num-processes must be >= 1 and --zero 0 (DDP) or 2 (DeepSpeed ZeRO-2)")
    if measure_prompts is not None and measure_prompts < 1:
        raise ConfigError("--measure-prompts must be >= 1")
    truth = build_ground_truth(cfg)  # the oracle's world, built once for every measured step here
    if cfg.distill.name == "vsd" and (truth is None or cfg.prior.name == "learned"):
        raise ConfigError("scalegen plan does not count VSD's LoRA backward through the UNet yet; plan an asd, "
                          "sds, csd or vdm config")
    if cfg.generator.name in ("gaussians",):
        raise ConfigError("scalegen plan covers the amortized generators (hyper_ingp, conv3d, triplane_transformer) "
                          "and ingp; a Gaussian scene grows with densification, so plan it with its max_gaussians")
    b = cfg.data.prompts_per_step
    m = min(measure_prompts or b, b)
    if not growth and m != b:
        raise ConfigError("--no-growth measures data.prompts_per_step itself: drop --measure-prompts")
    v = cfg.camera.views_per_prompt
    log(f"measuring one micro-batch of {m} prompt(s) x {v} view(s) on CPU, forward and backward (the config: {b})")
    base = measure_step(cfg, m, backward=True, truth=truth)
    s1 = max(m, 2)
    if growth:
        log(f"measuring {s1} and {s1 + 1} prompts (forward) for the growth per prompt ...")
        m1 = base if s1 == m else measure_step(cfg, s1, truth=truth)
        m2 = measure_step(cfg, s1 + 1, truth=truth)
        curve = Curve(m, _pair(base), s1, _pair(m1), tuple(max(0.0, y - x) for x, y in zip(_pair(m1), _pair(m2))))
    else:  # in proportion to the measured batch: an upper bound wherever part of it is shared by the prompts
        curve = Curve(m, _pair(base), m, _pair(base), tuple(x / m for x in _pair(base)))
    bf16 = cfg.train.mixed_precision == "bf16"
    states = base["optimizer_state_bytes"] / max(1, 4 * base["generator_params"])

    # backward's transient, in proportion to the activations it walks back through (measured at m prompts)
    back_ratio = base["backward_transient_bytes"] / max(1, base["activation_bytes"])

    def plan_of(c: Curve, frozen: dict, use_bf16: bool) -> dict:
        opt = optimizer_bytes(base["generator_params"], states, world_size, zero, use_bf16)
        distiller_bytes = base["distiller_param_bytes"] * (2 + states)
        total = lambda n: _total(frozen, opt, distiller_bytes, c(n)[0], c(n)[1], back_ratio * c(n)[0])  # noqa: E731
        out = total(b)
        out["fits"] = {f"{g}GB": out["total_bytes"] <= g * GIB for g in CARDS_GB}
        out["max_prompts_per_step"] = {f"{g}GB": max_prompts(lambda n: total(n)["total_bytes"] <= g * GIB)
                                       for g in CARDS_GB}
        return out

    res = {"config": {"prior": cfg.prior.name, "prior_dtype": cfg.prior.dtype, "generator": cfg.generator.name,
                      "distill": cfg.distill.name, "optimizer": cfg.optim.name,
                      "prompts_per_step": b, "views_per_prompt": v,
                      "resolution": cfg.camera.resolution, "encode_resolution": cfg.prior.resolutions()[0],
                      "mixed_precision": cfg.train.mixed_precision, "checkpointing": cfg.generator.checkpointing,
                      "grad_accum": cfg.train.grad_accum},
           "world_size": world_size, "zero": zero, "measured_prompts": m, "extrapolated": m != b,
           "measured": {k: val for k, val in base.items() if k != "frozen"},
           "max_prompts_method": "measured growth" if growth else "proportional to the measured batch (conservative)",
           "growth": None if not growth else {"prompts": [s1, s1 + 1], "activation_bytes": [m1["activation_bytes"], m2["activation_bytes"]],
                      "prior_transient_bytes": [m1["prior_transient_bytes"], m2["prior_transient_bytes"]]},
           "frozen": base["frozen"]}
    res.update(plan_of(curve, base["frozen"], bf16))
    res["optimizer_states_per_param"] = round(states, 3)
    if cells:
        table = {}
        isolate = base["activation_bytes"] > ISOLATE_ABOVE if isolate_cells is None else isolate_cells
        for name, items in CELLS.items():
            if name.endswith("ckpt") and cfg.generator.name not in CHECKPOINTED:
                table[name] = {**table[name.split(" ")[0]], "checkpointing": "no effect on " + cfg.generator.name}
                continue
            c = _with(cfg, items)
            log(f"measuring {name}{' in its own process' if isolate else ''} ...")
            meas = measure_step_isolated(c, m) if isolate else measure_step(c, m, truth=truth)
            cell_curve = curve.scaled(_pair(meas))
            cell = plan_of(cell_curve, meas["frozen"], name.startswith("bf16"))
            cell["saved_by_part"] = meas["saved_by_part"]
            if "process_peak_rss_bytes" in meas:
                cell["measured_process_peak_rss_bytes"] = meas["process_peak_rss_bytes"]
            cell["overrides"] = items
            table[name] = cell
        res["cells"] = table
        res["fit_24GB"] = fit_advice(res)
    return res


def fit_advice(res: dict) -> list[str]:
    """Which measured settings make the config fit a 24 GB card (empty when it fits as it is)."""
    if res["fits"]["24GB"]:
        return []
    out = [f"{name}: {' '.join(c['overrides'])}" for name, c in res["cells"].items()
           if "overrides" in c and c["fits"]["24GB"]]
    return out


def _count(n: int | None) -> str:
    return "-" if n is None else str(n)


def format_plan(res: dict) -> str:
    """The plan as tables for people."""
    from scalegen.eval.report import format_table  # noqa: PLC0415

    gib = lambda n: f"{n / GIB:.2f}"  # noqa: E731
    c = res["config"]
    lines = [f"memory plan per rank: {c['generator']} + {c['distill']} + {c['prior']} ({c['prior_dtype']}), "
             f"{c['prompts_per_step']} prompt(s) x {c['views_per_prompt']} view(s) of {c['resolution']}^2 per "
             f"micro-batch, optimizer {c['optimizer']}, {res['world_size']} rank(s)"
             f"{', DeepSpeed ZeRO-2' if res['zero'] == 2 else ''}",
             f"frozen weights: {res['frozen']['source']}; activations counted on a real CPU step of "
             f"{res['measured_prompts']} prompt(s)" + (" and extrapolated to prompts_per_step"
                                                       if res["extrapolated"] else "")
             + (f"; growth per prompt from {res['growth']['prompts'][0]} and {res['growth']['prompts'][1]} prompts"
                if res["growth"] else "; growth per prompt in proportion to the measured batch (--no-growth)")]
    rows = [[k.replace("_", " "), gib(v)] for k, v in res["parts"].items()]
    rows.append(["total", gib(res["total_bytes"])])
    lines.append(format_table(rows, ["part", "GiB"]))
    if res["frozen"]["corpus_prompts"] is None:
        lines.append("text caches counted full (data.embed_cache, prior.text_cache_size): the corpus is not readable "
                     "here or is streamed")
    lines.append("as configured: " + ", ".join(f"{k} {'fits' if ok else 'does NOT fit'}"
                                              for k, ok in res["fits"].items()))
    if "cells" in res:
        rows = []
        for name, cell in res["cells"].items():
            rows.append([name, gib(cell["activation_bytes"]), gib(cell["prior_transient_bytes"]),
                         gib(cell["backward_transient_bytes"]), gib(cell["total_bytes"]),
                         *["yes" if cell["fits"][f"{g}GB"] else "no" for g in CARDS_GB],
                         *[_count(cell["max_prompts_per_step"][f"{g}GB"]) for g in CARDS_GB]])
        lines.append(format_table(rows, ["setting", "activations", "prior fwd", "backward", "total GiB",
                                         *[f"{g} GB" for g in CARDS_GB],
                                         *[f"max prompts {g}" for g in CARDS_GB]]))
        if res["fits"]["24GB"]:
            lines.append("fits a 24 GB card as configured")
        elif res["fit_24GB"]:
            lines.append("to fit a 24 GB card: " + "; ".join(res["fit_24GB"]))
        else:
            lines.append("no measured setting fits a 24 GB card; see docs/memory-plan.md for further keys")
    return "\n".join(lines)


if __name__ == "__main__":
    import sys

    sys.exit(_isolated_main(sys.argv[1], sys.argv[2]))
