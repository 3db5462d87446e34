"""``scalegen bench generate``: seconds per asset of ``scalegen generate``'s path, per stage, for one
prompt and for a batch, per generator and marching-cubes resolution; plus the mesh-vs-render
silhouette IoU of what was written (so a speed-up that breaks the meshes shows).

Cases (``bench.cases``):
  hyper_ingp_<R>   the oracle world's Hyper-iNGP from a trained run (``bench.ckpt``; without one, a
                   run of the default config with ``train.max_steps=150`` is trained into OUT once)
  conv3d_<R>, triplane_<R>
                   the paper-size 3DConv-Net and Triplane-Transformer, randomly initialised (nobody can
                   train them on this CPU; at init every prompt is the start sphere plus the trunk's
                   residual, a surface of the same order as a trained object's), text width 1024 with
                   77 tokens. A 16-prompt generator call does not fit 24 GB (the 3DConv-Net's output
                   grid alone is 0.27 GB per prompt), so their prompts go through the generator
                   ``bench.paper_call`` at a time.

Every batch size of a case works through the same prompts (``bench.prompts``, unseen first), so the
seconds per asset compare like with like. Each (case, batch) runs the real pipeline (``export.pipeline.generate_assets``: text encoding +
generator, SDF pyramid, marching cubes, colours, GLB write) into a scratch folder, after one
warm-up prompt of the same case (imports, allocator) for the Hyper-iNGP; paper-size cases skip the
warm-up (one forward is minutes on a busy CPU). The machine's load average is recorded with the
numbers.

Options (``bench.NAME=VALUE``): see ``GenerateBenchOptions``. Other ``key=value`` overrides go to
the Hyper-iNGP training run when one is needed.
"""
from __future__ import annotations

import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import torch

from scalegen.config import load_config
from scalegen.errors import ConfigError
from scalegen.eval.report import format_table


@dataclass
class GenerateBenchOptions:
    cases: list[str] = field(default_factory=lambda: ["hyper_ingp_128", "hyper_ingp_256", "conv3d_256",
                                                       "triplane_256"])
    batches: list[int] = field(default_factory=lambda: [1, 16])  # prompts per generator call
    prompts: int = 16  # the prompt set every batch size works through (the same prompts for each)
    paper_prompts: int = 4  # ... for the paper-size generators (one forward is minutes on a busy CPU)
    ckpt: str = ""  # a trained oracle-world Hyper-iNGP run (default: train one, see the module docstring)
    train_steps: int = 150  # steps of that run when it has to be trained
    threads: int = 0  # torch CPU threads (0: torch's default)
    paper_call: int = 4  # the most prompts per generator call for the paper-size generators
    iou: bool = True  # also measure the written meshes' silhouette IoU against the volume renders
    texture: bool = False  # bake textures too (adds the texture stage)


def _load_average() -> float:
    return os.getloadavg()[0]


def _case(name: str) -> tuple[str, int]:
    gen, _, res = name.rpartition("_")
    if gen not in ("hyper_ingp", "conv3d", "triplane") or not res.isdigit():
        raise ConfigError(f"bench.cases: '{name}' is not GENERATOR_RESOLUTION with GENERATOR one of hyper_ingp, "
                          "conv3d, triplane (e.g. conv3d_256)")
    return gen, int(res)


def _oracle_run(opts: GenerateBenchOptions, overrides: list[str], out_root: str) -> Path:
    if opts.ckpt:
        return Path(opts.ckpt)
    run = Path(out_root) / f"generate-hyper_ingp-{opts.train_steps}"
    if not (run / "checkpoints").is_dir():
        from scalegen.train.loop import train  # noqa: PLC0415

        cfg = load_config(None, ["train.logger=none", "train.progress=false", f"train.max_steps={opts.train_steps}",
                                 *overrides])
        if run.exists():
            shutil.rmtree(run)
        print(f"training the oracle Hyper-iNGP for {opts.train_steps} steps into {run} (once) ...", flush=True)
        train(cfg, run)
    return run


def _model(gen: str, opts: GenerateBenchOptions, overrides: list[str], out_root: str):
    """(cfg, text encoder, model, label) of a case."""
    from scalegen.train.model import build_model, load_run  # noqa: PLC0415

    if gen == "hyper_ingp":
        run = _oracle_run(opts, overrides, out_root)
        cfg, text_encoder, model, ckpt = load_run(run)
        return cfg, text_encoder, model, f"oracle Hyper-iNGP ({ckpt})"
    name = "conv3d" if gen == "conv3d" else "triplane_transformer"
    cfg = load_config(None, [f"generator.name={name}", "generator.preset=paper", "text.dim=1024",
                             "text.max_tokens=77"])
    torch.manual_seed(0)
    text_encoder, model = build_model(cfg)
    return cfg, text_encoder, model.eval(), f"paper-size {name}, random init"


