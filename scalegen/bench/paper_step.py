"""Every shipped paper config takes real optimizer steps at its true size on this machine:
``scalegen bench paper-step [--json FILE] [bench.configs=[...]] [bench.scale=true|reduced] [key=value ...]``.

The prior is built from the published architecture configs with random weights (no download):
Stable Diffusion 2.1-base (``flops_sd``'s UNet / VAE / text tower configs, written once as a diffusers
folder by ``priors.stable_diffusion.write_random_sd``) and MVDream sd-v2.1-base-4view
(``mvdream_unet_config()``'s defaults, SD 2.1's VAE and text tower). Everything else is the config's own:
generator, renderer, camera sampler, resolution, distiller, prompts per step, optimizer, schedules
(``train.max_steps`` is kept; the run stops after two steps through ``train(stop_after=...)``).

Per config, in its own subprocess (so ``wait4``'s peak RSS is that config's): the real training loop takes
two steps (checkpoint after each), then a second run resumes step 2 from the step-1 checkpoint through
the real ``--resume`` path. The parent then checks: every logged loss finite; every trainable parameter
group (the generator's ``param_groups()``, the background, the distiller's own model) changed in step 2;
the resumed step-2 weights and optimizer state equal the uninterrupted ones bitwise (same process
layout, same thread count, CPU kernels: nothing may differ, so no tolerance is granted).

Corpora: the real ones under ``bench.corpora`` where the config's corpus is one of them; a stand-in
of the corpus's size from the ATT3D-style composer (``data.compose``) where the file is not here
(Instant3D 17k, Cap3D 100k); the shards config streams a small shard set built by the real builder
(``data.shards.build_shards``) with the random SD text tower. Each row says which. On CPU the prior
runs in fp32 whatever ``prior.dtype`` says (``StableDiffusionPrior``/``MVDreamPrior`` do so), and the
row says that too.

``bench.scale=reduced``: the same code path with a tiny random SD / MVDream and small generators and
renders (the test tier).

Memory: before each run ``scalegen plan`` predicts the step's per-rank bytes for this CPU run (fp32 prior, the
published UNet counted on ``meta``; ``bench.predict``) in its own process, and the row keeps the prediction
beside the measured peak. A config whose predicted step does not fit this machine (``bench.memory_gib``,
default its total memory) runs with ``generator.checkpointing=true`` where its generator has it
(``bench.checkpointing=auto``; ``always`` / ``never`` force it): each block is recomputed in backward, which
gives the same values bit for bit and costs time, not results. Prompts per step are never reduced. The row's
``memory_levers`` and notes say what was changed and why.
"""
from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from scalegen import atomic

PAPER_CONFIGS = (
    "configs/sd/hyper_ingp_asd_mg15.yaml", "configs/sd/hyper_ingp_vsd_mg15.yaml", "configs/sd/hyper_ingp_vdm_mg15.yaml",
    "configs/sd/conv3d_asd_df415.yaml", "configs/sd/conv3d_asd_at2520.yaml", "configs/sd/conv3d_asd_cp100k.yaml",
    "configs/sd/conv3d_asd_cp100k_shards.yaml", "configs/mvdream/triplane_asd_dl17k.yaml",
)
# Training prompts of each paper corpus: a stand-in of that size is composed where the file is absent
# (Instant3D 17k and Cap3D 100k are not in the shared folder; on a device machine none are).
STAND_IN = {"magic3d_15_prompt_library.json": 15, "dreamfusion_415_prompt_library.json": 415,
            "att3d_2520_prompt_library.json": 2520, "instant3d_17000_prompt_library.json": 17000,
            "cap3d_100k_prompt_library.json": 100000}
SHARD_PROMPTS = 64  # the small shard set of the shards config (built with the random text tower on CPU)

# The small sizes of bench.scale=reduced, per generator: same code path, seconds instead of minutes.
REDUCED = {
    "hyper_ingp": ["generator.hash_levels=4", "generator.hash_log2_size=10", "generator.hash_max_resolution=64",
                   "generator.mlp_hidden=16", "generator.hyper_hidden=16"],
    "conv3d": ["generator.preset=small"],
    "triplane_transformer": ["generator.preset=small"],
}
REDUCED_COMMON = ["camera.resolution=16", "render.samples=8", "render.importance_samples=8"]


