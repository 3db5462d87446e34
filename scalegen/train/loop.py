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
import os
import time
from collections.abc import Callable
from pathlib import Path

import imageio.v3 as iio
import torch
from einops import rearrange

from scalegen import atomic
from scalegen.config import PER_PROMPT, Config, load_yaml, schedule_value, step_position
from scalegen.data.cameras import orbit_cameras, sample_train_cameras
from scalegen.data.prompts import PromptSampler, check_encodable, read_corpus_lines
from scalegen.data.sampler import Batch, Sampler
from scalegen.data.shards import check_encoder
from scalegen.data.stream import ShardStream
from scalegen.distill import build_distiller
from scalegen.errors import CheckpointError, ConfigError, DataError, Interrupted, Preempted, TrainingError
from scalegen.locks import FolderLock, FolderLocked
from scalegen.priors import GroundTruth, Prior, build_ground_truth, build_prior
from scalegen.render import build_renderer
from scalegen.render.images import image_grid
from scalegen.text import TextCond
from scalegen.text.base import LRU
from scalegen.train.checkpoint import (config_changes, latest_checkpoint, load_training_state, load_weights,
                                       rng_state, run_dir_of, save_checkpoint, set_rng_state, shape_mismatch,
                                       temp_checkpoint_dir)
from scalegen.train.distributed import PREEMPTED_EXIT, StopSignal, agree, launch_warning
from scalegen.train.logger import MetricLogger
from scalegen.train.model import build_model


def _optimizer(cfg: Config, groups: list[dict]) -> torch.optim.Optimizer:
    o = cfg.optim
    if o.name == "adan":
        from scalegen.train.adan import Adan  # noqa: PLC0415

        return Adan(groups, betas=tuple(o.betas), eps=o.eps, weight_decay=o.weight_decay)
    cls = torch.optim.AdamW if o.name == "adamw" else torch.optim.Adam
    return cls(groups, betas=tuple(o.betas), eps=o.eps, weight_decay=o.weight_decay)


def build_optimizer(cfg: Config, model) -> torch.optim.Optimizer:
    """Adam/AdamW/Adan over the trainable 3D part: one parameter group per generator module
    (``optim.group_lr``) and the background. This is the optimizer the engine (DDP, DeepSpeed) manages."""
    o = cfg.optim
    named = model.generator.param_groups()
    unknown = set(o.group_lr) - set(named)
    if unknown:
        raise ConfigError(f"optim.group_lr names unknown group(s) {sorted(unknown)}; "
                          f"{cfg.generator.name} has groups {sorted(named)}")
    groups = [{"params": ps, "lr": o.group_lr.get(name, o.lr), "name": name} for name, ps in named.items()]
    groups.append({"params": list(model.background.parameters()), "lr": o.lr_background, "name": "background"})
    return _optimizer(cfg, groups)


def build_distiller_optimizer(cfg: Config, distiller) -> torch.optim.Optimizer | None:
    """The same optimizer kind over what a stateful distiller owns (VSD's phi, VDM's M_psi), at its own
    learning rate; None for SDS/CSD/ASD. Kept apart from the generator's so that an engine that
    partitions optimizer state (DeepSpeed ZeRO) only sees the generator; the distiller's replicas stay
    in sync through an all-reduce of its gradients."""
    groups = [{"params": ps, "lr": lr, "name": f"distill_{name}"} for name, ps, lr in distiller.param_groups()]
    return _optimizer(cfg, groups) if groups else None


