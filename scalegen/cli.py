"""Command line: ``scalegen train | eval | generate | refine | gallery | bench | info | prior | data``.

Errors a user can cause (``ScalegenError``) print one line and exit 2, without a traceback.
"""
from __future__ import annotations

import argparse
import math
import os
import sys
import time
from pathlib import Path

from scalegen.errors import Preempted, ScalegenError
from scalegen.eval.report import format_table as _table
from scalegen.eval.report import write_json as _write_json


# ---------------------------------------------------------------------------------------------
def cmd_train(args) -> int:
    from scalegen.config import load_config, load_run_config
    from scalegen.train.loop import train

    if args.resume == "auto":  # a requeued job: continue the run if it exists, else start it
        if not args.out:
            raise ScalegenError("--resume auto needs --out RUN_DIR, the run to continue or start")
        args.resume = "yes" if (Path(args.out) / "config.yaml").is_file() else None
        if args.resume:
            args.config = None  # the run's own config.yaml (+ overrides) is what continues
    if args.resume:
        if args.config:
            raise ScalegenError("pass either --config (new run) or --resume (continue a run), not both")
        if not args.out:
            raise ScalegenError("--resume needs --out RUN_DIR, the run to continue")
        cfg_path = Path(args.out) / "config.yaml"
        if not cfg_path.is_file():
            raise ScalegenError(f"'{args.out}' has no config.yaml; it is not a run directory (drop --resume)")
        cfg = load_run_config(args.out, args.overrides)
    else:
        cfg = load_config(args.config, args.overrides)
    if args.print_config:
        print(cfg.to_yaml(), end="")
        return 0
    out = args.out or cfg.train.out_dir
    if not args.out and not args.resume and Path(out).exists():
        stem = Path(args.config).stem if args.config else "oracle-default"
        redirected = str(Path(out).parent / f"{stem}-{time.strftime('%Y%m%d-%H%M%S')}")
        if int(os.environ.get("RANK", "0")) == 0:
            print(f"'{out}' exists (train.out_dir): this run goes to '{redirected}' (pass --out to choose)", flush=True)
        out = redirected
    from scalegen.train.checkpoint import checkpoint_step, latest_checkpoint

    before = latest_checkpoint(out) if args.resume and Path(out).is_dir() else None
    start = checkpoint_step(before) if before is not None else 0
    t0 = time.perf_counter()
    ckpt = train(cfg, out, resume=bool(args.resume))
    end = checkpoint_step(ckpt) if ckpt is not None else start
    if int(os.environ.get("RANK", "0")) != 0:  # one closing line per job, not per process
        return 0
    if end == start:
        print(f"nothing to train: the run in {out} is already at step {end} of {cfg.train.max_steps}; "
              "raise train.max_steps to continue it")
    else:
        print(f"trained steps {start + 1}-{end} ({end - start} in this run, {time.perf_counter() - t0:.0f} s); "
              f"{out} is at step {end} of {cfg.train.max_steps}; checkpoint: {ckpt}")
    return 0


def cmd_eval(args) -> int:
    from scalegen.priors import build_world
    from scalegen.train.model import build_model, load_run

    if not args.ckpt:
        raise ScalegenError("scalegen eval needs --ckpt RUN_DIR (CLIP scores: `scalegen eval clip --ckpt RUN --corpus FILE`)")
    cfg, text_encoder, model, ckpt = load_run(args.ckpt)
    if cfg.prior.name != "oracle":
        raise ScalegenError(f"'{args.ckpt}' was trained with prior {cfg.prior.name}; oracle metrics need an "
                            "oracle-world run (use `scalegen eval clip` for real priors)")
    from scalegen.eval.oracle import evaluate_oracle

    world = build_world(cfg)
    t0 = time.perf_counter()
    res = evaluate_oracle(cfg, model, text_encoder, world, max_prompts=args.max_prompts)
    res["checkpoint"] = str(ckpt)
    res["eval_s"] = time.perf_counter() - t0
    if args.baseline:
        import torch

        torch.manual_seed(cfg.train.seed)
        _, init_model = build_model(cfg)
        base = evaluate_oracle(cfg, init_model.eval(), text_encoder, world, max_prompts=args.max_prompts)
        res["untrained"] = {k: {m: base[k].get(m, math.nan) for m in ("psnr", "psnr_fg", "iou", "color_error", "r_at_1")}
                            for k in base}
    splits = list(world.splits())
    rows = [[split, r["psnr"], r["psnr_fg"], r["iou"], r["color_error"], r.get("r_at_1", math.nan), r["n_prompts"]]
            for split, r in res.items() if split in splits]
    if "untrained" in res:
        rows += [[f"untrained/{k}", r["psnr"], r["psnr_fg"], r["iou"], r["color_error"], r["r_at_1"], "-"]
                 for k, r in res["untrained"].items()]
    chance = next((r["r_at_1_chance"] for k, r in res.items() if k in splits and "r_at_1_chance" in r), None)
    print(_table(rows, ["split", "PSNR (dB)", "PSNR fg", "mask IoU", "colour err", "R@1", "prompts"]))
    if chance is not None:
        print(f"R@1: each view retrieves its prompt among the ground truths of all prompts (chance {chance:.3f})")
    else:
        print("R@1: the default world's only (a compositional world's gallery would be its whole grammar)")
    print(f"({res['eval_s']:.0f} s, checkpoint {ckpt})")
    _write_json(args.json, res)
    return 0


