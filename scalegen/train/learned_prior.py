"""`scalegen prior train-learned`: train the learned prior (priors/learned.py) on an oracle world.

Data: a *bank* of ground-truth renders of the world's training prompts (``world.splits()["seen"]``),
``views_per_prompt`` per prompt from the training camera distribution (``camera.*``, stratified per
prompt), each view one of the prompt's components (completions x instances) drawn uniformly, all drawn
once from the seed and cached in ``OUT/bank.safetensors``. The learned model's data distribution is therefore
known exactly: the equal-weight mixture of N(mu_k, s^2 I) over the bank's
renders mu_k (``sharpness`` s; 0 = the clean renders), whose exact posterior is the oracle's formula
(``priors.mixture_posterior_mean``) — what `scalegen prior score-learned` compares it against.

One step (DDPM's loss, Ho et al. 2020, on Stable Diffusion's schedule): rows k of the bank, z = 2 mu_k - 1
(+ s noise), t ~ U{0..T-1}, eps ~ N(0, I), x_t = a_t z + s_t eps, the prompt's bag-of-words tokens
replaced by the null condition (all zeros) with probability ``cond_dropout`` (classifier-free guidance);
loss = |eps_theta(x_t, t, c) - eps|^2, AdamW with a linear warm-up, gradients clipped at 1.

Every draw comes from one seeded generator whose state is checkpointed, the UNet is initialised from the
seed, so a run is a function of its seed and resumes bit-exactly (same thread count). Checkpoints
(``OUT/checkpoints/step_N``, train/checkpoint.py) are atomic, and each one also (re)writes the loadable
prior folder (unet/, scheduler/, ...), so the newest checkpoint is always usable as ``prior.model=OUT``.
Rerunning the same command continues the run; ``steps`` (the run's length) and ``minutes`` (this
invocation's wall-clock budget) may change between invocations, nothing else.
"""
from __future__ import annotations

import dataclasses
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Annotated, Callable, Literal

import torch
from safetensors.torch import save_file

from scalegen import atomic
from scalegen.config import AtLeast1, NonNeg, Positive, Range, Unit, load_config, parse_options
from scalegen.data.cameras import sample_train_cameras
from scalegen.errors import CheckpointError, ConfigError, Interrupted
from scalegen.priors import build_ground_truth
from scalegen.priors.base import T, ddpm_alphas_cumprod
from scalegen.priors.learned import BANK_FILE, INFO_FILE, load_bank, unet_config, write_learned
from scalegen.text import build_text_encoder
from scalegen.train.checkpoint import latest_checkpoint, load_training_state, load_weights, save_checkpoint
from scalegen.train.distributed import StopSignal



@dataclass
class LearnedTraining:
    """``learned.*`` options of `scalegen prior train-learned` (key=value overrides)."""

    size: Literal["small", "tiny"] = "small"  # the UNet (priors/learned.py UNET_PRESETS); tiny for tests
    steps: Annotated[int, AtLeast1] = 20000  # the run's length in optimizer steps (may grow between invocations)
    minutes: Annotated[float, NonNeg] = 0.0  # this invocation's wall-clock budget; 0 = none (checkpoint and stop when spent)
    batch: Annotated[int, AtLeast1] = 32  # images per step
    lr: Annotated[float, Positive] = 3e-4  # AdamW learning rate after the warm-up
    warmup: Annotated[int, NonNeg] = 200  # steps of linear learning-rate warm-up
    weight_decay: Annotated[float, NonNeg] = 0.0  # AdamW weight decay
    views_per_prompt: Annotated[int, AtLeast1] = 64  # bank renders per training prompt
    cond_dropout: Annotated[float, Unit] = 0.1  # share of rows trained with the null condition (CFG)
    sharpness: Annotated[float, NonNeg] = 0.0  # s: data noise std around each render (the oracle mixture's s); 0 = clean
    ckpt_every: Annotated[int, AtLeast1] = 250  # steps between checkpoints (each also rewrites the prior folder)
    seed: Annotated[int, Range(ge=0)] = 0  # bank cameras, UNet initialisation and every training draw
    threads: Annotated[int, NonNeg] = 0  # torch CPU threads (0: torch's choice)
    progress: bool = True  # tqdm bar


# options that do not change what is trained (free to change when a run continues)
RESUMABLE_CHANGES = ("steps", "minutes", "ckpt_every", "threads", "progress")


def split_overrides(overrides: list[str], section: str) -> tuple[list[str], list[str]]:
    """(``section.*`` options, config overrides) of a command line's key=value list."""
    mine = [o for o in overrides if o.split("=", 1)[0].startswith(section + ".")]
    return mine, [o for o in overrides if o not in mine]