class Optimizers:
    """The generator's optimizer (wrapped by the engine) and the distiller's own (or None), stepped,
    zeroed and scheduled together."""

    def __init__(self, generator: torch.optim.Optimizer, distiller: torch.optim.Optimizer | None):
        self.generator, self.distiller = generator, distiller
        self.base_lr = [g["lr"] for g in self.groups()]  # before a resumed state overwrites them

    def groups(self) -> list[dict]:
        return [*self.generator.param_groups, *(self.distiller.param_groups if self.distiller else [])]

    def scale_lr(self, factor: float) -> None:
        for group, lr in zip(self.groups(), self.base_lr):
            group["lr"] = lr * factor

    def zero_grad(self) -> None:
        self.generator.zero_grad(set_to_none=True)
        if self.distiller is not None:
            self.distiller.zero_grad(set_to_none=True)

    def step(self) -> None:
        self.generator.step()
        if self.distiller is not None:
            self.distiller.step()

    def state_dict(self, engine_holds_generator: bool = False) -> dict:
        return {"generator": None if engine_holds_generator else self.generator.state_dict(),
                "distiller": None if self.distiller is None else self.distiller.state_dict()}

    def load_state_dict(self, state: dict, engine_holds_generator: bool = False) -> None:
        if "generator" not in state:  # a checkpoint from before the split: one optimizer, distiller groups last
            state = split_optimizer_state(state, len(self.generator.param_groups))
        if not engine_holds_generator:
            self.generator.load_state_dict(state["generator"])
        if self.distiller is not None:
            if state["distiller"] is None:
                raise CheckpointError("the checkpoint holds no optimizer state for the distiller's own model; resume "
                                      "with the distiller (distill.name) the run was trained with")
            self.distiller.load_state_dict(state["distiller"])


def split_optimizer_state(state: dict, n_generator_groups: int) -> dict:
    """An optimizer state dict over [generator groups..., distiller groups...] (checkpoints written before
    the distiller had its own optimizer) as the two optimizers' state dicts."""
    groups = state["param_groups"]

    def part(gs: list[dict]) -> dict | None:
        if not gs:
            return None
        ids = [i for g in gs for i in g["params"]]
        remap = {old: new for new, old in enumerate(ids)}
        return {"state": {remap[i]: v for i, v in state["state"].items() if i in remap},
                "param_groups": [{**g, "params": [remap[i] for i in g["params"]]} for g in gs]}

    return {"generator": part(groups[:n_generator_groups]), "distiller": part(groups[n_generator_groups:])}


def training_prompts(cfg: Config, world, text_encoder=None) -> list[str]:
    if cfg.data.prompt is not None:  # per-prompt refinement
        if world is not None:
            world.parse(cfg.data.prompt)  # a clear message for a prompt outside the oracle world
        return [cfg.data.prompt]
    if cfg.data.prompts == "oracle":
        if world is None:
            raise ConfigError("data.prompts=oracle needs prior.name=oracle; give a corpus file for other priors")
        return world.seen
    lines = read_corpus_lines(cfg.data.prompts, cfg.data.split)
    if not lines:
        raise DataError(f"corpus '{cfg.data.prompts}' (split {cfg.data.split!r}) holds no prompts")
    if text_encoder is not None:  # a prompt the encoder cannot encode is named now, not at its first batch
        check_encodable(cfg.data.prompts, lines, text_encoder, cfg.data.split)
    prompts = [p for p, _ in lines]
    if world is not None:
        for p in prompts:
            world.parse(p)  # fails with a clear message for prompts outside the oracle world
    return prompts


