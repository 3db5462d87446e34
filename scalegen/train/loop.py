"""The training loop (accelerate), in the shape of accelerate's examples:

    prompts -> text cond -> generator -> fields -> render [B*V images] -> prior.encode -> distiller
            + eikonal / sparsity / opacity-entropy regularisers -> backward -> clip -> step

Runs on one CPU, one GPU or many GPUs (``accelerate launch train.py --config ...``). Seeds are
``train.seed + rank``; data order is a function of (seed, epoch, rank); checkpoints hold weights,
optimizer, data position and RNG, so ``--resume`` continues exactly where a run stopped (on CPU,
the losses after resume equal those of an uninterrupted run; tested). With ``train.grad_accum = k``
an optimizer step averages the gradients of k micro-batches (k x ``data.prompts_per_step`` prompts);
``train.max_steps`` and every step position count optimizer steps, as Lightning's do.
"""
from __future__ import annotations

import contextlib
import math
import time
from pathlib import Path

import imageio.v3 as iio
import torch

from scalegen.config import Config, schedule_value, step_position
from scalegen.data.cameras import orbit_cameras, sample_train_cameras
from scalegen.data.prompts import PromptSampler, read_corpus
from scalegen.data.shards import check_encoder
from scalegen.data.stream import ShardStream
from scalegen.distill import build_distiller
from scalegen.errors import CheckpointError, ConfigError, TrainingError
from scalegen.priors import Prior, build_prior, build_world
from scalegen.render import build_renderer
from scalegen.render.images import image_grid
from scalegen.text import TextCond
from scalegen.text.base import LRU
from scalegen.train.checkpoint import (latest_checkpoint, load_training_state, load_weights, rng_state,
                                       save_checkpoint, set_rng_state)
from scalegen.train.logger import MetricLogger
from scalegen.train.model import build_model


def build_optimizer(cfg: Config, model, distiller) -> torch.optim.Optimizer:
    """Adam/AdamW with one parameter group per generator module (``optim.group_lr``), the
    background, and any parameters the distiller owns."""
    o = cfg.optim
    named = model.generator.param_groups()
    unknown = set(o.group_lr) - set(named)
    if unknown:
        raise ConfigError(f"optim.group_lr names unknown group(s) {sorted(unknown)}; "
                          f"{cfg.generator.name} has groups {sorted(named)}")
    groups = [{"params": ps, "lr": o.group_lr.get(name, o.lr), "name": name} for name, ps in named.items()]
    groups.append({"params": list(model.background.parameters()), "lr": o.lr_background, "name": "background"})
    for name, ps, lr in distiller.param_groups():
        groups.append({"params": ps, "lr": lr, "name": f"distill_{name}"})
    if o.name == "adan":
        from scalegen.train.adan import Adan  # noqa: PLC0415

        return Adan(groups, betas=tuple(o.betas), eps=o.eps, weight_decay=o.weight_decay)
    cls = torch.optim.AdamW if o.name == "adamw" else torch.optim.Adam
    return cls(groups, betas=tuple(o.betas), eps=o.eps, weight_decay=o.weight_decay)


def training_prompts(cfg: Config, world) -> list[str]:
    if cfg.data.prompts == "oracle":
        if world is None:
            raise ConfigError("data.prompts=oracle needs prior.name=oracle; give a corpus file for other priors")
        return world.seen
    prompts = read_corpus(cfg.data.prompts, cfg.data.split)
    if world is not None:
        for p in prompts:
            world.parse(p)  # fails with a clear message for prompts outside the oracle world
    return prompts


