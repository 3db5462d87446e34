"""``scalegen bench generators-curve``: the three generators' learning curves in the oracle world,
each at its committed defaults, and the plot ``docs/generators.png``.

Each generator trains once with its own config (Hyper-iNGP: the embedded default;
``configs/oracle/conv3d.yaml``, ``configs/oracle/triplane.yaml``) and keeps a checkpoint every
``bench.every`` steps. The untrained generator (step 0) and the checkpoints at multiples of
``bench.score_every`` (0: all) and the last one are scored by the oracle
evaluation (``scalegen eval``'s metrics): intermediate ones on the first ``bench.curve_prompts``
prompts of each split, the last one on all prompts (the numbers of the performance table). The plot
shows seen PSNR (thick) and unseen PSNR (thin) against steps.

A finished run of the same config in ``OUT/generators-curve/NAME`` is reused, and so are its scores
(``bench_curve.json``), so the figure and table can be redrawn from runs trained one generator at a time; its
train time is the one recorded when it was trained. An interrupted run of the same config is resumed from its
last checkpoint (its train time then estimated from the logged step times). Times depend on the machine's load
(recorded beside them); PSNR / IoU do not.

Options: ``GeneratorsCurveOptions`` (``bench.generators=[conv3d]``, ``bench.every=50``, ...).
"""
from __future__ import annotations

import json
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Literal

import torch

from scalegen import atomic
from scalegen.config import Config, load_config, load_run_config
from scalegen.errors import ConfigError, ScalegenError
from scalegen.eval.oracle import evaluate_oracle
from scalegen.eval.report import format_table, write_json
from scalegen.priors import build_world
from scalegen.train.checkpoint import checkpoint_step, checkpoints_dir
from scalegen.train.loop import train
from scalegen.train.model import build_model, load_run

Name = Literal["hyper_ingp", "conv3d", "triplane_transformer"]
# Each generator's committed oracle-world defaults (None: the embedded default, Hyper-iNGP).
CONFIGS: dict[str, str | None] = {"hyper_ingp": None, "conv3d": "configs/oracle/conv3d.yaml",
                                  "triplane_transformer": "configs/oracle/triplane.yaml"}
LABELS = {"hyper_ingp": "Hyper-iNGP", "conv3d": "3DConv-Net", "triplane_transformer": "Triplane-Transformer"}
COLORS = {"hyper_ingp": (31, 119, 180), "conv3d": (214, 39, 40), "triplane_transformer": (44, 160, 44)}


@dataclass
class GeneratorsCurveOptions:
    generators: list[Name] = field(default_factory=lambda: list(CONFIGS))
    every: int = 50  # checkpoint every this many steps
    score_every: int = 0  # score the checkpoints at multiples of this (0: every checkpoint); the last always
    curve_prompts: int = 16  # prompts per split scored at intermediate checkpoints (0: all); the last: all
    plot: str = "docs/generators.png"  # "" writes no plot
    # score a run of the same config that stopped before train.max_steps as far as it got (no training; its last
    # checkpoint is scored on all prompts, its time estimated from the logged step times); the table marks it
    unfinished: bool = False


def _config_path(name: str) -> str | None:
    rel = CONFIGS[name]
    if rel is None:
        return None
    for root in (Path.cwd(), Path(__file__).resolve().parents[2]):
        if (root / rel).is_file():
            return str(root / rel)
    raise ConfigError(f"'{rel}' is not here; run `scalegen bench generators-curve` from the scalegen checkout")


def _finished(run_dir: Path, cfg: Config) -> bool:
    """A run (of ``cfg``: the caller checks) that the bench trained to its last checkpoint at ``train.max_steps``."""
    if not (run_dir / "bench_train.json").is_file():
        return False
    steps = [checkpoint_step(p) for p in checkpoints_dir(run_dir).glob("step_*") if (p / "state.json").is_file()]
    return cfg.train.max_steps in steps


def _same_config(run_dir: Path, cfg: Config) -> bool:
    """The run's saved config is ``cfg``, read as today's code reads it: keys added since it was written take
    their defaults, so a run is not disowned by a new option it never used."""
    if not (run_dir / "config.yaml").is_file():
        return False
    try:
        return load_run_config(run_dir).to_yaml() == cfg.to_yaml()
    except ScalegenError:  # a key this code no longer knows: another config
        return False


def _step_time_info(run_dir: Path, cfg: Config, steps: int) -> dict:
    """Train time of ``steps`` steps estimated from the mean logged seconds per step (a run trained in pieces)."""
    logged = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    step_s = [m["step_s"] for m in logged if "step_s" in m]
    return {"train_s": sum(step_s) / len(step_s) * steps, "steps": steps, "threads": cfg.train.threads}