class BatchEncoder:
    """Text conditions of a batch: read from shards when they carry embeddings, else computed by the
    frozen encoder and kept in an LRU of ``data.embed_cache`` prompts. Token embeddings stored in
    shards go straight into the prior when it says it takes them (``Prior.stored_tokens``), so the
    prior never re-encodes them."""

    def __init__(self, cfg: Config, text_encoder, prior: Prior, device, sampler: Sampler):
        self.text_encoder, self.prior, self.device = text_encoder, prior, device
        self.cache, self.prior_cache = LRU(cfg.data.embed_cache), LRU(cfg.data.embed_cache)
        self.n_encoded = 0  # prompts encoded on the fly (cache misses)
        # which stored rows the prior takes: "views" (prompt + 4 variants), "plain" (the prompt) or None
        self.prior_tokens = prior.stored_tokens(sampler.info) if sampler.info is not None else None

    def __call__(self, batch: Batch) -> tuple[list[str], TextCond, torch.Tensor]:
        prompts, cond = batch.prompts, batch.cond
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

    def __init__(self, cfg: Config, truth: GroundTruth | None, prompts: list[str]):
        c = cfg.camera
        self.cams = orbit_cameras(4, c.eval_elevation, c.eval_distance, c.eval_fovy, c.eval_resolution)
        if cfg.data.prompt is not None:  # per-prompt refinement: its one prompt
            self.prompts = [cfg.data.prompt]
        elif truth is not None:
            self.prompts = truth.world.seen[:3] + truth.world.unseen[:3]
        else:
            self.prompts = prompts[:6]
        self.truth, self.cfg = truth, cfg
        self.renderer = build_renderer(cfg).eval()

    @torch.no_grad()
    def __call__(self, model, text_encoder, path: Path):
        was_training = model.training
        model.eval()
        field, bg = model(text_encoder.encode(self.prompts))
        out = self.renderer(field, self.cams, background=bg,
                            **self.renderer.eval_options(self.cfg.eval.samples, self.cfg.eval.importance_samples))
        pred = rearrange(out.rgb, "(b v) c h w -> b v c h w", b=len(self.prompts))
        rows = []
        gt = self.truth.render(self.prompts, self.cams) if self.truth is not None else None
        for i in range(len(self.prompts)):
            rows.append(pred[i])
            if gt is not None:
                rows.append(gt[i])
        grid = image_grid(rows)
        path.parent.mkdir(parents=True, exist_ok=True)
        iio.imwrite(path, grid)
        model.train(was_training)
        return grid


ENGINES = {"NO": "one process", "MULTI_CPU": "DDP over gloo", "MULTI_GPU": "DDP over NCCL", "DEEPSPEED": "DeepSpeed"}


def make_accelerator(cfg: Config):
    """accelerate's Accelerator for this run: DDP (or the launcher's engine, e.g. DeepSpeed), the
    collective timeout after which a rank that stopped answering fails the others, CPU when no GPU."""
    from datetime import timedelta  # noqa: PLC0415

    from accelerate import Accelerator, DistributedDataParallelKwargs, InitProcessGroupKwargs  # noqa: PLC0415

    ddp = DistributedDataParallelKwargs(find_unused_parameters=cfg.render.bg_random_prob > 0)
    pg = InitProcessGroupKwargs(timeout=timedelta(seconds=cfg.train.collective_timeout_s))
    plugin = None
    if os.environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() == "true":  # launched with a DeepSpeed config
        from accelerate.utils import DeepSpeedPlugin  # noqa: PLC0415

        # Accumulation and clipping are the run's (train.grad_accum, optim.grad_clip), whatever the launch
        # config says; the rest (ZeRO stage, offload) comes from it.
        plugin = DeepSpeedPlugin(gradient_accumulation_steps=cfg.train.grad_accum,
                                 gradient_clipping=float(cfg.optim.grad_clip or 0.0))
        plugin.deepspeed_config["train_micro_batch_size_per_gpu"] = cfg.data.prompts_per_step
    # cpu=True picks accelerate's CPU path (gloo DDP); DeepSpeed runs on its own CPU accelerator instead.
    return Accelerator(mixed_precision=cfg.train.mixed_precision, cpu=not torch.cuda.is_available() and plugin is None,
                       kwargs_handlers=[ddp, pg], deepspeed_plugin=plugin,
                       gradient_accumulation_steps=cfg.train.grad_accum if plugin is not None else 1)