def cmd_refine(args) -> int:
    from scalegen.refine import refine, refine_config, resume_config

    if args.resume:
        if args.prompt or args.init_from or args.config or args.representation or args.distill:
            raise ScalegenError("--resume continues the refinement in --out as it was set up; give only key=value "
                                "overrides (e.g. train.max_steps=800) with it")
        cfg = resume_config(args.out, args.overrides)
    else:
        if not args.prompt:
            raise ScalegenError("give --prompt TEXT, the prompt to refine (or --resume to continue a refinement)")
        cfg = refine_config(args.prompt, args.representation or "gaussians", args.distill, args.init_from,
                            args.config, args.overrides)
    if args.print_config:
        print(cfg.to_yaml(), end="")
        return 0
    rep = refine(cfg, args.out, init_from=args.init_from, resume=bool(args.resume), up=args.up, fit=args.fit,
                 mesh_resolution=args.mesh_resolution)
    scores = rep.get("metrics", {})
    rows = [[name, s["psnr"], s["psnr_fg"], s["iou"], s["color_error"]]
            for name, s in (("amortized generator", scores.get("amortized")), ("start", scores.get("start")),
                            ("refined", scores.get("refined"))) if s]
    if rows:
        print(_table(rows, ["scene", "PSNR (dB)", "PSNR fg", "mask IoU", "colour err"]))
    print(f"refined '{rep['prompt']}' ({rep['representation']}, {rep['distill']}, start: {rep['start']}) for "
          f"{rep['steps']} steps in {rep['train_s']:.0f} s ({rep['train_cpu_s']:.0f} s CPU)" + (f"; {rep['gaussians']} Gaussians" if "gaussians" in rep
                                                              else "")
          + f"; wrote {', '.join(rep[k] for k in ('ply', 'mesh') if k in rep)} and {Path(args.out) / 'refine.json'}")
    _write_json(args.json, rep)
    return 0


def cmd_eval_clip(args) -> int:
    from accelerate import PartialState

    from scalegen.eval.clip import (FolderViews, RunViews, evaluate_clip, make_protocol, people_table,
                                    read_pool)
    from scalegen.eval.clip_models import default_cache_dir, load_clip
    from scalegen.train.checkpoint import run_dir_of
    from scalegen.train.model import load_run

    if bool(args.ckpt) == bool(args.images):
        raise ScalegenError("give exactly one of --ckpt RUN_DIR (render and score a run) or --images DIR (score "
                            "views rendered elsewhere)")
    render_keys = {"--views": args.views, "--resolution": args.resolution, "--elevation": args.elevation,
                   "--distance": args.distance, "--fovy": args.fovy}
    if args.images:
        given = [k for k, v in render_keys.items() if v is not None] + (["--save-views"] if args.save_views else [])
        if given:
            raise ScalegenError(f"{given[0]} shapes the renders of --ckpt; --images scores the views as they are")
        if not args.out:
            raise ScalegenError("--images needs --out DIR for the results (not inside the images folder)")
    protocol = make_protocol(args.protocol, model=args.model, views=args.views, resolution=args.resolution,
                             elevation=args.elevation, distance=args.distance, fovy=args.fovy, crop=args.crop,
                             resize=args.resize, caption_prefix=args.prefix, clipscore_w=args.clipscore_w,
                             distractors=args.distractors, seed=args.seed, splits=args.split)
    if args.batch < 1 or args.contact < 0:
        raise ScalegenError(f"--batch must be at least 1 and --contact at least 0 (got {args.batch}, {args.contact})")
    state = PartialState(cpu=args.cpu)
    pool = read_pool(args.corpus, protocol.splits)  # corpus, run and images are checked before CLIP loads
    if args.ckpt:
        source = RunViews(*load_run(args.ckpt), protocol, state.device)
        out = args.out or str(run_dir_of(source.ckpt) / "eval-clip" / f"{protocol.name}-{Path(args.corpus).stem}")
    else:
        source = FolderViews(args.images, pool, args.glob)
        out = args.out
        if source.missing and state.is_main_process:
            print(f"note: {len(source.missing)} of {len(pool.prompts)} corpus prompts have no image folder "
                  f"(e.g. {source.missing[0]!r}); they are not scored but stay retrieval candidates", flush=True)
    clip = load_clip(protocol.model, state.device)
    summary = evaluate_clip(source, pool, protocol, clip, out, args.cache or default_cache_dir(), state=state,
                            batch=args.batch, contact=args.contact, save_views=args.save_views,
                            overwrite=args.overwrite, progress=not args.no_progress)
    if state.is_main_process:
        print(people_table(summary))
        p = summary["protocol"]
        how = "views as rendered" if args.images else f"{p['views']} views at {p['resolution']} px"
        print(f"protocol {p['name']}: {p['model']} ({p['backend']}), {how}; {summary['n_images']} images, "
              f"{summary['eval_s']:.0f} s; results in {out}/ (summary.json, summary.md, per_prompt.csv, "
              "contact_sheet.png)")
        _write_json(args.json, summary)
    return 0


def _empty_folder(path: str, what: str) -> Path:
    """``path`` as a folder to create ``what`` in: refused when it holds anything (never overwrite)."""
    out = Path(path)
    if out.exists() and any(out.iterdir()):
        raise ScalegenError(f"'{out}' is not empty; give a new folder for {what}")
    return out


