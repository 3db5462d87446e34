"""`scalegen bench step`: where one default training step's time goes.

Builds the run of the embedded default config (plus ``key=value`` overrides) from the training
loop's own builders and runs ``steps`` optimizer steps after ``warmup`` untimed ones, in the loop's
order: text encode -> generator forward -> camera sampling -> renderer -> prior encode -> distiller
-> regularisers -> backward -> gradient clip -> optimizer step. Every stage is timed in wall and
process-CPU seconds (the CPU clock counts this process's threads only, so it stays meaningful on a
machine shared with other jobs); nested stages (the renderer's field queries, the oracle prior's
``predict_eps`` and its ground-truth renders) are timed inside their parents. Backward is split by
autograd node with torch.profiler (its per-node times are the profiler's, in wall seconds).

The table lists each stage's inclusive time per step; the top-level stages sum to about the step
time (the remainder is the loop's bookkeeping, reported as ``unaccounted``).
"""
from __future__ import annotations

import time
from collections import defaultdict
from contextlib import contextmanager
from dataclasses import dataclass

import torch

from scalegen.config import load_config, schedule_value
from scalegen.data.cameras import sample_train_cameras
from scalegen.distill import build_distiller
from scalegen.errors import ConfigError
from scalegen.eval.report import format_table
from scalegen.priors import build_ground_truth, build_prior
from scalegen.render import build_renderer
from scalegen.train.loop import (BatchEncoder, build_optimizer, build_sampler, lr_factor, regularisers,
                                 training_prompts)
from scalegen.train.model import build_model


@dataclass
class StepOptions:
    steps: int = 3  # timed optimizer steps (>= 1)
    warmup: int = 1  # untimed steps first (caches, allocator)
    profile_backward: bool = True  # split backward by autograd node (torch.profiler)
    top: int = 12  # backward nodes and operators listed


class StageTimer:
    """Inclusive wall and process-CPU seconds of named, possibly nested stages; a nested stage's
    name is its path (``renderer/field queries``)."""

    def __init__(self):
        self.wall: dict[str, float] = defaultdict(float)
        self.cpu: dict[str, float] = defaultdict(float)
        self.order: list[str] = []
        self._stack: list[str] = []
        self.enabled = True

    @contextmanager
    def __call__(self, name: str):
        if not self.enabled:
            yield
            return
        path = "/".join([*self._stack, name])
        if path not in self.wall:
            self.order.append(path)
        self._stack.append(name)
        w0, c0 = time.perf_counter(), time.process_time()
        try:
            with torch.profiler.record_function(path):
                yield
        finally:
            self.wall[path] += time.perf_counter() - w0
            self.cpu[path] += time.process_time() - c0
            self._stack.pop()

    def wrap(self, name: str, fn):
        """``fn`` timed as stage ``name`` each time it is called."""
        def timed(*args, **kwargs):
            with self(name):
                return fn(*args, **kwargs)
        return timed


def _timed_field(field, timer: StageTimer):
    """The renderer's field with its queries timed (``sdf`` and ``query``; both are leaf calls)."""
    field.sdf = timer.wrap("field queries", field.sdf)
    field.query = timer.wrap("field queries", field.query)
    return field