def train(cfg: Config, run_dir: str | Path, resume: bool = False, init_state: dict | None = None,
          resume_command: str | None = None, on_validate: Callable | None = None,
          stop_after: int | None = None) -> Path:
    """Train (or resume) a run in ``run_dir``; returns the last checkpoint's path. Raises ``Preempted``
    after writing a checkpoint when the process receives SIGTERM, ``Interrupted`` after writing one on
    the first Ctrl-C (SIGINT). ``init_state``: the ``SceneModel``'s starting weights (a new run only;
    per-prompt refinement starts from an amortized generator's output). ``resume_command``: the command
    that continues this run, said on an interrupt (default ``scalegen train --out RUN_DIR --resume``).
    ``on_validate(model, text_encoder, prompts, step, run_dir, logger)``: more validation on the main process
    after the image grid (``scalegen train`` passes the 3D assets and metrics of ``pipeline.validation``, a
    floor above this one). ``stop_after``: return after this many optimizer steps of this call, with a
    checkpoint written, while every schedule still follows ``train.max_steps`` (``bench paper-step`` takes two
    steps of a full run). The run folder is locked (``scalegen.locks``) while the run writes it: a second
    writer is refused."""
    run_dir = Path(run_dir)
    if cfg.train.threads > 0:
        torch.set_num_threads(cfg.train.threads)
    acc = make_accelerator(cfg)
    lock = FolderLock(run_dir, "scalegen train", rank=acc.process_index, log=lambda m: print(m, flush=True))
    refused = None
    try:
        lock.acquire()
    except FolderLocked as e:
        refused = e
    if acc.num_processes > 1 and agree([refused is not None], acc.device, acc.num_processes)[0] and refused is None:
        raise FolderLocked(f"'{run_dir}' is locked by another process (process 0 of this job says who)")
    if refused is not None:
        raise refused
    try:
        return _train(cfg, run_dir, acc, resume, init_state,
                      resume_command or f"scalegen train --out {run_dir} --resume", on_validate, stop_after)
    finally:
        lock.release()