def learned_setup(world_config: str | None, overrides: list[str]):
    """(the world's Config, LearnedTraining) of a `train-learned` command line."""
    mine, rest = split_overrides(overrides, "learned")
    opts = parse_options(LearnedTraining, mine, "learned", "`scalegen prior train-learned` options")
    cfg = load_config(world_config, rest)
    if cfg.text.encoder != "bow":
        raise ConfigError("the learned prior is conditioned on the world's bag of words: text.encoder must be bow")
    return cfg, opts


def world_record(cfg) -> dict:
    """What a learned prior was trained on (its learned_prior.json, minus training progress)."""
    t = cfg.text
    return {"world": asdict(cfg.world), "camera": asdict(cfg.camera), "render": asdict(cfg.render),
            "oracle_renderer": {"samples": cfg.prior.oracle.samples,
                                "importance_samples": cfg.prior.oracle.importance_samples},
            "text": {"dim": t.dim, "max_tokens": t.max_tokens, "word_order": t.word_order,
                     "id": build_text_encoder(cfg).id},
            "resolution": cfg.camera.resolution}


@torch.no_grad()
def render_bank(cfg, views_per_prompt: int, seed: int, log: Callable = print) -> dict[str, torch.Tensor]:
    """Ground-truth renders of every training prompt at ``views_per_prompt`` cameras drawn from the training
    distribution (each prompt its own draws), each view a render of one of the prompt's components drawn
    uniformly from its completions x instances (``GroundTruth.draw_mixture``; the prompt itself in the default
    world), so a prompt's bank rows sample the mixture the oracle's conditional is: rgb [N, 3, H, W], opacity
    [N, 1, H, W], prompt [N] (index into the world's seen prompts), component [N] (the world's component id),
    c2w [N, 4, 4], fovy [N] (radians)."""
    truth = build_ground_truth(cfg)
    seen = truth.world.splits()["seen"]
    ids = [truth.world.index(p) for p in seen]
    cam_cfg = dataclasses.replace(cfg.camera, views_per_prompt=views_per_prompt, share_across_prompts=False,
                                  resolution_milestones=[])
    gen = torch.Generator().manual_seed(seed)
    cams = sample_train_cameras(cam_cfg, len(seen), gen)
    t0 = time.perf_counter()
    rgb, op, component = truth.draw_mixture(ids, cams, gen)
    log(f"rendered the bank: {len(seen)} prompts x {views_per_prompt} views at {cams.height} px in "
        f"{time.perf_counter() - t0:.0f} s")
    v = views_per_prompt
    return {"rgb": rgb.flatten(0, 1).clamp(0, 1).contiguous(), "opacity": op.flatten(0, 1).contiguous(),
            "prompt": torch.arange(len(seen)).repeat_interleave(v), "component": component.reshape(-1).contiguous(),
            "c2w": cams.c2w.reshape(-1, 4, 4).contiguous(), "fovy": cams.fovy.reshape(-1).contiguous()}


def _build_unet(opts: LearnedTraining, cfg):
    from diffusers import UNet2DConditionModel  # noqa: PLC0415 - the [sd] extra

    torch.manual_seed(opts.seed)
    return UNet2DConditionModel(**unet_config(opts.size, cfg.camera.resolution, cfg.text.dim))