def cmd_eval_make_tiny_clip(args) -> int:
    from scalegen.eval.clip_models import make_tiny_clip_model

    out = _empty_folder(args.out, "the tiny CLIP")
    make_tiny_clip_model(out, backend=args.backend, seed=args.seed)
    print(f"wrote a tiny random {args.backend} CLIP to {out} (use --model {out}; its scores mean nothing)")
    return 0


def _generate_options(args):
    from scalegen.export.pipeline import GenerateOptions

    return GenerateOptions(format=args.format or "glb", resolution=args.resolution, level=args.level,
                           min_fragment=0.0 if args.keep_fragments else 0.02, simplify=args.simplify,
                           texture=args.texture, texture_size=args.texture_size, turntable=args.turntable,
                           turntable_frames=args.frames, turntable_size=args.turntable_size, batch=args.batch,
                           overwrite=args.overwrite)


def cmd_generate(args) -> int:
    import torch

    from scalegen.data.prompts import read_corpus
    from scalegen.eval.report import format_table
    from scalegen.export.pipeline import generate_assets, plan_jobs
    from scalegen.train.model import load_run

    if (args.prompt is None) == (args.prompts is None):
        raise ScalegenError("give exactly one of --prompt TEXT or --prompts FILE")
    if args.prompt is not None and not args.prompt.strip():
        raise ScalegenError("--prompt is empty; describe the asset, e.g. --prompt 'a large red cube'")
    prompts = [" ".join(args.prompt.split())] if args.prompt is not None else read_corpus(args.prompts, split=args.split)
    opts = _generate_options(args)
    plan = plan_jobs(prompts, args.out, opts, single=args.prompt is not None, format_given=args.format is not None)
    if args.threads:
        torch.set_num_threads(args.threads)
    t_load = time.perf_counter()
    cfg, text_encoder, model, ckpt = load_run(args.ckpt)
    t_load = time.perf_counter() - t_load
    _check_world_prompts(cfg, prompts, args.ckpt)
    res = generate_assets(plan, cfg, model, text_encoder, opts, checkpoint=str(ckpt))
    n = len(res["assets"])
    rows = [[stage, s, s / n] for stage, s in res["seconds"].items()] + [["total", res["total_s"], res["seconds_per_asset"]]]
    print(format_table(rows, ["stage", "seconds", "per asset"]))
    where = plan.folder if plan.folder is not None else plan.jobs[0].mesh
    print(f"wrote {n} asset(s) to {where} in {res['total_s']:.2f} s ({res['seconds_per_asset']:.2f} s per asset; "
          f"checkpoint loaded in {t_load:.1f} s, {torch.get_num_threads()} thread(s))")
    return 0


def _check_world_prompts(cfg, prompts: list[str], ckpt) -> None:
    """An oracle-world generator has only ever seen the world's grammar: a prompt outside it would give a
    mesh of nothing in particular, so it is refused (with the grammar), not exported. A per-prompt scene
    (`scalegen refine`) has only its own prompt."""
    if cfg.data.prompt is not None and any(p.strip().lower() != cfg.data.prompt.strip().lower() for p in prompts):
        raise ScalegenError(f"'{ckpt}' is the per-prompt scene of '{cfg.data.prompt}'; export that prompt (its "
                            "mesh.glb is already in the folder) or use an amortized run")
    if cfg.prior.name != "oracle":
        return
    from scalegen.errors import DataError
    from scalegen.priors import build_world

    world = build_world(cfg)
    for p in prompts:
        try:
            world.parse(p)
        except DataError as e:
            shape = "a <size> <color> <shape>" if cfg.world.kind == "single" else "its compositional grammar"
            raise ScalegenError(f"'{ckpt}' was trained in the oracle world, which only has prompts like "
                                f"'{world.seen[0]}' ({shape}); {p!r} is not one of them ({e}), so its "
                                "mesh would mean nothing: use a run trained with a real prior for free text") from None