def bench_step(opts: StepOptions, overrides: list[str], out_root: str = "") -> dict:
    if opts.steps < 1 or opts.warmup < 0:
        raise ConfigError(f"bench.steps must be >= 1 and bench.warmup >= 0 (got {opts.steps}, {opts.warmup})")
    cfg = load_config(None, list(overrides))
    if cfg.train.threads > 0:
        torch.set_num_threads(cfg.train.threads)
    if cfg.train.grad_accum != 1:
        raise ConfigError("`scalegen bench step` profiles one micro-batch per step; leave train.grad_accum=1")
    torch.manual_seed(cfg.train.seed)
    text_encoder, model = build_model(cfg)
    truth = build_ground_truth(cfg)
    world = truth.world if truth is not None else None
    prompts = training_prompts(cfg, world, text_encoder) if not cfg.data.shards else None
    prior = build_prior(cfg, world, text_encoder=text_encoder)
    distiller = build_distiller(cfg, prior, cond_dim=text_encoder.dim)
    renderer = build_renderer(cfg).train()
    optimizer = build_optimizer(cfg, model)
    base_lr = [g["lr"] for g in optimizer.param_groups]
    sampler, _ = build_sampler(cfg, world, text_encoder, prompts, 0, 1)
    encode = BatchEncoder(cfg, text_encoder, prior, torch.device("cpu"), sampler)
    params = [p for g in optimizer.param_groups for p in g["params"]]
    torch.manual_seed(cfg.train.seed)

    timer = StageTimer()
    prior_calls = {}
    for name in ("predict_eps", "render_components"):
        if hasattr(prior, name):  # the oracle's ground truth is rendered inside predict_eps
            prior_calls[name] = getattr(prior, name)
            setattr(prior, name, timer.wrap("prior " + name, prior_calls[name]))
    v = cfg.camera.views_per_prompt
    m = cfg.train.max_steps
    losses, step_wall, step_cpu = [], [], []

    def one_step(step: int) -> None:
        w0, c0 = time.perf_counter(), time.process_time()
        optimizer.zero_grad(set_to_none=True)
        with timer("text encode"):
            batch, cond, prior_text = encode(sampler.next_batch())
        with timer("generator forward"):
            field, background = model(cond)
        with timer("camera sampling"):
            cams = sample_train_cameras(cfg.camera, len(batch))
        lam_eik = schedule_value(cfg.loss.eikonal, step, m)
        with timer("renderer"):
            out = renderer(_timed_field(field, timer), cams, background=background, with_eikonal=lam_eik > 0)
        with timer("prior encode"):
            latents = prior.encode(out.rgb)
        with timer("distiller"):
            loss_d, _ = distiller(latents, prior_text.repeat_interleave(v), cams.expand(len(batch)), step,
                                  pooled=cond.pooled.repeat_interleave(v, 0))
        with timer("regularisers"):
            reg, _ = regularisers(cfg, out, step)
            loss = cfg.loss.distill * loss_d + reg
        with timer("backward"):
            loss.backward()
        with timer("optimizer step"):
            for g, lr in zip(optimizer.param_groups, base_lr):
                g["lr"] = lr * lr_factor(cfg, step)
            if cfg.optim.grad_clip:
                torch.nn.utils.clip_grad_norm_(params, cfg.optim.grad_clip)
            optimizer.step()
        losses.append(float(loss.detach()))
        step_wall.append(time.perf_counter() - w0)
        step_cpu.append(time.process_time() - c0)

    timer.enabled = False
    for step in range(opts.warmup):
        one_step(step)
    losses.clear(), step_wall.clear(), step_cpu.clear()
    timer.enabled = True
    prof = None
    if opts.profile_backward:
        prof = torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU])
        prof.__enter__()
    try:
        for step in range(opts.warmup, opts.warmup + opts.steps):
            one_step(step)
    finally:
        if prof is not None:
            prof.__exit__(None, None, None)
    for name, fn in prior_calls.items():
        setattr(prior, name, fn)

    n = opts.steps
    wall, cpu = sum(step_wall) / n, sum(step_cpu) / n
    stages = []
    for path in timer.order:
        stages.append({"stage": path, "depth": path.count("/"), "wall_s": timer.wall[path] / n,
                       "cpu_s": timer.cpu[path] / n})
    top = [s for s in stages if s["depth"] == 0]
    stages.append({"stage": "unaccounted", "depth": 0, "wall_s": wall - sum(s["wall_s"] for s in top),
                   "cpu_s": cpu - sum(s["cpu_s"] for s in top)})
    backward, ops = [], []
    if prof is not None:
        prefix = "autograd::engine::evaluate_function: "
        for e in prof.key_averages():
            if e.key.startswith(prefix):
                backward.append({"node": e.key[len(prefix):], "wall_s": e.cpu_time_total / 1e6 / n,
                                 "calls_per_step": e.count / n})
            elif not e.key.startswith(("autograd::", "prior ", "field ")) and "/" not in e.key and e.key not in timer.wall:
                ops.append({"op": e.key, "self_s": e.self_cpu_time_total / 1e6 / n, "calls_per_step": e.count / n})
        backward.sort(key=lambda r: -r["wall_s"])
        ops.sort(key=lambda r: -r["self_s"])
    threads = torch.get_num_threads()
    print(f"[bench step] {n} step(s) after {opts.warmup} warm-up; {threads} thread(s); "
          f"{wall:.3f} s wall, {cpu:.3f} s CPU per step", flush=True)
    rows = [["  " * s["depth"] + s["stage"].rsplit("/", 1)[-1], f"{s['wall_s']:.3f}", f"{s['cpu_s']:.3f}",
             f"{100 * s['cpu_s'] / cpu:.1f}" if cpu > 0 else "-"] for s in stages]
    rows.append(["step", f"{wall:.3f}", f"{cpu:.3f}", "100.0"])
    print(format_table(rows, ["stage", "wall s/step", "CPU s/step", "CPU %"]))
    if backward:
        print("backward by autograd node (profiler wall s/step):")
        print(format_table([[b["node"], f"{b['wall_s']:.3f}", f"{b['calls_per_step']:g}"]
                            for b in backward[:opts.top]], ["node", "s/step", "calls/step"]))
    if ops:
        print("operators by self time (profiler wall s/step):")
        print(format_table([[o["op"], f"{o['self_s']:.3f}", f"{o['calls_per_step']:g}"] for o in ops[:opts.top]],
                           ["operator", "self s/step", "calls/step"]))
    return {"steps": n, "warmup": opts.warmup, "threads": threads, "overrides": list(overrides),
            "step_wall_s": wall, "step_cpu_s": cpu, "losses": losses, "stages": stages,
            "backward_nodes": backward[:opts.top], "top_ops": ops[:opts.top]}