@dataclass
class PaperStepOptions:
    configs: list[str] = field(default_factory=list)  # config stems or paths (empty: all eight paper configs)
    scale: Literal["true", "reduced"] = "true"  # reduced: tiny priors and generators (tests)
    weights: str = "runs/bench/paper_step/weights"  # the random-weight prior folders, written once and reused
    corpora: str = "../shared/corpora"  # ScaleDreamer's prompt libraries (MG15, DF415, AT2520)
    timeout_s: int = 3600  # per config subprocess
    predict: bool = True  # run `scalegen plan` first (its predicted peak goes in the row; auto checkpointing needs it)
    # generator.checkpointing for conv3d / triplane_transformer: auto = only where the plan's predicted step does
    # not fit bench.memory_gib (or the plan's own step ran out of memory); always / never: regardless (the row says
    # which; not on / off, which YAML reads as booleans)
    checkpointing: Literal["auto", "always", "never"] = "auto"
    memory_gib: float = 0.0  # memory a config may use here; 0: this machine's total (MemTotal)


def resolve_configs(names: list[str]) -> list[str]:
    """Config paths of ``bench.configs`` (stems such as ``hyper_ingp_asd_mg15`` or paths); all eight if empty."""
    from scalegen.errors import ConfigError  # noqa: PLC0415

    root = Path(__file__).resolve().parents[2]  # the repository's configs/, whatever the working directory
    if not names:
        return [str(root / c) for c in PAPER_CONFIGS]
    out = []
    for n in names:
        hit = [c for c in PAPER_CONFIGS if n in (c, Path(c).stem, Path(c).name)]
        if not hit:
            stems = ", ".join(Path(c).stem for c in PAPER_CONFIGS)
            raise ConfigError(f"bench.configs names {n!r}, which is not a paper config; choose from {stems}")
        out.append(str(root / hit[0]))
    return out


# ---------------------------------------------------------------------------------------------
# Random-weight priors at the published sizes


def sd21_random(root: Path, scale: str) -> Path:
    """The SD 2.1-base folder (random weights, published architecture), written once under ``root``."""
    from scalegen.priors.stable_diffusion import make_tiny_sd, write_random_sd  # noqa: PLC0415

    out = root / ("sd21-base-random" if scale == "true" else "sd-tiny")
    if (out / "model_index.json").is_file():
        return out
    tmp = root / f".tmp-{out.name}-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    if scale == "true":
        from scalegen.bench.flops_sd import SD21_BASE_VAE, SD21_TEXT  # noqa: PLC0415
        from scalegen.priors.stable_diffusion import SD21_BASE_UNET  # noqa: PLC0415

        text = dict(hidden=SD21_TEXT["hidden_size"], layers=SD21_TEXT["num_hidden_layers"],
                    heads=SD21_TEXT["num_attention_heads"], projection=SD21_TEXT["projection_dim"])
        write_random_sd(tmp, SD21_BASE_UNET, SD21_BASE_VAE, text)
    else:
        make_tiny_sd(tmp)
    atomic.replace(tmp, out)
    return out


def mvdream_random(root: Path, scale: str) -> Path:
    """The MVDream folder ``MVDreamPrior`` loads: a random sd-v2.1-base-4view UNet (or the tiny one of the
    official-layout fixture builder, converted by the real converter) with SD 2.1's VAE and text tower."""
    from scalegen.priors.mvdream_convert import convert_mvdream, make_tiny_mvdream, write_scheduler  # noqa: PLC0415
    from scalegen.priors.mvdream_unet import MultiViewUNet, mvdream_unet_config  # noqa: PLC0415

    sd = sd21_random(root, scale)
    out = root / ("mvdream-4view-random" if scale == "true" else "mvdream-tiny")
    if (out / "unet" / "config.json").is_file():
        return out
    tmp = root / f".tmp-{out.name}-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    if scale == "true":
        import torch  # noqa: PLC0415

        tmp.mkdir(parents=True)
        torch.manual_seed(0)
        MultiViewUNet(**mvdream_unet_config()).save_pretrained(tmp / "unet")
        write_scheduler(tmp / "scheduler")
        for sub in ("vae", "tokenizer", "text_encoder"):  # the converted folder holds SD 2.1's (same architecture)
            (tmp / sub).symlink_to((sd / sub).resolve(), target_is_directory=True)
    else:
        ckpt = make_tiny_mvdream(root / "mvdream-tiny.safetensors")
        convert_mvdream(ckpt, tmp, text_from=str(sd))
    atomic.replace(tmp, out)
    return out