def _train(cfg: Config, run_dir: Path, acc, resume: bool, init_state: dict | None, resume_command: str,
           on_validate: Callable | None = None, stop_after: int | None = None) -> Path:
    rank, world_size, main = acc.process_index, acc.num_processes, acc.is_main_process
    warning = launch_warning(world_size)
    if warning and main:
        print(f"warning: {warning}", flush=True)

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
    elif (run_dir / "config.yaml").is_file():  # a run that has not reached its first checkpoint yet
        raise CheckpointError(f"'{run_dir}' holds another run (its config.yaml) with no checkpoint yet; pass "
                              "--resume to continue it or choose another --out")
    if world_size > 1 and cfg.generator.name in PER_PROMPT:
        raise ConfigError(f"generator.name={cfg.generator.name} (per-prompt refinement) runs in one process; "
                          "launch it without accelerate launch / torchrun")
    torch.manual_seed(cfg.train.seed)  # identical initial weights on every rank
    text_encoder, model = build_model(cfg)
    if init_state is not None and ckpt is None:
        model.load_state_dict(init_state)
    # the oracle's world checks every training prompt, and a prompt the encoder cannot encode is named, before
    # the prior loads
    early = build_ground_truth(cfg)
    world = early.world if early is not None else None
    prompts = training_prompts(cfg, world, text_encoder) if not cfg.data.shards else None
    prior = build_prior(cfg, world, text_encoder=text_encoder, device=acc.device)  # SD reuses the CLIP tower
    truth = prior.ground_truth()
    distiller = build_distiller(cfg, prior, cond_dim=text_encoder.dim)
    renderer = build_renderer(cfg).train()
    optimizers = Optimizers(build_optimizer(cfg, model), build_distiller_optimizer(cfg, distiller))
    sampler, prompts = build_sampler(cfg, world, text_encoder, prompts, rank, world_size)
    deepspeed = acc.distributed_type.value == "DEEPSPEED"
    start = 0
    if ckpt is not None:
        start = restore(ckpt, cfg, model, distiller, optimizers, sampler, rank, world_size, main, deepspeed)
    else:
        torch.manual_seed(cfg.train.seed + rank)
    # The generator and background are the only module the engine wraps (DDP, DeepSpeed) and the only
    # optimizer it manages; the frozen prior and text encoder are never wrapped and hold no optimizer state.
    generator_optimizer = optimizers.generator  # the torch optimizer itself (a Gaussian scene edits its state)
    model, optimizers.generator = acc.prepare(model, optimizers.generator)
    raw_model = acc.unwrap_model(model)
    if deepspeed and ckpt is not None:  # the engine's own (partitioned) optimizer state
        model.load_checkpoint(str(ckpt / "deepspeed"), tag="engine", load_module_strict=True,
                              load_optimizer_states=True, load_lr_scheduler_states=False)
    # Clip the generator's gradients only: a distiller's own model (VSD's phi, VDM's psi) trains on its
    # own loss and must not shrink the generator's step.
    params = [p for g in optimizers.generator.param_groups for p in g["params"]]
    distiller_params = list(distiller.parameters())
    # Everything is built and every input checked: only now does the run directory appear, so a start
    # that fails leaves nothing behind (and the next attempt is not redirected by a stale folder).
    if main:
        run_dir.mkdir(parents=True, exist_ok=True)
        atomic.write_text(run_dir / "config.yaml", cfg.to_yaml())
    acc.wait_for_everyone()
    logger = MetricLogger(run_dir, cfg, enabled=main, resume_step=start)
    validator = Validator(cfg, truth, prompts) if main else None
    encode = BatchEncoder(cfg, text_encoder, prior, acc.device, sampler)
    v = cfg.camera.views_per_prompt
    max_steps = cfg.train.max_steps
    end = max_steps if stop_after is None else min(max_steps, start + stop_after)
    accum = cfg.train.grad_accum
    if main:
        p = cfg.data.prompts_per_step
        print(f"effective batch: {p} prompt(s) x {v} view(s) per process x {world_size} process(es) x {accum} "
              f"accumulation = {p * world_size * accum} prompts ({p * v * world_size * accum} images) per optimizer "
              f"step; {ENGINES.get(acc.distributed_type.value, acc.distributed_type.value)} on {acc.device.type}"
              f"{', ' + str(acc.mixed_precision) if acc.mixed_precision != 'no' else ''}", flush=True)
        for at, res, views in cfg.camera.resolution_milestones:
            print(f"from step {step_position(at, max_steps):g}: {res:g} px, {views:g} view(s) per prompt", flush=True)

    bar = None
    if main and cfg.train.progress:
        from tqdm.auto import tqdm  # noqa: PLC0415

        bar = tqdm(total=max_steps, initial=start, desc="train", dynamic_ncols=True, unit="step")
    last = ckpt
    step_time = None
    # Host syncs: one read of two all-reduced flags per step (a non-finite step to skip, a stop signal),
    # as torch.amp's GradScaler does; with train.skip_nonfinite=false not even that: the loss is kept on
    # the device and checked on logging and checkpoint steps only.
    first_bad = torch.full((), -1, dtype=torch.long, device=acc.device)
    bad_in_row, bad_total = 0, 0
    stop = StopSignal(announce=(lambda m: os.write(2, (m + "\n").encode())) if main else None)
    try:
        with stop:
            for step in range(start, end):
                t0, c0 = time.perf_counter(), time.process_time()
                optimizers.zero_grad()
                loss_sum, loss_d_sum = 0.0, 0.0
                # ``grad_accum`` micro-batches per optimizer step, each backpropagated at once (its graph
                # freed); gradients average over them (loss / accum) and DDP syncs only on the last one.
                for micro in range(accum):
                    batch, cond, prior_text = encode(sampler.next_batch())
                    with acc.autocast():
                        field, background = model(cond)
                        step_cams = cfg.camera.at_step(step, max_steps)  # resolution milestones
                        v = step_cams.views_per_prompt
                        cams = sample_train_cameras(step_cams, len(batch)).to(acc.device)
                        lam_eik = schedule_value(cfg.loss.eikonal, step, max_steps)
                        out = renderer(field, cams, background=background, with_eikonal=lam_eik > 0)
                        latents = prior.encode(out.rgb)
                    loss_d, dlogs = distiller(latents, prior_text.repeat_interleave(v), cams.expand(len(batch)),
                                              step, pooled=cond.pooled.repeat_interleave(v, 0))
                    reg, rlogs = regularisers(cfg, out, step)
                    loss = cfg.loss.distill * loss_d + reg
                    with acc.no_sync(model) if micro < accum - 1 else contextlib.nullcontext():
                        acc.backward(loss / accum if accum > 1 else loss)
                    raw_model.generator.after_backward(out)  # e.g. a Gaussian scene's densification statistics
                    loss_sum, loss_d_sum = loss_sum + loss.detach() / accum, loss_d_sum + loss_d.detach() / accum
                if world_size > 1 and distiller_params:  # the distiller's own model is not DDP-wrapped
                    _all_reduce_mean(distiller_params, world_size)
                optimizers.scale_lr(lr_factor(cfg, step))
                grad_norm = None
                if cfg.optim.grad_clip:
                    grad_norm = acc.clip_grad_norm_(params, cfg.optim.grad_clip)
                finite = torch.isfinite(loss_sum) & (torch.isfinite(grad_norm) if torch.is_tensor(grad_norm)
                                                     else torch.ones((), dtype=torch.bool, device=acc.device))
                done = step + 1
                skipped = False
                if cfg.train.skip_nonfinite:
                    bad, stopping = agree([~finite, stop.received is not None], acc.device, world_size)
                    if bad and deepspeed:  # the engine already stepped inside backward: nothing to skip
                        raise TrainingError(f"the loss or gradient was not finite at step {done} (DeepSpeed applies "
                                            "the update inside backward, so the step cannot be skipped); lower the "
                                            "learning rates and resume from the last checkpoint (`--resume`)")
                    if bad:  # on some rank: every rank skips this step together
                        skipped = True
                        optimizers.zero_grad()
                        bad_in_row, bad_total = bad_in_row + 1, bad_total + 1
                        if main:
                            print(f"step {done}: the loss or gradient was not finite on a process; step skipped "
                                  f"({bad_total} so far, {bad_in_row} in a row)", flush=True)
                        if bad_in_row >= cfg.train.max_bad_steps:
                            raise TrainingError(f"{bad_in_row} steps in a row had a non-finite loss or gradient (up "
                                                f"to step {done}): training diverged; lower the learning rates and "
                                                "resume from the last checkpoint (`--resume`)")
                    else:
                        bad_in_row = 0
                        optimizers.step()
                else:
                    first_bad = torch.where((first_bad < 0) & ~finite, first_bad.new_full((), done), first_bad)
                    optimizers.step()
                    stopping = world_size == 1 and stop.received is not None  # no collective needed to agree
                if raw_model.generator.adapt(done, generator_optimizer):  # e.g. densify / prune Gaussians
                    params = [p for g in optimizers.generator.param_groups for p in g["params"]]
                dt, cpu_dt = time.perf_counter() - t0, time.process_time() - c0
                step_time = dt if step_time is None else 0.9 * step_time + 0.1 * dt
                log_now = done % cfg.train.log_every == 0 or done in (max_steps, end, start + 1)
                save_now = done % cfg.train.ckpt_every == 0 or done == max_steps or done == end
                if not cfg.train.skip_nonfinite and (log_now or save_now):
                    bad = int(first_bad)
                    if bad >= 0:
                        raise TrainingError(f"the loss was not finite at step {bad}: training diverged; lower the "
                                            "learning rates and resume from the last checkpoint (`--resume`)")
                    stopping = agree([stop.received is not None], acc.device, world_size)[0]
                if main and log_now:
                    metrics = {"loss": float(loss_sum), "loss_distill": float(loss_d_sum),
                               "opacity": float(out.opacity.detach().mean()), "step_s": dt,
                               "step_cpu_s": cpu_dt,
                               "skipped_steps": bad_total, **{f"distill/{k}": float(x) for k, x in dlogs.items()},
                               **{k: float(x) for k, x in rlogs.items()}}
                    if grad_norm is not None and not skipped:
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
                    if on_validate is not None:
                        on_validate(raw_model, text_encoder, validator.prompts, done, run_dir, logger)
                if save_now or stopping:
                    last = _save(acc, run_dir, done, model, raw_model, optimizers, distiller, sampler, cfg)
                if stopping and stop.interrupted:
                    raise Interrupted(f"interrupted after step {done}; checkpoint {last} is written; continue with "
                                      f"`{resume_command}` (resumes at step {done})")
                if stopping:
                    raise Preempted(f"stopped on a termination signal after step {done}; checkpoint {last} is "
                                    f"written; continue with `--resume` (exit code {PREEMPTED_EXIT} lets a job "
                                    "script requeue the run)")
    finally:
        if bar is not None:
            bar.close()
        logger.close()
    return last