def cmd_gallery(args) -> int:
    import os
    import shutil

    import torch

    from scalegen.export.gallery import build_site, find_viewer
    from scalegen.export.pipeline import MANIFEST, GenerateOptions, generate_assets, plan_jobs, read_manifest

    source, out = Path(args.source), Path(args.out)
    is_run = (source / "config.yaml").is_file() or (source / "model.safetensors").is_file()
    if not is_run and not (source / MANIFEST).is_file():
        raise ScalegenError(f"'{source}' is neither a run directory (config.yaml) nor an asset folder ({MANIFEST} "
                            "from `scalegen generate --prompts`)")
    if out.exists() and (not out.is_dir() or any(out.iterdir())) and not args.overwrite:
        raise ScalegenError(f"'{out}' already exists and is not empty; pass --overwrite to replace it")
    parent = out.parent if str(out.parent) else Path(".")
    if not parent.is_dir():
        raise ScalegenError(f"folder '{parent}' does not exist; create it first")
    viewer = find_viewer(args.viewer)
    tmp = parent / f".{out.name}.tmp-{os.getpid()}"
    try:
        if is_run:
            from scalegen.train.model import load_run

            if args.threads:
                torch.set_num_threads(args.threads)
            cfg, text_encoder, model, ckpt = load_run(source)
            tags: dict[str, str] = {}
            if args.prompts:
                from scalegen.data.prompts import read_corpus

                prompts = read_corpus(args.prompts, split=args.split)
                _check_world_prompts(cfg, prompts, source)
            elif cfg.prior.name == "oracle" and cfg.data.prompts == "oracle":
                from scalegen.priors import build_world

                world = build_world(cfg)
                splits = world.splits()  # seen, unseen (default world) or seen + held-out levels (compositional)
                tags = {p: split for split, ps in splits.items() for p in ps}
                prompts = [p for split, ps in splits.items() if split != "seen" for p in ps] + splits["seen"]
            else:
                raise ScalegenError("this run has no built-in prompt list; give --prompts FILE")
            prompts = prompts[:args.max_prompts] if args.max_prompts else prompts
            opts = GenerateOptions(resolution=args.resolution, turntable=True, turntable_frames=args.frames,
                                   turntable_size=args.turntable_size, batch=args.batch, texture=args.texture)
            plan = plan_jobs(prompts, tmp / "assets", opts, single=False)
            res = generate_assets(plan, cfg, model, text_encoder, opts, checkpoint=str(ckpt))
            entries = [{**e, "tag": tags.get(e["prompt"])} for e in res["assets"]]
            build_site(tmp / "assets", entries, tmp, viewer, f"scalegen: {source.resolve().name}")
        else:
            entries = read_manifest(source)["assets"]
            build_site(source, entries, tmp, viewer, f"scalegen: {source.resolve().name}")
        if out.exists():
            shutil.rmtree(out) if out.is_dir() else out.unlink()
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    print(f"wrote {out / 'index.html'} ({len(entries)} assets; open it in a browser, no server needed)")
    return 0


def cmd_info(args) -> int:
    import torch

    from scalegen.config import load_config
    from scalegen.train.model import build_scene
    from scalegen.text import text_dim_of

    cfg = load_config(args.config, args.overrides)
    with torch.device("meta"):  # shapes only: paper-size generators cost no memory or init time
        model = build_scene(cfg, text_dim_of(cfg))
    groups = {name: sum(p.numel() for p in ps) for name, ps in model.generator.param_groups().items()}
    params = {"generator": sum(p.numel() for p in model.generator.parameters()),
              "background": sum(p.numel() for p in model.background.parameters()),
              **{f"generator.{k}": v for k, v in groups.items()}}
    batch = cfg.data.prompts_per_step
    accum = cfg.train.grad_accum
    res = {"params": params, "prompts_per_step_per_process": batch * accum,
           "images_per_step_per_process": batch * accum * cfg.camera.views_per_prompt, "grad_accum": accum}
    print(_table([[k, f"{v:,}"] for k, v in params.items()], ["module", "parameters"]))
    print(f"effective batch per process: {batch} prompts x {cfg.camera.views_per_prompt} views"
          + (f" x {accum} accumulated micro-batches" if accum > 1 else "")
          + " (multiply by the number of processes under accelerate launch)")
    _write_json(args.json, res)
    return 0


def cmd_bench(args) -> int:
    from scalegen.bench import run_bench

    res = run_bench(args.name, args.overrides, out_root=args.out)
    _write_json(args.json, res)
    return 0


def cmd_prior_make_tiny(args) -> int:
    from scalegen.priors.stable_diffusion import make_tiny_sd

    out = _empty_folder(args.out, "the tiny Stable Diffusion")
    make_tiny_sd(out, seed=args.seed)
    print(f"wrote a tiny random Stable Diffusion to {out} (use prior.model={out})")
    return 0


def cmd_prior_make_tiny_mvdream(args) -> int:
    from scalegen.priors.mvdream_convert import make_tiny_mvdream

    out = Path(args.out)
    if out.exists():
        raise ScalegenError(f"'{out}' already exists; give a new file name for the tiny MVDream checkpoint")
    if out.suffix != ".safetensors":
        raise ScalegenError(f"--out '{out}' must end in .safetensors")
    make_tiny_mvdream(out, seed=args.seed, context_dim=args.context_dim)
    print(f"wrote a tiny random MVDream checkpoint in the official layout to {out} (convert it with "
          f"`scalegen prior convert-mvdream {out} DIR --text-from TINY_SD_DIR`)")
    return 0


def cmd_prior_convert_mvdream(args) -> int:
    import torch

    from scalegen.priors.mvdream_convert import convert_mvdream

    t0 = time.perf_counter()
    res = convert_mvdream(args.ckpt, args.out, text_from=args.text_from, num_head_channels=args.head_channels,
                          dtype=torch.float16 if args.half else None)
    print(f"converted {res['unet_params'] / 1e6:.1f}M UNet and {res['vae_params'] / 1e6:.1f}M VAE parameters "
          f"({res['num_head_channels']}-channel heads) to {res['out']} in {time.perf_counter() - t0:.0f} s"
          + (f"; skipped MVDream's own text tower ({res['skipped_text_tensors']} tensors)"
             if res["skipped_text_tensors"] else ""))
    if res["text_tower"] is None:
        print(f"no --text-from given: copy tokenizer/ and text_encoder/ of Stable Diffusion 2.1-base into {res['out']} "
              "before training (or rerun with --text-from SD21_BASE_DIR)")
    else:
        print(f"text tower (tokenizer/, text_encoder/) copied from {res['text_tower']}; train with "
              f"prior.model={res['out']}")
    return 0