def _unfinished_info(run_dir: Path, cfg: Config) -> dict:
    """What an interrupted run reached: its last checkpoint's step and the mean logged seconds per step."""
    steps = [checkpoint_step(p) for p in checkpoints_dir(run_dir).glob("step_*") if (p / "state.json").is_file()]
    if not steps:
        raise ConfigError(f"'{run_dir}' has no checkpoint to score yet")
    print(f"[generators-curve] {run_dir.name}: scoring the unfinished run (step {max(steps)} of "
          f"{cfg.train.max_steps})", flush=True)
    return {**_step_time_info(run_dir, cfg, max(steps)), "load_start": float("nan"), "load_end": float("nan"),
            "finished": False}


def _train(name: str, o: GeneratorsCurveOptions, overrides: list[str], run_dir: Path) -> tuple[Config, dict]:
    cfg = load_config(_config_path(name), ["train.logger=none", "train.progress=false", *overrides,
                                            f"train.ckpt_every={o.every}", "train.keep_ckpts=1000",
                                            f"train.out_dir={run_dir}"])
    same = _same_config(run_dir, cfg)
    if same and _finished(run_dir, cfg):
        print(f"[generators-curve] {name}: reusing the finished run in {run_dir}", flush=True)
        return cfg, json.loads((run_dir / "bench_train.json").read_text())
    if same and o.unfinished:
        return cfg, _unfinished_info(run_dir, cfg)
    if same and (run_dir / "metrics.jsonl").is_file():
        # an interrupted run of this config (a crash, a SIGTERM): continue it from its last checkpoint; resume is
        # exact, so the curve is the uninterrupted run's. Its time is the mean logged step time times the steps.
        print(f"[generators-curve] {name}: resuming the interrupted run in {run_dir} ...", flush=True)
        load0 = os.getloadavg()[0]
        train(cfg, run_dir, resume=True)
        info = {**_step_time_info(run_dir, cfg, cfg.train.max_steps), "load_start": load0,
                "load_end": os.getloadavg()[0], "finished": True, "resumed": True}
        write_json(run_dir / "bench_train.json", info)
        return cfg, info
    if run_dir.exists():
        raise ConfigError(f"'{run_dir}' holds another run; remove it (or pass another --out) "
                          "so the curve is not mixed from two runs")
    print(f"[generators-curve] {name}: training {cfg.train.max_steps} steps in {run_dir} ...", flush=True)
    load0 = os.getloadavg()[0]
    t0 = time.perf_counter()
    train(cfg, run_dir)
    info = {"train_s": time.perf_counter() - t0, "steps": cfg.train.max_steps, "threads": cfg.train.threads,
            "load_start": load0, "load_end": os.getloadavg()[0], "finished": True}
    write_json(run_dir / "bench_train.json", info)
    return cfg, info


def _scores(res: dict) -> dict:
    return {f"{split}_{k}": res[split][k] for split in ("seen", "unseen") for k in ("psnr", "psnr_fg", "iou")}


def curve(name: str, cfg: Config, run_dir: Path, curve_prompts: int, score_every: int = 0) -> list[dict]:
    """Scores of the untrained generator (step 0) and of the chosen checkpoints of ``run_dir``; kept in
    ``run_dir/bench_curve.json`` and reused while the scored steps and ``curve_prompts`` are the same."""
    all_steps = [checkpoint_step(p) for p in checkpoints_dir(run_dir).glob("step_*") if (p / "state.json").is_file()]
    last = max(all_steps, default=cfg.train.max_steps)  # max_steps unless the run is scored unfinished
    ckpts = sorted(p for p in checkpoints_dir(run_dir).glob("step_*") if (p / "state.json").is_file()
                   and (checkpoint_step(p) == last or not score_every or checkpoint_step(p) % score_every == 0))
    key = {"curve_prompts": curve_prompts, "steps": [checkpoint_step(p) for p in ckpts]}
    cache = run_dir / "bench_curve.json"
    if cache.is_file():
        saved = json.loads(cache.read_text())
        if saved["key"] == key:
            print(f"[generators-curve] {name}: reusing the scores in {cache}", flush=True)
            return saved["points"]
    world = build_world(cfg)
    torch.manual_seed(cfg.train.seed)  # the run's initial weights, as `scalegen eval --baseline`
    text_encoder, model = build_model(cfg)
    points = [{"step": 0, **_scores(evaluate_oracle(cfg, model.eval(), text_encoder, world, max_prompts=curve_prompts))}]
    for ckpt in ckpts:
        _, text_encoder, model, _ = load_run(ckpt)
        step = checkpoint_step(ckpt)
        res = evaluate_oracle(cfg, model, text_encoder, world, max_prompts=0 if step == last else curve_prompts)
        points.append({"step": step, **_scores(res)})
        print(f"[generators-curve] {name} step {step}: seen {points[-1]['seen_psnr']:.2f} dB", flush=True)
    write_json(cache, {"key": key, "points": points})
    return points