def build_sampler(cfg: Config, world, text_encoder, prompts, rank: int, world_size: int) -> tuple[Sampler, list[str]]:
    """(this rank's batch source, prompts for the validation grid): webdataset shards (checked against
    the run's text encoder and, in the oracle world, its grammar) or an in-memory corpus."""
    if not cfg.data.shards:
        return PromptSampler(prompts, cfg.data.prompts_per_step, seed=cfg.train.seed, rank=rank,
                             world_size=world_size), prompts
    sampler = ShardStream(cfg.data.shards, cfg.data.split, cfg.data.prompts_per_step, seed=cfg.train.seed,
                          rank=rank, world_size=world_size, mode="train", shuffle_shards=cfg.data.shuffle_shards,
                          num_workers=cfg.data.num_workers, on_corrupt=cfg.data.on_corrupt, url=cfg.data.shard_url)
    check_encoder(sampler.manifest, text_encoder, cfg.data.shards)
    if world is not None:  # every prompt must be in the oracle grammar: say so now, not mid-run
        check = ShardStream(cfg.data.shards, cfg.data.split, 4096, mode="eval", url=cfg.data.shard_url,
                            on_corrupt=cfg.data.on_corrupt)
        for b in check:
            for p in b.prompts:
                world.parse(p)
    return sampler, sampler.first_prompts(6)


