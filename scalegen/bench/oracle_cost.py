"""`scalegen bench oracle-cost`: what one exact oracle call costs as the world grows.

One SDS-shaped ``predict_eps`` call (conditional + unconditional rows of ``prompts`` prompts x
``views`` views) per case, timed as the median of ``calls`` calls after one warm-up, with:
  * the default world (60 prompts), camera-aware and view-agnostic;
  * the compositional world (configs/oracle/world_compose.yaml) after registering a corpus of each
    size in ``sizes`` (prompts drawn from that corpus): what is exact (every completion of every
    row's prompt) and what is subsampled (the unconditional: ``prior.oracle.n_uncond`` components)
    is the same at every size, so the call should not grow with the corpus;
  * the multimodal world's widest prompt ("an object": every completion x instance).
Also reported: the conditional components per row (max), the unconditional components, the prompts
and components registered, the seconds it took to register the corpus, and resident memory.
"""
from __future__ import annotations

import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from scalegen.config import load_config
from scalegen.data.cameras import sample_train_cameras
from scalegen.data.compose import compose_oracle_corpus
from scalegen.distill import predict_branches
from scalegen.eval.report import format_table
from scalegen.priors import build_prior, build_world

CONFIGS = Path(__file__).resolve().parents[2] / "configs" / "oracle"


@dataclass
class OracleCostOptions:
    sizes: list[int] = field(default_factory=lambda: [60, 2500, 100_000])  # corpora registered in the compose world
    prompts: int = 8  # prompts per call
    views: int = 4
    resolution: int = 32
    calls: int = 5  # timed calls (median)


def _rss_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def _time_calls(prior, prompts: list[str], opts: OracleCostOptions, cfg) -> dict:
    cams = sample_train_cameras(cfg.camera, len(prompts))
    text = prior.text_embeddings(prompts).repeat_interleave(opts.views)
    n = len(text)
    x = torch.randn(n, 3, opts.resolution, opts.resolution)
    t = torch.full((n,), 500)
    times = []
    for i in range(opts.calls + 1):
        t0 = time.perf_counter()
        predict_branches(prior, text, cams.expand(len(prompts)), [(x, t, False), (x, t, True)], cfg_pairs=[(0, 1)])
        if i:
            times.append(time.perf_counter() - t0)
    comps = prior.world.completions(text.tolist())
    return {"ms_per_call": 1000 * statistics.median(times), "cond_components_max": max(len(c) for c in comps),
            "uncond_components": prior.n_uncond}


def bench_oracle_cost(opts: OracleCostOptions, overrides: list[str], out_root: str = "") -> dict:
    torch.manual_seed(0)
    common = [f"camera.views_per_prompt={opts.views}", f"camera.resolution={opts.resolution}", *overrides]
    rows = []
    for mode in ("camera_aware", "view_agnostic"):
        cfg = load_config(None, [*common, f"prior.oracle.mode={mode}"])
        world = build_world(cfg)
        prior = build_prior(cfg, world)
        r = _time_calls(prior, world.seen[:opts.prompts], opts, cfg)
        rows.append({"world": "default", "mode": mode, "corpus": len(world.prompts), **r,
                     "registered_components": world.n_components, "register_s": 0.0, "rss_mb": _rss_mb()})
        print(f"[oracle-cost] {rows[-1]}", flush=True)
    compose = CONFIGS / "world_compose.yaml"
    for n in opts.sizes:
        cfg = load_config(compose, common)
        world = build_world(cfg)
        prior = build_prior(cfg, world)
        corpus = compose_oracle_corpus(world.grammar, n, 0, seed=0)["train"]
        t0 = time.perf_counter()
        prior.text_embeddings(corpus)  # what a run's BatchEncoder does over an epoch
        reg = time.perf_counter() - t0
        pick = [corpus[i] for i in torch.randperm(len(corpus))[:opts.prompts].tolist()]
        r = _time_calls(prior, pick, opts, cfg)
        rows.append({"world": "compose", "mode": "camera_aware", "corpus": n, **r,
                     "registered_components": world.n_registered, "register_s": reg, "rss_mb": _rss_mb()})
        print(f"[oracle-cost] {rows[-1]}", flush=True)
    cfg = load_config(CONFIGS / "world_multimodal.yaml", common)
    world = build_world(cfg)
    prior = build_prior(cfg, world)
    r = _time_calls(prior, ["an object"] * opts.prompts, opts, cfg)
    rows.append({"world": "multimodal ('an object')", "mode": "camera_aware", "corpus": len(world.seen), **r,
                 "registered_components": world.n_registered, "register_s": 0.0, "rss_mb": _rss_mb()})
    print(format_table([[x["world"], x["mode"], x["corpus"], x["ms_per_call"], x["cond_components_max"],
                         x["uncond_components"], x["registered_components"], x["register_s"], x["rss_mb"]] for x in rows],
                       ["world", "mode", "prompts", "ms/call", "cond comps", "uncond comps", "registered comps",
                        "register s", "RSS MB"]))
    return {"rows": rows, "prompts": opts.prompts, "views": opts.views, "resolution": opts.resolution}