def _prompts(cfg, n: int) -> list[str]:
    """``n`` of the oracle world's prompts (unseen first), repeated when there are fewer."""
    from scalegen.priors import build_world  # noqa: PLC0415

    world = build_world(cfg)
    pool = world.unseen + world.seen
    return [pool[i % len(pool)] for i in range(n)]


def _run(cfg, text_encoder, model, prompts: list[str], resolution: int, call: int, texture: bool,
         scratch: Path) -> dict:
    from scalegen.export.pipeline import GenerateOptions, generate_assets, plan_jobs  # noqa: PLC0415

    if scratch.exists():
        shutil.rmtree(scratch)
    opts = GenerateOptions(resolution=resolution, batch=call, texture=texture)
    plan = plan_jobs(prompts, scratch, opts, single=False)
    return generate_assets(plan, cfg, model, text_encoder, opts, log=lambda m: None)


def _iou(cfg, text_encoder, model, prompts: list[str], folder: Path, assets: list[dict], call: int) -> float:
    import numpy as np  # noqa: PLC0415
    import trimesh  # noqa: PLC0415

    from scalegen.export.consistency import check_cameras, silhouette_iou  # noqa: PLC0415
    from scalegen.export.files import z_up  # noqa: PLC0415
    from scalegen.render import build_renderer  # noqa: PLC0415

    renderer, cams = build_renderer(cfg).eval(), check_cameras(cfg, views=8, size=64)
    ious = []
    with torch.no_grad():
        for s in range(0, len(prompts), call):
            meshes = [trimesh.load(folder / a["mesh"], force="mesh", process=False) for a in assets[s:s + call]]
            field, _ = model(text_encoder.encode(prompts[s:s + call]))
            ious.append(silhouette_iou([z_up(np.asarray(m.vertices)) for m in meshes], [np.asarray(m.faces) for m in meshes],
                                       field, renderer, cams, samples=32, importance_samples=32))
    return float(torch.cat(ious).mean())


def bench_generate(opts: GenerateBenchOptions, overrides: list[str], out_root: str) -> dict:
    if opts.threads:
        torch.set_num_threads(opts.threads)
    import skimage.measure  # noqa: F401, PLC0415 - heavy imports once, outside the timings
    import trimesh  # noqa: F401, PLC0415

    cases = [(name, *_case(name)) for name in opts.cases]
    scratch = Path(out_root) / "generate-scratch"
    results = {}
    for name, gen, resolution in cases:
        cfg, text_encoder, model, label = _model(gen, opts, overrides, out_root)
        paper = gen != "hyper_ingp"
        call = opts.paper_call if paper else max(opts.batches)
        prompts = _prompts(cfg, opts.paper_prompts if paper else opts.prompts)
        if not paper:
            _run(cfg, text_encoder, model, prompts[:1], resolution, 1, opts.texture, scratch)  # warm-up
        for batch in opts.batches:
            load = _load_average()
            res = _run(cfg, text_encoder, model, prompts, resolution, min(call, batch), opts.texture, scratch)
            key = f"{gen}/{resolution}/batch{batch}"
            n = len(res["assets"])
            results[key] = {
                "seconds_per_asset": res["seconds_per_asset"], "resolution": resolution, "batch": batch,
                "prompts_per_generator_call": min(call, batch), "prompts": len(prompts),
                "stages": {k: v / n for k, v in res["seconds"].items()},
                "vertices": sum(a["vertices"] for a in res["assets"]) / n,
                "faces": sum(a["faces"] for a in res["assets"]) / n,
                "generator": label, "threads": torch.get_num_threads(), "load_average": load,
            }
            if opts.iou:
                results[key]["silhouette_iou"] = _iou(cfg, text_encoder, model, prompts, scratch, res["assets"],
                                                      min(call, batch))
            r = results[key]
            print(f"{key}: {r['seconds_per_asset']:.3f} s per asset "
                  f"({', '.join(f'{k} {v:.3f}' for k, v in r['stages'].items())}), load {load:.1f}", flush=True)
        del model
    shutil.rmtree(scratch, ignore_errors=True)
    stages = list(dict.fromkeys(k for r in results.values() for k in r["stages"]))
    rows = [[key, r["prompts_per_generator_call"], *(r["stages"].get(s, 0.0) for s in stages), r["seconds_per_asset"],
             r.get("silhouette_iou", float("nan")), f"{r['load_average']:.1f}"] for key, r in results.items()]
    print(format_table(rows, ["case", "per call", *stages, "s/asset", "IoU", "load"]))
    print(f"({torch.get_num_threads()} thread(s); stages in seconds per asset)")
    return results