# ---------------------------------------------------------------------------------------------
# One config (the subprocess)


def plan_config(config: str, opts: PaperStepOptions, overrides: list[str], work: Path) -> dict:
    """(overrides that make ``config`` runnable here, notes saying what differs from a cluster run)."""
    from scalegen.config import load_config  # noqa: PLC0415

    cfg = load_config(config, overrides)
    root = Path(opts.weights)
    root.mkdir(parents=True, exist_ok=True)
    notes = []
    prior = mvdream_random(root, opts.scale) if cfg.prior.name == "mvdream" else sd21_random(root, opts.scale)
    arch = "MVDream sd-v2.1-base-4view" if cfg.prior.name == "mvdream" else "SD 2.1-base"
    notes.append(f"prior: {arch} architecture, random weights" if opts.scale == "true"
                 else "prior: tiny random (reduced scale)")
    items = [f"prior.model={prior}"]
    if cfg.prior.dtype != "fp32":
        notes.append(f"prior in fp32 on CPU (config: {cfg.prior.dtype})")
    corpus = Path(cfg.data.prompts).name
    shared = Path(opts.corpora) / corpus
    src = shared
    if shared.is_file():
        items.append(f"data.prompts={shared}")
        notes.append(f"corpus: {corpus} (real, {opts.corpora})")
    elif corpus in STAND_IN:
        from scalegen.data.compose import write_composed  # noqa: PLC0415

        n = STAND_IN[corpus] if opts.scale == "true" else min(STAND_IN[corpus], 200)
        stand = src = work / f"standin-{n}.json"
        if not stand.is_file():
            write_composed(stand, n_train=n, n_unseen_pairs=20, n_val=50, seed=0)
        items.append(f"data.prompts={stand}")
        notes.append(f"corpus: stand-in of {n} composed prompts (ATT3D-style composer) for absent {corpus}")
    else:
        from scalegen.errors import ConfigError  # noqa: PLC0415

        raise ConfigError(f"{config}'s corpus {corpus} is neither in {opts.corpora} nor one this bench can stand in "
                          "for; add it to bench.corpora")
    if cfg.data.shards:
        from scalegen.data.shards import build_shards, write_manifest  # noqa: PLC0415
        from scalegen.text.clip import CLIPTextEncoder  # noqa: PLC0415

        small = work / "shard-corpus.json"
        data = json.loads(Path(src).read_text())
        small.write_text(json.dumps({k: data[k][:SHARD_PROMPTS] for k in ("train", "val", "test")}))
        shards = work / "shards"
        if not (shards / "manifest.json").is_file():
            enc = CLIPTextEncoder(str(prior))
            res = build_shards(str(small), shards, enc, shard_size=16, store="pooled", log=lambda m: None,
                               overwrite=True)
            write_manifest(str(small), shards, res["plans"], res["report"], res["encoder"])
        items.append(f"data.shards={shards}")
        notes.append(f"shards: {SHARD_PROMPTS} prompts of that corpus, built by the real builder (store=pooled)")
    if opts.scale == "reduced":
        lat = 8
        items += REDUCED.get(cfg.generator.name, []) + REDUCED_COMMON
        items += [f"prior.encode_resolution={lat * 8}", f"prior.latent_resolution={lat}"]
    return {"overrides": items, "notes": notes}