class BatchEncoder:
    """Text conditions of a batch: read from shards when they carry embeddings, else computed by the
    frozen encoder and kept in an LRU of ``data.embed_cache`` prompts. Token embeddings stored in
    shards go straight into the prior when it says it takes them (``Prior.stored_tokens``), so the
    prior never re-encodes them."""

    def __init__(self, cfg: Config, text_encoder, prior: Prior, device, sampler):
        self.text_encoder, self.prior, self.device = text_encoder, prior, device
        self.cache, self.prior_cache = LRU(cfg.data.embed_cache), LRU(cfg.data.embed_cache)
        self.n_encoded = 0  # prompts encoded on the fly (cache misses)
        # which stored rows the prior takes: "views" (prompt + 4 variants), "plain" (the prompt) or None
        self.prior_tokens = prior.stored_tokens(sampler.info) if sampler.info is not None else None

    def __call__(self, batch) -> tuple[list[str], TextCond, torch.Tensor]:
        prompts = batch if isinstance(batch, list) else batch.prompts
        cond = None if isinstance(batch, list) else batch.cond
        if cond is None:
            missing = list(dict.fromkeys(p for p in prompts if p not in self.cache))
            if missing:
                c = self.text_encoder.encode(missing)
                self.n_encoded += len(missing)
                for i, p in enumerate(missing):
                    self.cache.put(p, c.index(slice(i, i + 1)))
            cond = TextCond.cat([self.cache.get(p) for p in prompts])
        if self.prior_tokens is not None:
            tok = batch.variants if self.prior_tokens == "views" else batch.cond.tokens[:, None]
            prior_text = self.prior.text_embeddings(prompts, tokens=tok)
        else:
            missing = list(dict.fromkeys(p for p in prompts if p not in self.prior_cache))
            if missing:
                pt = self.prior.text_embeddings(missing)
                for i, p in enumerate(missing):
                    self.prior_cache.put(p, pt[i:i + 1])
            prior_text = torch.cat([self.prior_cache.get(p) for p in prompts])
        return prompts, cond.to(self.device), prior_text


def lr_factor(cfg: Config, step: int) -> float:
    """Learning-rate multiplier at ``step``: a pure function of the step, so resume is exact."""
    o, m = cfg.optim, cfg.train.max_steps
    warm = step_position(o.warmup_steps, m)
    f = min(1.0, (step + 1) / warm) if warm > 0 else 1.0
    if o.lr_schedule == "cosine":
        f *= o.min_lr_ratio + (1 - o.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * min(step / m, 1.0)))
    return f


def regularisers(cfg: Config, out, step: int) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """lambda_eik * mean (|grad d| - 1)^2 + lambda_sp * mean sqrt(o^2 + 0.01)
    + lambda_ent * mean -(o log o + (1 - o) log(1 - o)) (o = opacity clamped to [1e-4, 1 - 1e-4]),
    each lambda a ``Schedule`` at ``step``; a term with lambda 0 is neither computed nor logged."""
    m = cfg.train.max_steps
    total = out.rgb.new_zeros(())
    logs = {}
    lam = schedule_value(cfg.loss.eikonal, step, m)
    if lam > 0 and out.eikonal is not None:
        total = total + lam * out.eikonal
        logs["eikonal"] = out.eikonal.detach()
    lam = schedule_value(cfg.loss.sparsity, step, m)
    if lam > 0:
        sparsity = (out.opacity.pow(2) + 0.01).sqrt().mean()
        total = total + lam * sparsity
        logs["sparsity"] = sparsity.detach()
    lam = schedule_value(cfg.loss.opacity_entropy, step, m)
    if lam > 0:
        o = out.opacity.clamp(1e-4, 1 - 1e-4)
        ent = -(o * o.log() + (1 - o) * (1 - o).log()).mean()
        total = total + lam * ent
        logs["opacity_entropy"] = ent.detach()
    return total, logs