def restore(ckpt: Path, cfg: Config, model, distiller, optimizers: "Optimizers", sampler: Sampler, rank: int,
            world_size: int, main: bool, deepspeed: bool = False) -> int:
    """Load a checkpoint into the run's objects; returns its step. On the number of processes that
    wrote it, every rank continues its own data position and RNG stream exactly; on another number the
    data position is mapped (``remap``: no prompt of the current epoch skipped, none repeated that need
    not be) and each rank's RNG is reseeded from (seed, rank, step), and the log says so. Under DeepSpeed
    the generator's optimizer state is the engine's own (loaded after ``prepare``)."""
    weights = load_weights(ckpt)
    opt_state, rng, state = load_training_state(ckpt)
    built = {**{f"model.{k}": t for k, t in model.state_dict().items()},
             **{f"distiller.{k}": t for k, t in distiller.state_dict().items()}}
    try:  # a model whose size changes in training (a Gaussian scene) resizes itself in load_state_dict
        model.load_state_dict({k[6:]: v for k, v in weights.items() if k.startswith("model.")})
        distiller.load_state_dict({k[len("distiller."):]: v for k, v in weights.items() if k.startswith("distiller.")})
    except RuntimeError:
        bad = shape_mismatch(built, weights)
        if bad is None:
            raise
        key, was, now = bad
        saved_cfg = run_dir_of(ckpt) / "config.yaml"
        changed = config_changes(load_yaml(saved_cfg), cfg.to_dict()) if saved_cfg.is_file() else []
        shaping = [c for c in changed if c[0].split(".")[0] not in ("train", "optim", "data", "eval", "loss")]
        changed = shaping or changed  # the keys that can shape a tensor (max_steps and the like cannot)
        why = "; ".join(f"{k}={b} (the run has {a})" for k, a, b in changed[:3]) or "the config differs"
        raise CheckpointError(f"cannot resume '{ckpt}': {why} changes the shape of {key} (checkpoint {was}, now {now}); "
                              "resume without overrides that change the model's size, or start a new run") from None
    written_by_deepspeed = (ckpt / "deepspeed").is_dir()
    if written_by_deepspeed != deepspeed:
        raise CheckpointError(f"checkpoint '{ckpt}' was written {'with' if written_by_deepspeed else 'without'} "
                              f"DeepSpeed and this run is {'' if deepspeed else 'not '}using it; resume with the engine "
                              "it was written with (the optimizer state's layouts differ)")
    optimizers.load_state_dict(opt_state, engine_holds_generator=deepspeed)
    step = int(state["step"])
    saved_world = int(state.get("world_size", 1))
    if saved_world == world_size:
        sampler.load_state_dict(state["data"][str(rank)])
        set_rng_state(rng["ranks"][str(rank)])
    else:
        note = sampler.remap(state["data"], saved_world)
        torch.manual_seed((cfg.train.seed * 1_000_003 + step) * 10_007 + rank)
        if main:
            print(f"resuming a {saved_world}-process checkpoint on {world_size}: {note}; random streams reseeded "
                  "from (seed, rank, step)", flush=True)
    return step


