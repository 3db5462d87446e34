"""``scalegen bench eval``: how fast ``scalegen eval clip`` runs on this machine.

Per CLIP architecture (open_clip, random weights: the real model's cost, nothing downloaded) and
per render resolution: images/s of CLIP scoring (8-bit views -> the protocol's crop/resize to
224 -> image tower in batches -> cosines against the pool's text features), text features/s, and
images/s of rendering the default oracle generator (untrained: a render costs the same after
training) at the run's evaluation samples per ray. ``end_to_end`` combines render and score.

Options: ``EvalOptions`` (``bench.models=[ViT-B-32,ViT-L-14]``, ``bench.resolutions=[64,224]``,
``bench.images=64``, ``bench.batch=32``, ``bench.prompts=256``, ``bench.views=8``, ``bench.render=true``,
``bench.threads=0`` (torch's default)). Config overrides (``key=value``) shape the rendered model.
"""
from __future__ import annotations

import os
import time
from dataclasses import asdict, dataclass, field
from typing import Annotated

import torch

from scalegen.config import AtLeast1, NonNeg, Range


@dataclass
class EvalOptions:
    models: list[str] = field(default_factory=lambda: ["ViT-B-32", "ViT-L-14"])  # open_clip architectures
    resolutions: Annotated[list[int], Range(ge=8)] = field(default_factory=lambda: [64, 224])  # rendered px
    images: Annotated[int, AtLeast1] = 64  # images scored per measurement
    batch: Annotated[int, AtLeast1] = 32  # images per CLIP forward
    prompts: Annotated[int, AtLeast1] = 256  # text features encoded per model (and the retrieval pool's size)
    views: Annotated[int, AtLeast1] = 8  # views per prompt when rendering
    render: bool = True
    threads: Annotated[int, NonNeg] = 0  # torch threads; 0 = torch's default


def _timed(fn, repeats: int = 2) -> float:
    """Best wall time of ``repeats`` calls after one warm-up call."""
    fn()
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def bench_eval(opts: EvalOptions, overrides: list[str], out_root: str) -> dict:
    from scalegen.config import load_config  # noqa: PLC0415
    from scalegen.eval.clip import clip_pixels, make_protocol, protocol_cameras, render_views  # noqa: PLC0415
    from scalegen.eval.clip_models import random_open_clip  # noqa: PLC0415
    from scalegen.eval.report import format_table  # noqa: PLC0415
    from scalegen.eval.retrieval import r_at_1  # noqa: PLC0415
    from scalegen.render import build_renderer  # noqa: PLC0415
    from scalegen.train.model import build_model  # noqa: PLC0415

    if opts.threads:
        torch.set_num_threads(opts.threads)
    torch.manual_seed(0)
    load_before = os.getloadavg()
    prompts = [f"a {i} prompt of the benchmark pool" for i in range(opts.prompts)]
    res: dict = {"options": asdict(opts), "threads": torch.get_num_threads(), "cases": []}

    render_ips = {}
    if opts.render:
        cfg = load_config(None, ["train.logger=none", *overrides])
        text_encoder, model = build_model(cfg)
        model.eval()
        renderer = build_renderer(cfg).eval()
        for r in opts.resolutions:
            proto = make_protocol("scalegen", views=opts.views, resolution=r)
            cams = protocol_cameras(proto, cfg.camera.eval_distance, cfg.camera.eval_fovy)
            n = max(1, -(-opts.images // opts.views))  # prompts for about ``images`` views
            secs = _timed(lambda: render_views(model, text_encoder, renderer, cams, prompts[:n], cfg.eval.samples,
                                               cfg.eval.importance_samples, "cpu"), repeats=1)
            render_ips[r] = n * opts.views / secs

    for name in opts.models:
        clip = random_open_clip(name)
        text_s = _timed(lambda: clip.encode_text(prompts), repeats=1)
        text = clip.encode_text(prompts)
        for r in opts.resolutions:
            views = torch.randint(0, 256, (opts.images, 3, r, r), dtype=torch.uint8)

            def score():
                px = clip_pixels(views, clip.image_size, "center", "bicubic", clip.mean, clip.std)
                feats = torch.cat([clip.encode_images(px[s:s + opts.batch]) for s in range(0, len(px), opts.batch)])
                r_at_1(feats @ text.T, 0)

            secs = _timed(score)
            case = {"model": name, "resolution": r, "score_images_per_s": opts.images / secs,
                    "text_prompts_per_s": opts.prompts / text_s}
            if r in render_ips:
                case["render_images_per_s"] = render_ips[r]
                case["end_to_end_images_per_s"] = 1.0 / (1.0 / render_ips[r] + secs / opts.images)
            res["cases"].append(case)
        clip = None  # free this model before the next one loads (not `del`: the closures above name it)
    res["load_average_before"], res["load_average_after"] = list(load_before), list(os.getloadavg())
    rows = [[c["model"], c["resolution"], c["score_images_per_s"], c.get("render_images_per_s", "-"),
             c.get("end_to_end_images_per_s", "-"), c["text_prompts_per_s"]] for c in res["cases"]]
    print(format_table(rows, ["CLIP (random weights)", "render px", "score img/s", "render img/s", "end-to-end img/s",
                              "text prompts/s"]))
    print(f"({res['threads']} threads; load average {load_before[0]:.2f} before, {res['load_average_after'][0]:.2f} "
          "after: other jobs slow every figure)")
    return res