def run_child(spec: dict) -> dict:
    """Two steps of the config, then step 2 again resumed from the step-1 checkpoint (this process)."""
    from scalegen.config import load_config  # noqa: PLC0415
    from scalegen.train.checkpoint import checkpoints_dir  # noqa: PLC0415
    from scalegen.train.logger import read_metrics  # noqa: PLC0415
    from scalegen.train.loop import train  # noqa: PLC0415

    import torch  # noqa: PLC0415

    work = Path(spec["work"])
    cfg = load_config(spec["config"], [*spec["overrides"], "train.ckpt_every=1", "train.keep_ckpts=3",
                                       "train.log_every=1", "train.logger=none", "train.progress=false"])
    run_a, run_b = work / "run_uninterrupted", work / "run_resumed"
    for d in (run_a, run_b):
        shutil.rmtree(d, ignore_errors=True)
    t0 = time.perf_counter()
    train(cfg, run_a, stop_after=2)
    first = checkpoints_dir(run_a) / "step_0000001"
    ckdir = checkpoints_dir(run_b)
    ckdir.mkdir(parents=True)
    shutil.copytree(first, ckdir / first.name)
    (ckdir / "latest").write_text(first.name)
    train(cfg, run_b, resume=True, stop_after=1)
    return {"metrics_uninterrupted": read_metrics(run_a), "metrics_resumed": read_metrics(run_b),
            "threads": torch.get_num_threads(), "total_wall_s": time.perf_counter() - t0,
            "prompts_per_step": cfg.data.prompts_per_step, "views_per_prompt": cfg.camera.views_per_prompt,
            "grad_accum": cfg.train.grad_accum, "resolution": cfg.camera.resolution,
            "encode_resolution": cfg.prior.resolutions()[0], "distill": cfg.distill.name,
            "generator": cfg.generator.name, "own_peak_rss_bytes": own_peak_rss_bytes()}


# ---------------------------------------------------------------------------------------------
# Memory: the plan's prediction, and the one lever that changes no result


def machine_memory_bytes() -> int:
    """This machine's total memory (``MemTotal`` of /proc/meminfo; 0 where it is not readable)."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def prediction_overrides(items: list[str], scale: str, prior_dtype: str) -> list[str]:
    """The run's overrides as ``scalegen plan`` takes them: at true size without ``prior.model`` (the published
    architecture, its UNet on ``meta``: predicting costs no 5 GB of weights), with the run's prior dtype."""
    keep = [i for i in items if not (scale == "true" and i.startswith("prior.model="))]
    return [*keep, f"prior.dtype={prior_dtype}"]


def predict_peak(config: str, items: list[str], work: Path, scale: str, prior_dtype: str, timeout_s: int,
                 limit_bytes: int = 0) -> dict:
    """``scalegen plan --no-table --no-growth`` of this run in its own process (its measured step's memory
    does not stay in this one), its address space limited to ``limit_bytes`` (0: none). ``predicted_step_bytes``
    is the plan's total less the text caches counted full (a run's first steps hold one batch's embeddings; the
    caches fill over a long run). ``plan_out_of_memory``: the plan's own measured step could not be held (it
    was killed or an allocation failed)."""
    out = work / "plan.json"
    out.unlink(missing_ok=True)
    plan_items = prediction_overrides(items, scale, prior_dtype)
    argv = ["plan", "--config", config, "--no-table", "--no-growth", "--json", str(out), *plan_items]
    rc, usage, tail = _run_module(["scalegen.cli", *argv], work / "plan.log", timeout_s, limit_bytes)
    res = {"plan_command": " ".join(["scalegen", *argv]),
           "plan_peak_rss_bytes": usage["peak_rss_bytes"]}
    if rc != 0 or not out.is_file():
        last = tail.strip().splitlines()[-1] if tail.strip() else f"exit code {rc}"
        return {**res, "plan_error": last if rc >= 0 else f"killed by signal {-rc}: {last}",
                "plan_out_of_memory": ran_out_of_memory(rc, tail)}
    plan = json.loads(out.read_text())
    caches = plan["parts"]["text_caches"]
    return {**res, "predicted_peak_bytes": plan["total_bytes"], "predicted_text_cache_bytes": caches,
            "predicted_step_bytes": plan["total_bytes"] - caches, "predicted_parts": plan["parts"]}


def ran_out_of_memory(rc: int, tail: str) -> bool:
    """Whether a process ended for want of memory: killed by a signal (the kernel's OOM killer; ``std::bad_alloc``
    aborts), or a failed allocation in its last output (PyTorch's CPU allocator, Python's MemoryError)."""
    return rc < 0 or any(w in tail.lower() for w in ("allocate memory", "memoryerror", "bad_alloc"))