def _all_reduce_mean(params, world_size: int) -> None:
    import torch.distributed as dist  # noqa: PLC0415

    for p in params:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
        dist.all_reduce(p.grad)
        p.grad /= world_size


def replica_digest(model, distiller) -> str:
    """sha256 of every trainable tensor this rank holds (generator, background, the distiller's own):
    equal on every rank while the replicas are in sync, as DDP and the all-reduce keep them."""
    import hashlib  # noqa: PLC0415

    h = hashlib.sha256()
    for _, t in sorted({**{f"m.{k}": v for k, v in model.state_dict().items()},
                        **{f"d.{k}": v for k, v in distiller.state_dict().items()}}.items()):
        h.update(t.detach().float().contiguous().cpu().numpy().tobytes())
    return h.hexdigest()[:16]


def _save(acc, run_dir: Path, step: int, engine, model, optimizers: "Optimizers", distiller, sampler: Sampler,
          cfg: Config) -> Path:
    """Gather every rank's data position, RNG and replica digest, check that the replicas agree, then
    write one checkpoint from the main rank. Under DeepSpeed every rank first writes its part of the
    engine's state (DeepSpeed's own format, in ``deepspeed/``) into the same temporary folder."""
    data = {str(acc.process_index): sampler.state_dict()}
    rng = {str(acc.process_index): rng_state()}
    digests = [replica_digest(model, distiller)]
    if acc.num_processes > 1:
        import torch.distributed as dist  # noqa: PLC0415

        gathered: list = [None] * acc.num_processes
        dist.all_gather_object(gathered, (data, rng, digests[0]))
        data, rng, digests = {}, {}, []
        for d, r, h in gathered:
            data.update(d)
            rng.update(r)
            digests.append(h)
        if len(set(digests)) > 1:
            raise TrainingError(f"the processes' model replicas differ at step {step} (digests {digests}): the "
                                "distributed engine lost sync; resume from the last checkpoint and report this")
    path = run_dir / "checkpoints" / f"step_{step:07d}"
    deepspeed = acc.distributed_type.value == "DEEPSPEED"
    tmp = None
    if deepspeed:
        tmp = temp_checkpoint_dir(run_dir, step, fresh=acc.is_main_process)
        acc.wait_for_everyone()
        engine.save_checkpoint(str(tmp / "deepspeed"), tag="engine")
        acc.wait_for_everyone()
    if acc.is_main_process:
        state = {f"model.{k}": t for k, t in model.state_dict().items()}
        state.update({f"distiller.{k}": t for k, t in distiller.state_dict().items()})
        path = save_checkpoint(run_dir, step, state, optimizers.state_dict(engine_holds_generator=deepspeed),
                               {"data": data, "world_size": acc.num_processes, "replica_digests": digests},
                               {"ranks": rng}, keep=cfg.train.keep_ckpts, tmp=tmp)
    acc.wait_for_everyone()
    return path