class Validator:
    """Renders a fixed set of prompts on the evaluation orbit into a PNG grid (ground truth rows
    interleaved in the oracle world). Uses no randomness, so it never perturbs a run's RNG."""

    def __init__(self, cfg: Config, world, prior, prompts: list[str]):
        c = cfg.camera
        self.cams = orbit_cameras(4, c.eval_elevation, c.eval_distance, c.eval_fovy, c.eval_resolution)
        if world is not None:
            self.prompts = world.seen[:3] + world.unseen[:3]
        else:
            self.prompts = prompts[:6]
        self.world, self.prior, self.cfg = world, prior, cfg
        self.renderer = build_renderer(cfg).eval()

    @torch.no_grad()
    def __call__(self, model, text_encoder, path: Path):
        was_training = model.training
        model.eval()
        field, bg = model(text_encoder.encode(self.prompts))
        out = self.renderer(field, self.cams, background=bg, samples=self.cfg.eval.samples,
                            importance_samples=self.cfg.eval.importance_samples)
        pred = out.rgb.view(len(self.prompts), -1, *out.rgb.shape[1:])
        rows = []
        gt = None
        if self.world is not None:
            ids = [self.world.index(p) for p in self.prompts]
            gt = self.prior.render(ids, self.cams)
        for i in range(len(self.prompts)):
            rows.append(pred[i])
            if gt is not None:
                rows.append(gt[i])
        grid = image_grid(rows)
        path.parent.mkdir(parents=True, exist_ok=True)
        iio.imwrite(path, grid)
        model.train(was_training)
        return grid