def memory_levers(generator: str, already: bool, mode: str, predicted: dict, budget: int) -> tuple[list[str], list[str]]:
    """(overrides, notes): ``generator.checkpointing=true`` where ``mode`` asks for it (``always``) or the predicted
    step does not fit ``budget`` bytes (``auto``), and the generator has checkpointing. Nothing else is changed:
    checkpointing recomputes each block in backward from the same inputs and RNG state, so the step's values are
    the same; it costs time."""
    from scalegen.bench.plan import CHECKPOINTED  # noqa: PLC0415

    if generator not in CHECKPOINTED or already or mode == "never":
        return [], []
    gib = lambda n: f"{n / 2**30:.1f} GiB"  # noqa: E731
    why = ("each block recomputed in backward from the same inputs and RNG state: the same step values, more "
           "CPU time per step; prompts per step unchanged")
    if mode == "always":
        return ["generator.checkpointing=true"], [f"generator.checkpointing=true (bench.checkpointing=always): {why}"]
    if predicted.get("plan_out_of_memory"):
        return ["generator.checkpointing=true"], [
            f"generator.checkpointing=true (bench.checkpointing=auto): scalegen plan's own measured step of this config "
            f"(its generator, renderer, VAE and optimizer, without the UNet's weights: less than the run holds) ran out "
            f"of this machine's memory at {gib(predicted.get('plan_peak_rss_bytes', 0))} peak RSS, so the run "
            f"cannot fit either; {why}"]
    step = predicted.get("predicted_step_bytes")
    if step is None or step <= budget:
        return [], []
    return ["generator.checkpointing=true"], [
        f"generator.checkpointing=true (bench.checkpointing=auto): scalegen plan predicts {gib(step)} for this "
        f"CPU step (fp32 prior), more than the {gib(budget)} this machine has; {why}"]


# ---------------------------------------------------------------------------------------------
# Checks (the parent)


def finite_losses(metrics: list[dict]) -> tuple[bool, list[float]]:
    losses = [float(m["loss"]) for m in metrics if "loss" in m]
    return bool(losses) and all(math.isfinite(v) for v in losses), losses


def groups_changed(before: dict, after: dict, groups: dict[str, list[str]]) -> dict[str, dict]:
    """Per trainable group: how many of its tensors differ between two weight dicts, and the largest
    absolute change. A group 'changed' when any of its tensors did."""
    out = {}
    for name, keys in groups.items():
        n_changed, largest = 0, 0.0
        for k in keys:
            d = (after[k].double() - before[k].double()).abs().max().item() if after[k].numel() else 0.0
            n_changed += d > 0
            largest = max(largest, d)
        out[name] = {"tensors": len(keys), "changed_tensors": int(n_changed), "max_abs_change": largest,
                     "changed": n_changed > 0}
    return out


def identical(a: dict, b: dict, prefix: str = "") -> list[str]:
    """Paths where two nested state dicts (tensors, numbers, lists) differ; [] when bitwise equal."""
    import torch  # noqa: PLC0415

    if isinstance(a, dict) and isinstance(b, dict):
        if set(a) != set(b):
            return [f"{prefix}: keys {sorted(map(str, set(a) ^ set(b)))[:3]}"]
        return [p for k in a for p in identical(a[k], b[k], f"{prefix}.{k}" if prefix else str(k))]
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        if len(a) != len(b):
            return [f"{prefix}: lengths {len(a)} != {len(b)}"]
        return [p for i, (x, y) in enumerate(zip(a, b)) for p in identical(x, y, f"{prefix}[{i}]")]
    if torch.is_tensor(a) and torch.is_tensor(b):
        same = a.shape == b.shape and a.dtype == b.dtype and torch.equal(a, b)
        return [] if same else [prefix]
    return [] if a == b or (isinstance(a, float) and isinstance(b, float) and math.isnan(a) and math.isnan(b)) \
        else [prefix]


def initial_scene(cfg) -> tuple[dict, dict[str, list[str]]]:
    """(the run's initial SceneModel weights, checkpoint keys of each trainable group): rebuilt exactly as
    ``train()`` builds them (``torch.manual_seed(train.seed)`` then ``build_model``). Groups: the
    generator's ``param_groups()`` and the background."""
    import torch  # noqa: PLC0415

    from scalegen.train.model import build_model  # noqa: PLC0415

    torch.manual_seed(cfg.train.seed)
    _, scene = build_model(cfg)
    names = {id(p): f"model.{n}" for n, p in scene.named_parameters()}
    groups = {g: [names[id(p)] for p in ps] for g, ps in scene.generator.param_groups().items()}
    groups["background"] = [f"model.background.{n}" for n, _ in scene.background.named_parameters()]
    init = {f"model.{k}": v for k, v in scene.state_dict().items()}
    return init, {g: ks for g, ks in groups.items() if ks}