def draw_curves(curves: dict[str, list[dict]], path: Path, w: int = 720, h: int = 420) -> None:
    """PSNR against steps, seen thick and unseen thin, one colour per generator (PIL: no plotting dependency)."""
    from PIL import Image, ImageDraw  # noqa: PLC0415

    img = Image.new("RGB", (w, h), "white")
    dr = ImageDraw.Draw(img)
    dr.text((8, 6), "oracle world: PSNR (dB) vs training step; thick = seen prompts, thin = unseen", fill=(0, 0, 0))
    l, r, t, b = 48, w - 170, 28, h - 34
    max_step = max(p["step"] for c in curves.values() for p in c)
    vals = [p[k] for c in curves.values() for p in c for k in ("seen_psnr", "unseen_psnr")]
    lo, hi = 5 * int(min(vals) // 5), 5 * (int(max(vals) // 5) + 1)
    x_of = lambda s: l + s / max(max_step, 1) * (r - l)  # noqa: E731
    y_of = lambda v: b - (v - lo) / (hi - lo) * (b - t)  # noqa: E731
    dr.rectangle([l, t, r, b], outline=(0, 0, 0))
    for v in range(lo, hi + 1, 5):
        dr.line([l, y_of(v), r, y_of(v)], fill=(225, 225, 225))
        dr.text((10, y_of(v) - 6), f"{v}", fill=(0, 0, 0))
    tick = 100 if max_step > 300 else 50
    for s in range(0, max_step + 1, tick):
        dr.line([x_of(s), b, x_of(s), b + 4], fill=(0, 0, 0))
        dr.text((x_of(s) - 8, b + 8), f"{s}", fill=(0, 0, 0))
    for i, (name, pts) in enumerate(curves.items()):
        color = COLORS[name]
        for key, width in (("seen_psnr", 3), ("unseen_psnr", 1)):
            xy = [(x_of(p["step"]), y_of(p[key])) for p in pts]
            dr.line(xy, fill=color, width=width)
            for x, y in xy:
                dr.ellipse([x - 2, y - 2, x + 2, y + 2], fill=color)
        final = pts[-1]
        dr.text((r + 10, t + 36 * i), LABELS[name], fill=color)
        dr.text((r + 10, t + 36 * i + 14), f"{final['seen_psnr']:.1f} / {final['unseen_psnr']:.1f} dB"
                f" @ {final['step']}", fill=color)
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic.writing(path) as tmp:
        img.save(tmp, format="PNG")


def bench_generators_curve(o: GeneratorsCurveOptions, overrides: list[str], out_root: str) -> dict:
    if o.every < 1:
        raise ConfigError("bench.every must be at least 1 (steps between checkpoints)")
    if o.score_every < 0 or (o.score_every and o.score_every % o.every):
        raise ConfigError(f"bench.score_every must be 0 or a multiple of bench.every ({o.every})")
    curves, trained = {}, {}
    for name in o.generators:
        run_dir = Path(out_root) / "generators-curve" / name
        cfg, trained[name] = _train(name, o, overrides, run_dir)
        curves[name] = curve(name, cfg, run_dir, o.curve_prompts, o.score_every)
    rows = []
    for name, info in trained.items():
        f = curves[name][-1]
        steps = info["steps"] if info.get("finished", True) else f"{info['steps']} (unfinished)"
        rows.append([LABELS[name], steps, info["train_s"] / info["steps"], info["train_s"],
                     f"{info['load_start']:.1f}-{info['load_end']:.1f}", f["seen_psnr"], f["seen_psnr_fg"],
                     f["seen_iou"], f["unseen_psnr"], f["unseen_iou"]])
    print(format_table(rows, ["generator", "steps", "s/step", "train s", "load", "PSNR seen", "PSNR fg seen",
                              "IoU seen", "PSNR unseen", "IoU unseen"]))
    if o.plot:
        draw_curves(curves, Path(o.plot))
        print(f"plot: {o.plot}")
    return {"options": asdict(o), "curves": curves, "train": trained}