def train(cfg: Config, run_dir: str | Path, resume: bool = False) -> Path:
    """Train (or resume) a run in ``run_dir``; returns the last checkpoint's path."""
    from accelerate import Accelerator, DistributedDataParallelKwargs  # noqa: PLC0415 - slow import

    run_dir = Path(run_dir)
    if cfg.train.threads > 0:
        torch.set_num_threads(cfg.train.threads)
    ddp = DistributedDataParallelKwargs(find_unused_parameters=cfg.render.bg_random_prob > 0)
    acc = Accelerator(mixed_precision=cfg.train.mixed_precision, cpu=not torch.cuda.is_available(),
                      kwargs_handlers=[ddp])
    rank, world_size, main = acc.process_index, acc.num_processes, acc.is_main_process

    ckpt = None
    if resume:
        if not run_dir.is_dir():
            raise CheckpointError(f"run directory '{run_dir}' does not exist; drop --resume to start a new run")
        ckpt = latest_checkpoint(run_dir)
        if ckpt is None and main:
            print(f"no checkpoint in {run_dir} yet: starting from step 0")
    elif latest_checkpoint(run_dir) is not None:
        raise CheckpointError(f"'{run_dir}' already holds checkpoints; pass --resume to continue it or choose "
                              "another --out")
    torch.manual_seed(cfg.train.seed)  # identical initial weights on every rank
    text_encoder, model = build_model(cfg)
    world = build_world(cfg) if cfg.prior.name == "oracle" else None
    prompts = training_prompts(cfg, world) if not cfg.data.shards else None
    prior = build_prior(cfg, world, text_encoder=text_encoder, device=acc.device)  # SD reuses the CLIP tower
    distiller = build_distiller(cfg, prior, cond_dim=text_encoder.dim)
    renderer = build_renderer(cfg).train()
    optimizer = build_optimizer(cfg, model, distiller)
    base_lr = [g["lr"] for g in optimizer.param_groups]  # before a resumed state overwrites them
    if cfg.data.shards:
        sampler = ShardStream(cfg.data.shards, cfg.data.split, cfg.data.prompts_per_step, seed=cfg.train.seed,
                              rank=rank, world_size=world_size, mode="train", shuffle_shards=cfg.data.shuffle_shards,
                              num_workers=cfg.data.num_workers, on_corrupt=cfg.data.on_corrupt, url=cfg.data.shard_url)
        check_encoder(sampler.manifest, text_encoder, cfg.data.shards)
        prompts = sampler.first_prompts(6)
        if world is not None:  # every prompt must be in the oracle grammar: say so now, not mid-run
            check = ShardStream(cfg.data.shards, cfg.data.split, 4096, mode="eval", url=cfg.data.shard_url,
                                on_corrupt=cfg.data.on_corrupt)
            for b in check:
                for p in b.prompts:
                    world.parse(p)
    else:
        sampler = PromptSampler(prompts, cfg.data.prompts_per_step, seed=cfg.train.seed, rank=rank,
                                world_size=world_size)
    start = 0
    if ckpt is not None:
        weights = load_weights(ckpt)
        opt_state, rng, state = load_training_state(ckpt)
        saved_world = int(state.get("world_size", 1))
        if saved_world != world_size:
            raise CheckpointError(f"checkpoint '{ckpt}' was written by {saved_world} process(es) but this run has "
                                  f"{world_size}; resume with {saved_world} (each process continues its own data "
                                  "position and RNG stream)")
        model.load_state_dict({k[6:]: v for k, v in weights.items() if k.startswith("model.")})
        distiller.load_state_dict({k[len("distiller."):]: v for k, v in weights.items() if k.startswith("distiller.")})
        optimizer.load_state_dict(opt_state)
        sampler.load_state_dict(state["data"][str(rank)])
        start = int(state["step"])
        set_rng_state(rng["ranks"][str(rank)])
    else:
        torch.manual_seed(cfg.train.seed + rank)
    model, optimizer = acc.prepare(model, optimizer)
    raw_model = acc.unwrap_model(model)
    # Clip the generator's gradients only: a distiller's own model (VSD's phi, VDM's psi) trains on its
    # own loss and must not shrink the generator's step.
    params = [p for g in optimizer.param_groups if not str(g.get("name", "")).startswith("distill_")
              for p in g["params"]]
    distiller_params = list(distiller.parameters())
    # Everything is built and every input checked: only now does the run directory appear, so a start
    # that fails leaves nothing behind (and the next attempt is not redirected by a stale folder).
    if main:
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "config.yaml").write_text(cfg.to_yaml())
    acc.wait_for_everyone()
    logger = MetricLogger(run_dir, cfg, enabled=main, resume_step=start)
    validator = Validator(cfg, world, prior, prompts) if main else None
    encode = BatchEncoder(cfg, text_encoder, prior, acc.device, sampler)
    v = cfg.camera.views_per_prompt
    max_steps = cfg.train.max_steps

    bar = None
    if main and cfg.train.progress:
        from tqdm.auto import tqdm  # noqa: PLC0415

        bar = tqdm(total=max_steps, initial=start, desc="train", dynamic_ncols=True, unit="step")
    last = ckpt
    step_time = None
    # Host syncs (.item(), float(), bool checks) happen only on logging and checkpoint steps, so a GPU
    # never waits for the CPU in between; a non-finite loss is remembered on the device until then.
    first_bad = torch.full((), -1, dtype=torch.long, device=acc.device)
    accum = cfg.train.grad_accum
    try:
        for step in range(start, max_steps):
            t0 = time.perf_counter()
            optimizer.zero_grad(set_to_none=True)
            loss_sum, loss_d_sum = 0.0, 0.0
            # ``grad_accum`` micro-batches per optimizer step, each backpropagated at once (its graph freed);
            # gradients average over them (loss / accum) and DDP syncs only on the last one.
            for micro in range(accum):
                batch, cond, prior_text = encode(sampler.next_batch())
                with acc.autocast():
                    field, background = model(cond)
                    cams = sample_train_cameras(cfg.camera, len(batch)).to(acc.device)
                    lam_eik = schedule_value(cfg.loss.eikonal, step, max_steps)
                    out = renderer(field, cams, background=background, with_eikonal=lam_eik > 0)
                    latents = prior.encode(out.rgb)
                loss_d, dlogs = distiller(latents, prior_text.repeat_interleave(v), cams.expand(len(batch)), step,
                                          pooled=cond.pooled.repeat_interleave(v, 0))
                reg, rlogs = regularisers(cfg, out, step)
                loss = cfg.loss.distill * loss_d + reg
                first_bad = torch.where((first_bad < 0) & ~torch.isfinite(loss.detach()),
                                        first_bad.new_full((), step + 1), first_bad)  # 1-based, as logged
                with acc.no_sync(model) if micro < accum - 1 else contextlib.nullcontext():
                    acc.backward(loss / accum if accum > 1 else loss)
                loss_sum, loss_d_sum = loss_sum + loss.detach() / accum, loss_d_sum + loss_d.detach() / accum
            if world_size > 1 and distiller_params:  # the distiller's own model is not DDP-wrapped: average by hand
                _all_reduce_mean(distiller_params, world_size)
            factor = lr_factor(cfg, step)
            for group, lr in zip(optimizer.param_groups, base_lr):
                group["lr"] = lr * factor
            grad_norm = None
            if cfg.optim.grad_clip:
                grad_norm = acc.clip_grad_norm_(params, cfg.optim.grad_clip)
            optimizer.step()
            done = step + 1
            dt = time.perf_counter() - t0
            step_time = dt if step_time is None else 0.9 * step_time + 0.1 * dt
            log_now = done % cfg.train.log_every == 0 or done == max_steps or done == start + 1
            save_now = done % cfg.train.ckpt_every == 0 or done == max_steps
            if log_now or save_now:
                bad = int(first_bad)
                if bad >= 0:
                    raise TrainingError(f"the loss was not finite at step {bad}: training diverged; lower the "
                                        "learning rates and resume from the last checkpoint (`--resume`)")
            if main and log_now:
                metrics = {"loss": float(loss_sum), "loss_distill": float(loss_d_sum),
                           "opacity": float(out.opacity.detach().mean()),
                           "step_s": dt, **{f"distill/{k}": float(x) for k, x in dlogs.items()},
                           **{k: float(x) for k, x in rlogs.items()}}
                if grad_norm is not None:
                    metrics["param_grad_norm"] = float(grad_norm)
                logger.log(done, metrics)
                if bar is not None:
                    bar.set_postfix(loss=f"{metrics['loss']:.3g}", opacity=f"{metrics['opacity']:.2f}",
                                    s_per_step=f"{step_time:.2f}")
            if bar is not None:
                bar.update(1)
            if validator is not None and (done % cfg.train.val_every == 0 or done == max_steps):
                grid = validator(raw_model, text_encoder, run_dir / "val" / f"step_{done:07d}.png")
                logger.log_image(done, "val/grid", grid)
            if save_now:
                last = _save(acc, run_dir, done, raw_model, optimizer, distiller, sampler, cfg)
    finally:
        if bar is not None:
            bar.close()
        logger.close()
    return last