def cmd_data_build(args) -> int:
    from accelerate import PartialState

    from scalegen.config import load_config
    from scalegen.data.shards import build_shards, summary_lines, write_manifest

    if args.split:  # `--split train val text.dim=64`: nargs="+" also swallows the key=value overrides
        args.overrides = list(args.overrides or []) + [x for x in args.split if "=" in x]
        args.split = [x for x in args.split if "=" not in x] or None
    import torch

    # CPU-only machines too get one rank per process (gloo): without cpu=True, torchrun's ranks would each
    # think they are process 0 of 1 and write the same shards.
    state = PartialState(cpu=args.cpu or not torch.cuda.is_available())
    from scalegen.train.distributed import launch_warning

    warning = launch_warning(state.num_processes)
    if warning and state.is_main_process:
        print(f"warning: {warning}", flush=True)
    encoder = None
    if args.encoder != "none":
        cfg = load_config(None, [f"text.encoder={args.encoder}"] + list(args.overrides or []))
        if args.encoder == "clip":
            from scalegen.text.clip import CLIPTextEncoder

            encoder = CLIPTextEncoder(cfg.text_model(), device=state.device)
        else:
            from scalegen.text import build_text_encoder

            encoder = build_text_encoder(cfg)
    store = args.store or ("none" if encoder is None else "views" if args.encoder == "clip" else "plain")
    t0 = time.perf_counter()
    res = build_shards(args.corpus, args.out, encoder, shard_size=args.shard_size, splits=args.split, column=args.column,
                       store=store, compress=args.compress, batch_size=args.batch_size,
                       process_index=state.process_index, num_processes=state.num_processes,
                       log=lambda m: print(m, flush=True), overwrite=args.overwrite, barrier=state.wait_for_everyone)
    state.wait_for_everyone()
    if state.is_main_process:
        m = write_manifest(args.corpus, args.out, res["plans"], res["report"], res["encoder"])
        for line in summary_lines(res["report"]):
            print(line)
        nbytes = sum(sh["bytes"] for sp in m["splits"].values() for sh in sp["shards"])
        print(f"wrote {sum(len(sp['shards']) for sp in m['splits'].values())} shards ({nbytes / 2**20:.1f} MiB, "
              f"store={store}, encoder={res['encoder']['id'] if res['encoder'] else 'none'}) to {args.out} in "
              f"{time.perf_counter() - t0:.1f} s; train with data.shards={args.out}")
    return 0


def cmd_data_check(args) -> int:
    from scalegen.data.stream import check_shards

    t0 = time.perf_counter()
    n, bad = check_shards(args.dir, url=args.url)
    for where, problem in bad:
        print(f"BAD {where}: {problem}")
    print(f"{n - len(bad)} of {n} shard(s) match the manifest ({time.perf_counter() - t0:.1f} s)"
          + (f"; rebuild with the same `scalegen data build` command (it rewrites only damaged shards)" if bad else ""))
    return 1 if bad else 0


def cmd_data_compose(args) -> int:
    from scalegen.data.compose import write_composed

    if args.world == "oracle":
        return _compose_oracle(args)
    if args.config or args.overrides:
        raise ScalegenError("--config and key=value overrides only apply to `data compose --world oracle`")
    c = write_composed(args.out, n_train=args.n, n_unseen_pairs=args.unseen_pairs, n_val=args.n_val, seed=args.seed)
    print(f"wrote {len(c['train'])} training prompts and {len(c['val'])} prompts of {len(c['unseen_pairs'])} held-out "
          f"subject-activity pairs (val/test) to {args.out}")
    return 0


def _compose_oracle(args) -> int:
    """A corpus of the oracle world's compositional grammar (the config's world.* vocabulary)."""
    import dataclasses

    from scalegen.config import load_config
    from scalegen.data.compose import write_oracle_composed
    from scalegen.priors import build_world

    cfg = load_config(args.config, ["world.kind=compositional", "text.word_order=rotary", *(args.overrides or [])])
    world = build_world(cfg)  # checks the vocabulary against the world's palette and shapes
    t0 = time.perf_counter()
    c = write_oracle_composed(args.out, world.grammar, dataclasses.asdict(cfg.world), args.n, args.n_val, args.seed)
    levels = ", ".join(f"{len(c[k])} {k}" for k in c if k.startswith("unseen_"))
    print(f"wrote {len(c['train'])} unique training prompts of the oracle world's compositional grammar and {levels} "
          f"(val/test) to {args.out} ({time.perf_counter() - t0:.1f} s); train with data.prompts={args.out} and the "
          f"same world.* keys (world.kind=compositional, text.word_order=rotary; {Path(args.out).with_suffix('.world.json')} "
          "lists them)")
    return 0