def check_config(config: str, plan: dict, child: dict, work: Path) -> dict:
    from scalegen.config import load_config  # noqa: PLC0415
    from scalegen.train.checkpoint import checkpoints_dir, load_training_state, load_weights  # noqa: PLC0415

    cfg = load_config(config, plan["overrides"])
    a, b = checkpoints_dir(work / "run_uninterrupted"), checkpoints_dir(work / "run_resumed")
    w1, w2 = load_weights(a / "step_0000001"), load_weights(a / "step_0000002")
    w2r = load_weights(b / "step_0000002")
    # The generator and background from their initial weights over both steps (a step that draws the random
    # background gives the background no gradient); the distiller's own model in step 2 (its initial
    # weights are drawn after the prior's construction, which this parent does not repeat).
    init, scene_groups = initial_scene(cfg)
    groups = groups_changed(init, w2, scene_groups)
    dist = [k for k in w2 if k.startswith("distiller.")]
    if dist:
        groups[f"distiller ({cfg.distill.name}, step 2)"] = groups_changed(w1, w2, {"d": dist})["d"]
    opt2, _, _ = load_training_state(a / "step_0000002")
    opt2r, _, _ = load_training_state(b / "step_0000002")
    diff = identical(w2, w2r) + identical(opt2, opt2r, "optimizer")
    ok_a, losses = finite_losses(child["metrics_uninterrupted"])
    ok_b, losses_r = finite_losses(child["metrics_resumed"])
    steps = {int(m["step"]): m for m in child["metrics_uninterrupted"] if "step_s" in m}
    resumed = [m for m in child["metrics_resumed"] if "step_s" in m]
    loss_match = bool(resumed) and 2 in steps and resumed[-1]["loss"] == steps[2]["loss"]
    notes = []
    if not groups.get("background", {"changed": True})["changed"] and cfg.render.bg_random_prob > 0:
        notes.append(f"background unchanged: it gets no gradient in a step that draws the random backdrop "
                     f"(render.bg_random_prob={cfg.render.bg_random_prob} per step), so it stays unchanged when "
                     "both steps draw it")
    return {
        "check_notes": notes,
        "losses": losses, "loss_resumed_step2": losses_r, "losses_finite": ok_a and ok_b,
        "groups": groups, "params_changed": all(g["changed"] for g in groups.values()),
        "resumed_identical": not diff and loss_match, "resume_differences": diff[:10],
        "resumed_loss_equal": loss_match,
        "step_s": {str(k): {"wall": m["step_s"], "cpu": m.get("step_cpu_s")} for k, m in sorted(steps.items())},
        "resumed_step_s": {"wall": resumed[-1]["step_s"], "cpu": resumed[-1].get("step_cpu_s")} if resumed else None,
    }


# ---------------------------------------------------------------------------------------------
# The bench


def _run_subprocess(spec: dict, timeout_s: int) -> tuple[int, dict, str]:
    """(exit code, rusage of the child as a dict, its output tail): ``wait4`` gives this child's own peak RSS."""
    spec_path = Path(spec["work"]) / "spec.json"
    spec_path.write_text(json.dumps(spec))
    return _run_module(["scalegen.bench.paper_step", str(spec_path)], Path(spec["work"]) / "child.log", timeout_s)