def _all_reduce_mean(params, world_size: int) -> None:
    import torch.distributed as dist  # noqa: PLC0415

    for p in params:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
        dist.all_reduce(p.grad)
        p.grad /= world_size


def _save(acc, run_dir: Path, step: int, model, optimizer, distiller, sampler, cfg: Config) -> Path:
    """Gather every rank's data position and RNG, then write one checkpoint from the main rank."""
    data = {str(acc.process_index): sampler.state_dict()}
    rng = {str(acc.process_index): rng_state()}
    if acc.num_processes > 1:
        import torch.distributed as dist  # noqa: PLC0415

        gathered: list = [None] * acc.num_processes
        dist.all_gather_object(gathered, (data, rng))
        data, rng = {}, {}
        for d, r in gathered:
            data.update(d)
            rng.update(r)
    path = run_dir / "checkpoints" / f"step_{step:07d}"
    if acc.is_main_process:
        state = {f"model.{k}": t for k, t in model.state_dict().items()}
        state.update({f"distiller.{k}": t for k, t in distiller.state_dict().items()})
        path = save_checkpoint(run_dir, step, state, optimizer.state_dict(),
                               {"data": data, "world_size": acc.num_processes}, {"ranks": rng},
                               keep=cfg.train.keep_ckpts)
    acc.wait_for_everyone()
    return path