def train_learned(cfg, opts: LearnedTraining, out: str | Path, log: Callable = print) -> dict:
    """Train (or continue) the learned prior in ``out``; returns a summary (steps, seconds, final loss)."""
    out = Path(out)
    if opts.threads:
        torch.set_num_threads(opts.threads)
    record = world_record(cfg)
    options = {k: v for k, v in asdict(opts).items() if k not in RESUMABLE_CHANGES}
    ckpt = latest_checkpoint(out) if (out / "checkpoints").is_dir() else None
    if ckpt is None and (out / INFO_FILE).is_file():
        raise CheckpointError(f"'{out}' holds a learned prior without its checkpoints; give a new --out folder")
    unet = _build_unet(opts, cfg)
    params = [p for p in unet.parameters() if p.requires_grad]
    optim = torch.optim.AdamW(params, lr=opts.lr, weight_decay=opts.weight_decay)
    gen = torch.Generator().manual_seed(opts.seed + 1)
    start = 0
    if ckpt is not None:
        optim_state, rng, state = load_training_state(ckpt)
        changed = sorted(k for k in set(options) | set(state.get("options", {}))
                         if options.get(k) != state.get("options", {}).get(k))
        if changed or state.get("record") != record:
            what = f"learned.{changed[0]}" if changed else "the world, camera, render or text config"
            raise CheckpointError(f"'{out}' was trained with other settings ({what} differs); continue it with the "
                                  "same command (only learned.steps / learned.minutes may change) or give a new --out")
        unet.load_state_dict(load_weights(ckpt))
        optim.load_state_dict(optim_state)
        gen.set_state(rng["generator"])
        start = int(state["step"])
    out.mkdir(parents=True, exist_ok=True)
    if ckpt is None or not (out / BANK_FILE).is_file():  # a fresh run renders its own bank (a stale one may differ)
        bank = render_bank(cfg, opts.views_per_prompt, opts.seed, log)
        with atomic.writing(out / BANK_FILE) as tmp:
            save_file(bank, str(tmp))
    bank = load_bank(out)
    enc = build_text_encoder(cfg)
    seen = build_ground_truth(cfg).world.splits()["seen"]
    tokens = enc.encode(seen).tokens  # [P, L, D]
    z_bank = bank["rgb"] * 2.0 - 1.0
    prompt_of = bank["prompt"]
    ab = ddpm_alphas_cumprod()
    n_bank = len(z_bank)
    n_params = sum(p.numel() for p in params)
    if start >= opts.steps:
        log(f"nothing to train: '{out}' is at step {start} of learned.steps={opts.steps}")
        return {"step": start, "trained": 0, "wall_s": 0.0, "cpu_s": 0.0, "params": n_params}

    def save(step: int, loss: float) -> None:
        save_checkpoint(out, step, unet.state_dict(), optim.state_dict(),
                        {"options": options, "record": record, "loss": loss}, {"generator": gen.get_state()})
        write_learned(out, unet, {**record, "size": opts.size, "steps": step, "seed": opts.seed,
                                  "views_per_prompt": opts.views_per_prompt, "sharpness": opts.sharpness,
                                  "cond_dropout": opts.cond_dropout, "params": n_params})

    bar = None
    if opts.progress:
        from tqdm.auto import tqdm  # noqa: PLC0415

        bar = tqdm(total=opts.steps, initial=start, desc="train-learned", dynamic_ncols=True, unit="step")
    unet.train()
    t0, c0 = time.perf_counter(), time.process_time()
    step, ema_loss, last_saved = start, float("nan"), start
    stopped = None
    with StopSignal(announce=lambda m: log(m)) as stop:
        while step < opts.steps:
            idx = torch.randint(n_bank, (opts.batch,), generator=gen)
            z = z_bank[idx]
            if opts.sharpness > 0:
                z = z + opts.sharpness * torch.randn(z.shape, generator=gen)
            t = torch.randint(0, T, (opts.batch,), generator=gen)
            eps = torch.randn(z.shape, generator=gen)
            drop = torch.rand(opts.batch, generator=gen) < opts.cond_dropout
            emb = torch.where(drop.view(-1, 1, 1), torch.zeros(()), tokens[prompt_of[idx]])
            a = ab[t].sqrt().view(-1, 1, 1, 1)
            s = (1 - ab[t]).sqrt().view(-1, 1, 1, 1)
            x_t = a * z + s * eps
            for g in optim.param_groups:
                g["lr"] = opts.lr * min(1.0, (step + 1) / max(1, opts.warmup))
            loss = (unet(x_t, t, encoder_hidden_states=emb).sample - eps).pow(2).mean()
            optim.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            optim.step()
            step += 1
            lv = loss.item()
            ema_loss = lv if ema_loss != ema_loss else 0.98 * ema_loss + 0.02 * lv
            if bar is not None:
                bar.update(1)
                bar.set_postfix(loss=f"{ema_loss:.4f}", refresh=False)
            over = opts.minutes > 0 and time.perf_counter() - t0 > 60.0 * opts.minutes
            if step % opts.ckpt_every == 0 or step == opts.steps or over or stop.received is not None:
                save(step, ema_loss)
                last_saved = step
            if over:
                stopped = "budget"
                break
            if stop.received is not None:
                stopped = "signal"
                break
    if bar is not None:
        bar.close()
    if last_saved != step:
        save(step, ema_loss)
    summary = {"step": step, "trained": step - start, "wall_s": time.perf_counter() - t0,
               "cpu_s": time.process_time() - c0, "loss_ema": ema_loss, "params": n_params, "stopped": stopped}
    if stopped == "signal":
        raise Interrupted(f"stopped at step {step} with a checkpoint; continue with the same command")
    return summary


__all__ = ["LearnedTraining", "learned_setup", "render_bank", "split_overrides", "train_learned",
           "world_record"]