def _run_module(argv: list[str], log_path: Path, timeout_s: int, limit_bytes: int = 0) -> tuple[int, dict, str]:
    """``python -m argv`` in its own session, killed after ``timeout_s``: (exit code, its rusage, output tail).
    ``limit_bytes``: its address-space limit (``RLIMIT_AS``), so that running out of memory fails its allocation
    instead of calling the kernel's OOM killer onto this machine's other processes."""
    import signal  # noqa: PLC0415
    import threading  # noqa: PLC0415

    def limit():
        if limit_bytes:
            import resource  # noqa: PLC0415

            resource.setrlimit(resource.RLIMIT_AS, (limit_bytes, limit_bytes))

    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(Path(__file__).resolve().parents[2]), env.get("PYTHONPATH", "")])
    with open(log_path, "w") as log:
        p = subprocess.Popen([sys.executable, "-m", *argv], stdout=log, stderr=subprocess.STDOUT, env=env,
                             start_new_session=True, preexec_fn=limit if limit_bytes else None)
        timer = threading.Timer(timeout_s, lambda: os.killpg(p.pid, signal.SIGKILL))
        timer.start()
        try:
            _, status, ru = os.wait4(p.pid, 0)
        finally:
            timer.cancel()
        p.returncode = os.waitstatus_to_exitcode(status)
    usage = {"peak_rss_bytes": ru.ru_maxrss * 1024, "cpu_user_s": ru.ru_utime, "cpu_sys_s": ru.ru_stime}
    return p.returncode, usage, log_path.read_text()[-3000:]


def bench_paper_step(opts: PaperStepOptions, overrides: list[str], out_root: str = "runs/bench") -> dict:
    from scalegen.eval.report import format_table  # noqa: PLC0415

    from scalegen.config import load_config  # noqa: PLC0415
    from scalegen.errors import ConfigError  # noqa: PLC0415

    if opts.memory_gib < 0:
        raise ConfigError(f"bench.memory_gib must be >= 0 (0: this machine's memory), got {opts.memory_gib}")
    machine = machine_memory_bytes()
    budget = int(opts.memory_gib * 2**30) or machine
    configs = resolve_configs(opts.configs)
    # first, while this process is small (a child's wait4 peak includes this process's high-water mark at the fork)
    baseline = import_baseline(Path(out_root) / "paper_step" / opts.scale, 600)
    rows = []
    for config in configs:
        stem = Path(config).stem
        work = Path(out_root) / "paper_step" / opts.scale / stem
        work.mkdir(parents=True, exist_ok=True)
        plan = plan_config(config, opts, overrides, work)
        items = [*overrides, *plan["overrides"]]
        cfg = load_config(config, items)
        gen, has = cfg.generator.name, cfg.generator.checkpointing
        levers, lever_notes = memory_levers(gen, has, opts.checkpointing, {}, budget)  # bench.checkpointing=always
        predicted = {}
        if opts.predict:
            print(f"{stem}: scalegen plan predicts the step's memory (a subprocess) ...", flush=True)
            predicted = predict_peak(config, items + levers, work, opts.scale, "fp32", opts.timeout_s, machine)
            if not levers:
                levers, lever_notes = memory_levers(gen, has, opts.checkpointing, predicted, budget)
                if levers:  # predict the run as it will run; the first prediction stays beside it
                    print(f"{stem}: {', '.join(levers)}; scalegen plan predicts the step again ...", flush=True)
                    first = {f"without_levers_{k}": v for k, v in predicted.items()}
                    predicted = {**first, **predict_peak(config, items + levers, work, opts.scale, "fp32",
                                                         opts.timeout_s, machine)}
        items += levers
        notes = plan["notes"] + lever_notes
        spec = {"config": config, "overrides": items, "work": str(work)}
        cmd = " ".join(["scalegen bench paper-step", f"bench.configs=[{stem}]"]
                       + ([f"bench.scale={opts.scale}"] if opts.scale != "true" else [])
                       + ([f"bench.checkpointing={opts.checkpointing}"] if opts.checkpointing != "auto" else [])
                       + ([f"bench.memory_gib={opts.memory_gib:g}"] if opts.memory_gib else [])
                       + ([] if opts.predict else ["bench.predict=false"]) + list(overrides))
        print(f"{stem}: running two steps + a resume in a subprocess ({', '.join(notes)})", flush=True)
        (work / "child_result.json").unlink(missing_ok=True)
        t0 = time.perf_counter()
        rc, usage, tail = _run_subprocess(spec, opts.timeout_s)
        row = {"config": config, "command": cmd, "notes": notes, "overrides": plan["overrides"] + levers,
               "memory_levers": levers, "memory_budget_bytes": budget, **predicted,
               "exit_code": rc, **usage, "subprocess_wall_s": time.perf_counter() - t0}
        result = work / "child_result.json"
        if rc != 0 or not result.is_file():
            last = tail.strip().splitlines()[-1] if tail.strip() else ""
            row["error"] = (f"killed by signal {-rc} (SIGKILL: out of memory or past bench.timeout_s) {last}".strip()
                            if rc < 0 else last or f"exit code {rc}")
            row["ok"] = False
            print(f"{stem}: FAILED (exit {rc}): {row['error']}", flush=True)
        else:
            child = json.loads(result.read_text())
            row.update({k: v for k, v in child.items() if not k.startswith("metrics_")})
            row.update(check_config(config, {"overrides": items}, child, work))
            row["ok"] = row["losses_finite"] and row["params_changed"] and row["resumed_identical"]
        rows.append(row)
    table = []
    for r in rows:
        if "error" in r:
            table.append([Path(r["config"]).stem, "-", "-", f"{r['peak_rss_bytes'] / 2**30:.1f}", _gib(r), "-", "-",
                          "-", "failed"])
            continue
        s2 = r["step_s"].get("2", {})
        changed = sum(g["changed"] for g in r["groups"].values())
        nan = float("nan")
        table.append([Path(r["config"]).stem, f"{s2.get('cpu', nan):.1f}", f"{s2.get('wall', nan):.1f}",
                      f"{r['peak_rss_bytes'] / 2**30:.1f}", _gib(r), "yes" if r["losses_finite"] else "NO",
                      f"{changed}/{len(r['groups'])}", "yes" if r["resumed_identical"] else "NO",
                      "; ".join(r["notes"][1:] + r["check_notes"])])
    print(format_table(table, ["config", "cpu s/step", "wall s/step", "peak RSS GiB", "plan GiB", "losses finite",
                               "groups changed", "resume identical", "notes"]))
    return {"scale": opts.scale, **baseline, "rows": rows, "ok": all(r["ok"] for r in rows)}