# ---------------------------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="scalegen", description=__doc__)
    sub = ap.add_subparsers(dest="command", required=True)

    p = sub.add_parser("train", help="train a generator (no arguments: the embedded oracle-world default)")
    p.add_argument("--config", help="YAML experiment file (configs/...)")
    p.add_argument("--out", help="run directory (default: train.out_dir)")
    p.add_argument("--resume", nargs="?", const="yes", choices=["yes", "auto"],
                   help="continue the run in --out from its last checkpoint; `--resume auto`: continue it if it "
                        "exists, else start it (requeued jobs)")
    p.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
    p.add_argument("overrides", nargs="*", help="key=value overrides, e.g. train.max_steps=100")
    p.set_defaults(fn=cmd_train)

    p = sub.add_parser("eval", help="oracle-world metrics of a run (PSNR, mask IoU, colour error, R@1); "
                                    "`eval clip`: CLIP scores on a prompt corpus")
    p.add_argument("--ckpt", help="run directory or checkpoint folder")
    p.add_argument("--json", help="also write the figures to this JSON file")
    p.add_argument("--baseline", action="store_true", help="also evaluate the untrained generator")
    p.add_argument("--max-prompts", type=int, default=None, help="per split (default: eval.max_prompts)")
    p.set_defaults(fn=cmd_eval)
    eval_sub = p.add_subparsers(dest="eval_command")
    q = eval_sub.add_parser("clip", help="CLIP similarity, CLIPScore and R@1 of a run (or of rendered views) on a corpus")
    q.add_argument("--ckpt", help="run directory or checkpoint folder to render")
    q.add_argument("--images", help="score views rendered elsewhere: DIR/<prompt>/<view>.png (README)")
    q.add_argument("--corpus", required=True, help="prompt file (ScaleDreamer JSON, text, CSV, JSON lines) or shard folder")
    q.add_argument("--split", nargs="+", help="corpus splits to score (default: the protocol's; test falls back to val)")
    q.add_argument("--protocol", default="scalegen", choices=["scaledreamer", "triplaneturbo", "scalegen"])
    q.add_argument("--model", help="CLIP: transformers folder or hub id, open_clip NAME:PRETRAINED or folder")
    q.add_argument("--views", type=int, help="views per prompt (protocol default)")
    q.add_argument("--resolution", type=int, help="rendered pixels per side (protocol default)")
    q.add_argument("--elevation", type=float, help="degrees (protocol default 15)")
    q.add_argument("--distance", type=float, help="camera distance (default: the run's camera.eval_distance)")
    q.add_argument("--fovy", type=float, help="degrees (default: the run's camera.eval_fovy)")
    q.add_argument("--crop", choices=["left", "center"], help="left square (ScaleDreamer) or center crop")
    q.add_argument("--resize", choices=["bilinear", "bicubic"], help="resampling to CLIP's input size")
    q.add_argument("--prefix", help="caption prefix (triplaneturbo: 'A photo depicts')")
    q.add_argument("--clipscore-w", type=float, help="CLIPScore weight w (2.5)")
    q.add_argument("--distractors", type=int, help="k of the distractor R@1 (99)")
    q.add_argument("--seed", type=int, help="distractor draw (0)")
    q.add_argument("--json", help="also write the summary to this JSON file")
    q.add_argument("--out", help="results folder (default: RUN/eval-clip/PROTOCOL-CORPUS); rerun to resume")
    q.add_argument("--cache", help="text-feature cache (default: $SCALEGEN_CACHE or ~/.cache/scalegen/clip-text)")
    q.add_argument("--batch", type=int, default=64, help="images per CLIP forward (default 64)")
    q.add_argument("--contact", type=int, default=16, help="prompts on the contact sheet (default 16)")
    q.add_argument("--glob", default="*", help="with --images: which files of a prompt folder are views")
    q.add_argument("--save-views", action="store_true", help="also write every view as OUT/views/<prompt>/<i>.png")
    q.add_argument("--overwrite", action="store_true", help="discard results of another evaluation in --out")
    q.add_argument("--cpu", action="store_true", help="run on the CPU even when a GPU is present")
    q.add_argument("--no-progress", action="store_true", help="no progress bar")
    q.set_defaults(fn=cmd_eval_clip)
    q = eval_sub.add_parser("make-tiny-clip", help="write a tiny random CLIP (tests and smoke runs)")
    q.add_argument("--out", required=True, help="new folder")
    q.add_argument("--backend", default="transformers", choices=["transformers", "open_clip"])
    q.add_argument("--seed", type=int, default=0)
    q.set_defaults(fn=cmd_eval_make_tiny_clip)

    p = sub.add_parser("generate", help="prompts -> meshes (GLB/OBJ/PLY), optionally textured, with turntables")
    p.add_argument("--ckpt", required=True, help="run directory or checkpoint folder")
    p.add_argument("--prompt", help="one prompt")
    p.add_argument("--prompts", help="a corpus file (.txt/.json/.jsonl/.csv): one asset per prompt")
    p.add_argument("--split", default="test", help="split of a JSON corpus (default: test)")
    p.add_argument("--out", required=True, help="output file (.glb/.obj/.ply) for --prompt, or a folder")
    p.add_argument("--format", help="glb | obj | ply (default glb; a file name's suffix decides for --prompt)")
    p.add_argument("--resolution", type=int, default=128, help="marching-cubes cells per axis (default 128)")
    p.add_argument("--level", type=float, default=None,
                   help="SDF level of the surface (default 1.5 * render.beta, which matches the volume renders)")
    p.add_argument("--simplify", type=int, default=None, metavar="FACES",
                   help="simplify to at most FACES faces (default: off; 10000 with --texture)")
    p.add_argument("--texture", action="store_true", help="UV atlas (xatlas) + baked base-colour texture, GLB only")
    p.add_argument("--texture-size", type=int, default=1024, help="texture width and height (default 1024)")
    p.add_argument("--turntable", action="store_true", help="also write an orbit video (MP4, or GIF without ffmpeg)")
    p.add_argument("--frames", type=int, default=24, help="turntable frames (default 24: one turn a second)")
    p.add_argument("--turntable-size", type=int, default=128,
                   help="turntable width and height, a multiple of 16 (default 128)")
    p.add_argument("--batch", type=int, default=16, help="prompts per generator call (default 16)")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--overwrite", action="store_true", help="replace existing files")
    p.add_argument("--keep-fragments", action="store_true",
                   help="keep pieces smaller than 2%% of the largest (floaters are dropped by default)")
    p.set_defaults(fn=cmd_generate)

    p = sub.add_parser("refine", help="per-prompt refinement: one prompt's 3D Gaussians or iNGP, from a sphere, an "
                                      "asset file or an amortized run's output")
    p.add_argument("--prompt", help="the prompt to refine")
    p.add_argument("--representation", choices=["gaussians", "ingp"], help="default: gaussians")
    p.add_argument("--distill", choices=["sds", "asd", "vdm", "csd", "vsd"],
                   help="distiller (default: the base config's: the run's, or sds)")
    p.add_argument("--init-from", help="'sphere' (default), a run directory of `scalegen train` (its output for the "
                                       "prompt), or a PLY / OBJ / GLB file (3DGS PLY, point cloud or mesh)")
    p.add_argument("--up", choices=["y", "z"], default="y",
                   help="up axis of a mesh / point-cloud start file (default y, glTF's; a 3DGS PLY is read as is)")
    p.add_argument("--fit", action="store_true", help="centre and scale a start file to the start sphere")
    p.add_argument("--config", help="YAML file applied over the preset")
    p.add_argument("--out", required=True, help="output folder (checkpoints, gaussians.ply, mesh.glb, refine.json)")
    p.add_argument("--resume", nargs="?", const="yes", choices=["yes"], help="continue the refinement in --out")
    p.add_argument("--mesh-resolution", type=int, default=128, help="marching-cubes grid of mesh.glb (default 128)")
    p.add_argument("--json", help="also write the report to this JSON file")
    p.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
    p.add_argument("overrides", nargs="*", help="key=value overrides, e.g. train.max_steps=200")
    p.set_defaults(fn=cmd_refine)

    p = sub.add_parser("gallery", help="a static page of a run's or an asset folder's assets (no network needed)")
    p.add_argument("source", help="run directory (assets are generated) or a folder from `generate --prompts`")
    p.add_argument("--out", required=True, help="site folder to write (index.html, viewer/, assets/)")
    p.add_argument("--prompts", help="with a run: a corpus file (default: an oracle run's unseen + seen prompts)")
    p.add_argument("--split", default="test", help="split of a JSON corpus (default: test)")
    p.add_argument("--max-prompts", type=int, default=24, help="with a run: at most this many (default 24, 0 = all)")
    p.add_argument("--resolution", type=int, default=128, help="with a run: marching-cubes cells per axis")
    p.add_argument("--texture", action="store_true", help="with a run: baked textures instead of vertex colours")
    p.add_argument("--frames", type=int, default=24, help="with a run: turntable frames (default 24)")
    p.add_argument("--turntable-size", type=int, default=128, help="with a run: turntable size (default 128)")
    p.add_argument("--batch", type=int, default=16, help="with a run: prompts per generator call")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--viewer", help="model-viewer-umd.min.js to vendor (default: node_modules, else npm install)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing site folder")
    p.set_defaults(fn=cmd_gallery)

    p = sub.add_parser("info", help="parameter counts and effective batch of a config")
    p.add_argument("--config", help="YAML experiment file")
    p.add_argument("--json", help="also write the figures to this JSON file")
    p.add_argument("overrides", nargs="*")
    p.set_defaults(fn=cmd_info)

    p = sub.add_parser("prior", help="prior tools: make-tiny (a tiny random Stable Diffusion), convert-mvdream, "
                                      "make-tiny-mvdream")
    prior_sub = p.add_subparsers(dest="prior_command", required=True)
    q = prior_sub.add_parser("make-tiny", help="write a tiny random SD (unet, vae, scheduler, CLIP) in diffusers layout")
    q.add_argument("--out", required=True, help="new folder")
    q.add_argument("--seed", type=int, default=0)
    q.set_defaults(fn=cmd_prior_make_tiny)
    q = prior_sub.add_parser("make-tiny-mvdream",
                             help="write a tiny random MVDream checkpoint in the official layout (tests, smoke runs)")
    q.add_argument("--out", required=True, help="new .safetensors file")
    q.add_argument("--seed", type=int, default=0)
    q.add_argument("--context-dim", type=int, default=32, help="text width (32 = the tiny SD's CLIP)")
    q.set_defaults(fn=cmd_prior_make_tiny_mvdream)
    q = prior_sub.add_parser("convert-mvdream", help="convert the official MVDream checkpoint (sd-v2.1-base-4view.pt) "
                             "to the folder prior.name=mvdream loads")
    q.add_argument("ckpt", help="the official checkpoint (.pt/.ckpt, read without running pickled code, or .safetensors)")
    q.add_argument("out", help="new folder: unet/, vae/, scheduler/ (+ tokenizer/, text_encoder/ with --text-from)")
    q.add_argument("--text-from", help="Stable Diffusion 2.1(-base) folder or cached hub id whose tokenizer/ and "
                                       "text_encoder/ (OpenCLIP ViT-H) are copied in")
    q.add_argument("--head-channels", type=int, default=None,
                   help="channels per attention head (default: the checkpoint's metadata, else the official 64)")
    q.add_argument("--half", action="store_true", help="store the weights in fp16 (half the disk)")
    q.set_defaults(fn=cmd_prior_convert_mvdream)

    p = sub.add_parser("data", help="corpus tools: build (webdataset shards), check (verify them), compose (a corpus)")
    data_sub = p.add_subparsers(dest="data_command", required=True)
    q = data_sub.add_parser("build", help="write a corpus as webdataset shards, optionally with text embeddings")
    q.add_argument("--corpus", required=True, help="ScaleDreamer JSON, JSON lines, text (a prompt per line) or CSV")
    q.add_argument("--out", required=True, help="output folder (rerun the same command to resume a build)")
    q.add_argument("--encoder", default="none", choices=["none", "bow", "clip"],
                   help="text encoder whose embeddings to store (text.* overrides configure it)")
    q.add_argument("--store", choices=["none", "pooled", "plain", "views"],
                   help="embeddings to store: pooled only, plain prompt, or prompt + 4 view variants "
                        "(default: views for clip, plain for bow)")
    q.add_argument("--compress", default="none", choices=["none", "zlib"], help="compress stored embeddings")
    q.add_argument("--shard-size", type=int, default=1000, help="prompts per shard (default 1000)")
    q.add_argument("--split", nargs="+", help="splits to write (default: all splits of the corpus)")
    q.add_argument("--column", default="prompt", help="CSV column / JSON-lines key holding the prompt")
    q.add_argument("--batch-size", type=int, default=256, help="prompts per encoder call")
    q.add_argument("--cpu", action="store_true", help="encode on CPU even when a GPU is present")
    q.add_argument("--overwrite", action="store_true",
                   help="remove the shards of another build in --out first (default: refuse)")
    q.add_argument("overrides", nargs="*", help="text.* overrides, e.g. text.model=DIR text.dim=128")
    q.set_defaults(fn=cmd_data_build)
    q = data_sub.add_parser("check", help="verify every shard against its manifest (sha256, counts, record shapes)")
    q.add_argument("dir", help="a `scalegen data build` folder (or its manifest.json)")
    q.add_argument("--url", help="URL template of a shard, as data.shard_url (default: the local files)")
    q.set_defaults(fn=cmd_data_check)
    q = data_sub.add_parser("compose", help="write a compositional corpus with unseen combinations: ATT3D-style "
                                             "(default) or of the oracle world's grammar (--world oracle)")
    q.add_argument("--out", required=True, help="output JSON ({train, val, test}; val = test = unseen)")
    q.add_argument("--world", choices=["att3d", "oracle"], default="att3d",
                   help="att3d: subject x activity x attire prompts (real priors); oracle: the oracle world's "
                        "compositional grammar (world.* of --config and overrides), with ground truth")
    q.add_argument("--config", help="--world oracle: YAML whose world.* keys set the vocabulary "
                                    "(e.g. configs/oracle/world_compose.yaml)")
    q.add_argument("--n", type=int, default=100_000, help="training prompts (default 100000)")
    q.add_argument("--unseen-pairs", type=int, default=20, help="att3d: subject-activity pairs held out (default 20)")
    q.add_argument("--n-val", type=int, default=2000,
                   help="unseen prompts written to val/test (default 2000; oracle: per held-out level)")
    q.add_argument("--seed", type=int, default=0, help="which prompts are drawn (the held-out combinations are "
                                                       "world.seed's)")
    q.add_argument("overrides", nargs="*", help="--world oracle: world.* overrides, e.g. world.colors=[red,blue]")
    q.set_defaults(fn=cmd_data_compose)

    p = sub.add_parser("bench", help="benchmarks (numbers for docs/performance.md)")
    p.add_argument("name", help="saturation | sharpness | guidance | flops-sd | flops-mvdream | data | distill | toy2d "
                               "| generators | generate | eval | claims | oracle-cost | paper-step | gpu")
    p.add_argument("--json", help="also write the figures to this JSON file")
    p.add_argument("--out", default="runs/bench", help="folder for the benchmark's runs")
    p.add_argument("overrides", nargs="*", help="key=value overrides applied to every run")
    p.set_defaults(fn=cmd_bench)
    return ap


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    argv = list(sys.argv[1:] if argv is None else argv)
    # `--resume` takes an optional `auto`; anything else after it is not its value (an override, say).
    argv = [("--resume=auto" if a == "--resume" and i + 1 < len(argv) and argv[i + 1] == "auto" else
             "--resume=yes" if a == "--resume" else a) for i, a in enumerate(argv)
            if not (a == "auto" and i > 0 and argv[i - 1] == "--resume")]
    # key=value overrides may follow options (`bench saturation --json f.json train.max_steps=10`),
    # which argparse's positional matching does not allow: collect them from the leftovers.
    args, extra = parser.parse_known_args(argv)
    stray = [e for e in extra if "=" not in e or e.startswith("-")]
    if stray or (extra and not hasattr(args, "overrides")):
        parser.error(f"unrecognized arguments: {' '.join(stray or extra)}")
    if extra:
        args.overrides = list(args.overrides or []) + extra
    try:
        return args.fn(args)
    except Preempted as e:
        print(f"stopped: {e}", file=sys.stderr)
        return e.exit_code
    except ScalegenError as e:
        print("error: " + " ".join(str(e).split("\n")), file=sys.stderr)  # one line, whatever a file name holds
        return 2
    except KeyboardInterrupt:
        print("interrupted; continue a training run with `scalegen train --out RUN_DIR --resume`", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