def _gib(row: dict) -> str:
    """The plan's predicted step in GiB for the table ('-' without a prediction)."""
    n = row.get("predicted_step_bytes")
    return "-" if n is None else f"{n / 2**30:.1f}"


def own_peak_rss_bytes() -> int:
    """This process's own peak RSS (``VmHWM``: its address space's high-water mark since exec). ``wait4``'s
    ``ru_maxrss`` of a child also carries the parent's high-water mark at the fork (Linux copies it into the exec'd
    process), so a child reports this one itself."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    return 0


def import_baseline(work: Path, timeout_s: int) -> dict:
    """Peak RSS of a process that only imports what a config's subprocess imports (torch, accelerate, the loop, both
    priors, the diffusers / transformers model classes they build): the part of each row's peak that is the
    interpreter and its libraries."""
    work.mkdir(parents=True, exist_ok=True)
    rc, usage, tail = _run_module(["scalegen.bench.paper_step", "--imports-only"], work / "baseline.log", timeout_s)
    if rc != 0 or "VmHWM" not in tail:
        return {"import_baseline_error": tail.strip().splitlines()[-1] if tail.strip() else f"exit code {rc}"}
    return {"import_baseline_rss_bytes": int(tail.split("VmHWM")[-1].split()[0])}


def _imports_only() -> int:
    import accelerate  # noqa: F401, PLC0415
    import torch  # noqa: F401, PLC0415
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel  # noqa: F401, PLC0415 (lazy in diffusers)
    from transformers import CLIPTextModel, CLIPTokenizer  # noqa: F401, PLC0415

    from scalegen.config import load_config  # noqa: F401, PLC0415
    from scalegen.priors.mvdream import MVDreamPrior  # noqa: F401, PLC0415
    from scalegen.priors.stable_diffusion import StableDiffusionPrior  # noqa: F401, PLC0415
    from scalegen.train.checkpoint import checkpoints_dir  # noqa: F401, PLC0415
    from scalegen.train.logger import read_metrics  # noqa: F401, PLC0415
    from scalegen.train.loop import train  # noqa: F401, PLC0415

    print(f"VmHWM {own_peak_rss_bytes()}")
    return 0


def _child_main(spec_path: str) -> int:
    if spec_path == "--imports-only":
        return _imports_only()
    spec = json.loads(Path(spec_path).read_text())
    res = run_child(spec)
    out = Path(spec["work"]) / "child_result.json"
    atomic.write_text(out, json.dumps(res, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(_child_main(sys.argv[1]))
