"""Command line: ``scalegen train | eval | generate | refine | gallery | bench | info | plan | prior | data``.

Errors a user can cause (``ScalegenError``) print one line and exit 2, without a traceback.
So do command lines argparse refuses: every number is range-checked and every path checked for its
kind (file or folder) by the argument types below, before any work starts.
"""
from __future__ import annotations

import argparse
import contextlib
import math
import os
import sys
import time
from pathlib import Path

from scalegen.bench import NAMES as BENCH_NAMES
from scalegen.config import DISTILLERS, PER_PROMPT
from scalegen.errors import Interrupted, Preempted, ScalegenError
from scalegen.eval.report import format_table as _table
from scalegen.eval.report import write_json as _write_json


class _NamesOf:
    """argparse choices read from the module that owns the name list when argparse first needs them
    (checking a value, writing help), so that building the parser imports no torch."""

    def __init__(self, module: str, name: str):
        self.module, self.name = module, name

    def _names(self) -> tuple:
        import importlib

        return tuple(getattr(importlib.import_module(self.module), self.name))

    def __iter__(self):
        return iter(self._names())

    def __contains__(self, item) -> bool:
        return item in self._names()


# --------------------------------------------------------------------------------------------- argument types
# Each returns the converted value or raises ArgumentTypeError with what is wrong and what is allowed;
# argparse prefixes the flag, and ``Parser.error`` prints it as one line (exit code 2).
def int_range(lo: int, hi: int | None = None, what: str = "an integer"):
    """An argparse type: an integer in [lo, hi] (hi None: no upper bound)."""
    def parse(text: str) -> int:
        try:
            v = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}") from None
        if v < lo or (hi is not None and v > hi):
            bound = f"at least {lo}" if hi is None else f"from {lo} to {hi}"
            raise argparse.ArgumentTypeError(f"must be {bound}, got {v}")
        return v
    parse.__name__ = "int"  # argparse names the type in its own messages
    return parse


def float_range(lo: float | None = None, hi: float | None = None, lo_open: bool = False, hi_open: bool = False):
    """An argparse type: a finite float in [lo, hi] (open ends where asked; None: unbounded)."""
    def parse(text: str) -> float:
        try:
            v = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
        low_bad = lo is not None and (v <= lo if lo_open else v < lo)
        high_bad = hi is not None and (v >= hi if hi_open else v > hi)
        if not math.isfinite(v) or low_bad or high_bad:
            left = "" if lo is None else f"{'>' if lo_open else '>='} {lo:g}"
            right = "" if hi is None else f"{'<' if hi_open else '<='} {hi:g}"
            rng = " and ".join(x for x in (left, right) if x) or "finite"
            raise argparse.ArgumentTypeError(f"must be a finite number {rng}, got {text}")
        return v
    parse.__name__ = "float"
    return parse


positive_int = int_range(1)
nonneg_int = int_range(0)
seed_int = int_range(0, 2**32 - 1, "an integer seed")  # numpy's seed range, which every seed here must fit
grid_int = int_range(8, 1024)  # marching-cubes cells per axis: below 8 nothing is resolved, 1024^3 fills memory
image_int = int_range(8, 4096)
finite_float = float_range()
positive_float = float_range(0.0, lo_open=True)


def _first_existing(p: Path) -> Path:
    return next((a for a in [p, *p.parents] if a.exists()), Path("."))


def _kind_error(text: str, want: str) -> argparse.ArgumentTypeError:
    p = Path(text)
    anchor = _first_existing(p)
    if anchor != p and not anchor.is_dir():
        return argparse.ArgumentTypeError(f"'{text}' cannot be created: '{anchor}' is a file, not a folder")
    return argparse.ArgumentTypeError(f"'{text}' {'does not exist' if not p.exists() else 'is a ' + ('folder' if p.is_dir() else 'file')}; "
                                      f"give {want}")


def existing_file(text: str) -> str:
    """An argparse type: a file that exists."""
    if not Path(text).is_file():
        raise _kind_error(text, "an existing file")
    return text


def existing_dir(text: str) -> str:
    """An argparse type: a folder that exists."""
    if not Path(text).is_dir():
        raise _kind_error(text, "an existing folder")
    return text


def existing_path(text: str) -> str:
    """An argparse type: a file or folder that exists."""
    if not Path(text).exists():
        raise _kind_error(text, "an existing file or folder")
    return text


def model_ref(text: str) -> str:
    """An argparse type: a trained model to load: a folder (run, checkpoint, exported) or a Hub id. A file is
    refused here; a name that is neither a folder nor a cached Hub id is named by the loader."""
    if Path(text).is_file():
        raise argparse.ArgumentTypeError(f"'{text}' is a file; give a run folder, a checkpoint folder, an exported "
                                         "folder or a Hub id (owner/name)")
    return text


def out_dir(text: str) -> str:
    """An argparse type: a folder to write: not a file, and creatable (no file on the way to it)."""
    p = Path(text)
    if p.exists() and not p.is_dir():
        raise argparse.ArgumentTypeError(f"'{text}' is a file; give a folder (new or existing) to write into")
    if not _first_existing(p).is_dir():
        raise _kind_error(text, "a folder")
    return text


def out_file(text: str) -> str:
    """An argparse type: a file to write: not a folder, in a folder that exists."""
    p = Path(text)
    if p.is_dir():
        raise argparse.ArgumentTypeError(f"'{text}' is a folder; give a file name to write")
    parent = p.parent if str(p.parent) else Path(".")
    if not parent.is_dir():
        raise argparse.ArgumentTypeError(f"cannot write '{text}': folder '{parent}' does not exist; create it first")
    return text


def out_path(text: str) -> str:
    """An argparse type: a file or a folder to write (``generate --out``): its parents must be folders (an
    existing file is the command's to refuse or, with --overwrite, replace)."""
    if not Path(text).exists() and not _first_existing(Path(text)).is_dir():
        raise _kind_error(text, "a file or folder")
    return text


class _HelpFormatter(argparse.HelpFormatter):
    """argparse's help, wrapped between words only: a name such as ``paper-step`` stays whole."""

    def _split_lines(self, text: str, width: int) -> list[str]:
        import textwrap

        return textwrap.wrap(" ".join(text.split()), width, break_on_hyphens=False)


class Parser(argparse.ArgumentParser):
    """argparse, with its errors as one line (``error: scalegen data build: argument --batch-size: must
    be at least 1, got 0 (see scalegen data build --help)``) instead of the usage block, and a missing
    subcommand named with its choices. Subcommands' parsers are of this class too (argparse passes it on)."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("formatter_class", _HelpFormatter)
        super().__init__(*args, **kwargs)

    def error(self, message: str):
        import re

        m = re.match(r"the following arguments are required: (\w+_command|command)$", message)
        if m:
            choices = next((a.choices for a in self._actions if isinstance(a, argparse._SubParsersAction)), {})
            message = f"{self.prog} needs a subcommand: {' | '.join(choices)} ({self.prog} --help says what each does)"
            self.exit(2, f"error: {message}\n")
        self.exit(2, f"error: {self.prog}: {' '.join(message.split())} (see {self.prog} --help)\n")


# ---------------------------------------------------------------------------------------------
@contextlib.contextmanager
def _locked(folder, command: str, state=None):
    """Hold ``folder``'s lock (``scalegen.locks``) while a command writes it: process 0 takes it and
    every process of a launch learns whether it was refused, so none waits on a barrier for ever."""
    from scalegen.locks import FolderLock, FolderLocked

    rank, world = (state.process_index, state.num_processes) if state is not None else (0, 1)
    lock = FolderLock(folder, command, rank=rank, log=lambda m: print(m, flush=True))
    refused = None
    try:
        lock.acquire()
    except FolderLocked as e:
        refused = e
    if world > 1:
        from scalegen.train.distributed import agree

        if agree([refused is not None], state.device, world)[0] and refused is None:
            raise FolderLocked(f"'{folder}' is locked by another process (process 0 of this launch says who)")
    if refused is not None:
        raise refused
    try:
        yield lock
    finally:
        lock.release()


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
    args.out = out  # the folder an interrupt message names
    from scalegen.train.checkpoint import checkpoint_step, latest_checkpoint

    before = latest_checkpoint(out) if args.resume and Path(out).is_dir() else None
    start = checkpoint_step(before) if before is not None else 0
    t0 = time.perf_counter()
    on_validate = None
    if cfg.train.val_assets > 0:
        from scalegen.pipeline.validation import ValidationAssets

        on_validate = ValidationAssets(cfg)
    ckpt = train(cfg, out, resume=bool(args.resume), on_validate=on_validate)
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
    from scalegen.pipeline.pretrained import load_pretrained
    from scalegen.priors import build_ground_truth
    from scalegen.train.model import build_model

    if not args.ckpt:
        raise ScalegenError("scalegen eval needs --ckpt RUN_DIR (CLIP scores: `scalegen eval clip --ckpt RUN --corpus FILE`)")
    cfg, text_encoder, model, ckpt = load_pretrained(args.ckpt)
    truth = build_ground_truth(cfg)
    if truth is None:
        raise ScalegenError(f"'{args.ckpt}' was trained with prior {cfg.prior.name}; oracle metrics need an "
                            "oracle-world run (use `scalegen eval clip` for real priors)")
    from scalegen.eval.oracle import evaluate_oracle

    from scalegen.train.checkpoint import run_dir_of

    world = truth.world
    cache = run_dir_of(Path(ckpt)) / "eval-cache"  # the ground truth, rendered once per world/camera/renderer config
    t0 = time.perf_counter()
    res = evaluate_oracle(cfg, model, text_encoder, world, max_prompts=args.max_prompts, cache_dir=cache)
    res["checkpoint"] = str(ckpt)
    res["eval_s"] = time.perf_counter() - t0
    if args.baseline:
        import torch

        torch.manual_seed(cfg.train.seed)
        _, init_model = build_model(cfg)
        base = evaluate_oracle(cfg, init_model.eval(), text_encoder, world, max_prompts=args.max_prompts,
                               cache_dir=cache)
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
        cfg = refine_config(args.prompt, args.representation or PER_PROMPT[0], args.distill, args.init_from,
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

    from scalegen.eval.clip import FolderViews, evaluate_clip, make_protocol, people_table, read_pool, run_views
    from scalegen.eval.clip_models import default_cache_dir, load_clip
    from scalegen.train.checkpoint import run_dir_of
    from scalegen.train.model import load_run

    if bool(args.ckpt) == bool(args.images):
        raise ScalegenError("give exactly one of --ckpt RUN_DIR (render and score a run) or --images DIR (score "
                            "views rendered elsewhere)")
    render_keys = {"--views": args.views, "--resolution": args.resolution, "--elevation": args.elevation,
                   "--distance": args.distance, "--fovy": args.fovy, "--view-source": args.view_source}
    if args.images:
        given = [k for k, v in render_keys.items() if v is not None] + (["--save-views"] if args.save_views else [])
        if given:
            raise ScalegenError(f"{given[0]} shapes the renders of --ckpt; --images scores the views as they are")
        if not args.out:
            raise ScalegenError("--images needs --out DIR for the results (not inside the images folder)")
    protocol = make_protocol(args.protocol, model=args.model, views=args.views, resolution=args.resolution,
                             elevation=args.elevation, distance=args.distance, fovy=args.fovy, crop=args.crop,
                             resize=args.resize, caption_prefix=args.prefix, clipscore_w=args.clipscore_w,
                             distractors=args.distractors, seed=args.seed, splits=args.split,
                             view_source=args.view_source)
    if args.batch < 1 or args.contact < 0:
        raise ScalegenError(f"--batch must be at least 1 and --contact at least 0 (got {args.batch}, {args.contact})")
    state = PartialState(cpu=args.cpu)
    pool = read_pool(args.corpus, protocol.splits)  # corpus, run and images are checked before CLIP loads
    if args.ckpt:
        source = run_views(*load_run(args.ckpt), protocol, state.device)
        out = args.out or str(run_dir_of(source.ckpt) / "eval-clip" / f"{protocol.name}-{Path(args.corpus).stem}")
    else:
        source = FolderViews(args.images, pool, args.glob)
        out = args.out
        if source.missing and state.is_main_process:
            print(f"note: {len(source.missing)} of {len(pool.prompts)} corpus prompts have no image folder "
                  f"(e.g. {source.missing[0]!r}); they are not scored but stay retrieval candidates", flush=True)
    clip = load_clip(protocol.model, state.device)
    args.out = out  # what the interrupt message names
    with _locked(out, "scalegen eval clip", state):
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


def cmd_eval_train_clip(args) -> int:
    from scalegen.eval.clip_train import clip_setup, train_clip

    cfg, opts = clip_setup(args.world, args.overrides or [])
    out = _empty_folder(args.out, "the trained CLIP")
    with _locked(out, "scalegen eval train-clip"):
        res = train_clip(cfg, opts, out)
    r = res["truth_r_at_1"]
    print(f"trained {res['steps']} of {opts.steps} steps" + (f" (clip.minutes={opts.minutes:g} spent)" if res["stopped"] else "")
          + f" in {res['train_wall_s']:.0f} s ({res['train_cpu_s']:.0f} s CPU), {res['params'] / 1e6:.2f}M parameters, "
          f"loss {res['loss_ema']:.3f}; R@1 on ground truth: seen {r['seen']:.3f}, unseen {r.get('unseen', math.nan):.3f} "
          f"(chance {r['chance']:.3f}); use --model {out}")
    _write_json(args.json, {"meta": _bench_meta(getattr(args, "argv", [])), **res})
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
    from scalegen.pipeline import TextTo3DPipeline

    if (args.prompt is None) == (args.prompts is None):
        raise ScalegenError("give exactly one of --prompt TEXT or --prompts FILE")
    if args.prompt is not None and not args.prompt.strip():
        raise ScalegenError("--prompt is empty; describe the asset, e.g. --prompt 'a large red cube'")
    prompts = ([" ".join(args.prompt.split())] if args.prompt is not None
               else read_corpus(args.prompts, split=args.split, split_flag="--split"))
    opts = _generate_options(args)
    plan = plan_jobs(prompts, args.out, opts, single=args.prompt is not None, format_given=args.format is not None)
    if args.threads:
        torch.set_num_threads(args.threads)
    t_load = time.perf_counter()
    pipe = TextTo3DPipeline.from_pretrained(args.ckpt)
    cfg, ckpt = pipe.cfg, pipe.source
    t_load = time.perf_counter() - t_load
    pipe.check_world_prompts(prompts, args.ckpt)
    with _locked(args.out, "scalegen generate"):
        plan = plan_jobs(prompts, args.out, opts, single=args.prompt is not None,
                         format_given=args.format is not None)  # again under the lock: another writer may have finished
        res = generate_assets(plan, cfg, pipe.model, pipe.text_encoder, opts, checkpoint=str(ckpt))
    n = len(res["assets"])
    rows = [[stage, s, s / n] for stage, s in res["seconds"].items()] + [["total", res["total_s"], res["seconds_per_asset"]]]
    print(format_table(rows, ["stage", "seconds", "per asset"]))
    where = plan.folder if plan.folder is not None else plan.jobs[0].mesh
    print(f"wrote {n} asset(s) to {where} in {res['total_s']:.2f} s ({res['seconds_per_asset']:.2f} s per asset; "
          f"checkpoint loaded in {t_load:.1f} s, {torch.get_num_threads()} thread(s))")
    return 0


def cmd_demo(args) -> int:
    from scalegen.pipeline import TextTo3DPipeline
    from scalegen.pipeline.demo import launch

    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    pipe = TextTo3DPipeline.from_pretrained(args.ckpt)
    print(f"serving {pipe.source} on http://{args.host}:{args.port} (Ctrl-C stops it)")
    try:
        launch(pipe, host=args.host, port=args.port)
    except OSError as e:
        raise ScalegenError(f"cannot serve on {args.host}:{args.port} ({e.strerror or e}); choose another --port") from None
    return 0


def cmd_export_pretrained(args) -> int:
    import json

    from scalegen.pipeline import TextTo3DPipeline
    from scalegen.train.checkpoint import checkpoint_step

    pipe = TextTo3DPipeline.from_pretrained(args.ckpt)
    results, command = None, None
    if args.eval_json:
        try:
            data = json.loads(Path(args.eval_json).read_text())
        except (OSError, ValueError) as e:
            raise ScalegenError(f"cannot read --eval-json '{args.eval_json}' ({e}); give the file "
                                "`scalegen eval --ckpt RUN --json FILE` wrote") from None
        results, command = data, args.eval_command or f"scalegen eval --ckpt {args.ckpt} --json {args.eval_json}"
    elif not args.no_eval and pipe.world is not None:
        from scalegen.eval.oracle import evaluate_oracle

        print("evaluating the run on the oracle world (as `scalegen eval --ckpt RUN` does; --no-eval skips it)")
        results = evaluate_oracle(pipe.cfg, pipe.model, pipe.text_encoder, pipe.world)
        command = f"scalegen eval --ckpt {args.ckpt}"
    source = Path(pipe.source)
    steps = checkpoint_step(source) if source.name.startswith("step_") else None
    with _locked(args.out, "scalegen export-pretrained"):
        out = pipe.save_pretrained(args.out, eval_results=results, eval_command=command, gallery=not args.no_gallery,
                                   steps=steps, repo_id=args.repo_id)
    print(f"wrote {out}: config.json, model.safetensors, README.md (model card)"
          + ("" if args.no_gallery else ", gallery.png") + f"; load it with TextTo3DPipeline.from_pretrained('{out}')")
    return 0


def cmd_gallery(args) -> int:
    import torch

    from scalegen.atomic import staged_folder
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
    with staged_folder(out, overwrite=args.overwrite) as tmp:  # the old site stays until the new one is whole
        if is_run:
            from scalegen.pipeline import TextTo3DPipeline
            from scalegen.priors import build_ground_truth

            if args.threads:
                torch.set_num_threads(args.threads)
            pipe = TextTo3DPipeline.from_pretrained(source)
            cfg, text_encoder, model, ckpt = pipe.cfg, pipe.text_encoder, pipe.model, pipe.source
            tags: dict[str, str] = {}
            if args.prompts:
                from scalegen.data.prompts import read_corpus

                prompts = read_corpus(args.prompts, split=args.split, split_flag="--split")
                pipe.check_world_prompts(prompts, source)
            elif cfg.data.prompts == "oracle" and (truth := build_ground_truth(cfg)) is not None:
                world = truth.world  # trained on the oracle world's own prompts
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


def _bench_meta(argv: list[str]) -> dict:
    """What produced a bench's JSON: the command line, the date (UTC) and the git commit of the code that ran (with
    whether its tree had uncommitted changes), so every committed figure carries its command (docs/benchmarks.md)."""
    import datetime
    import shlex
    import subprocess

    repo = Path(__file__).resolve().parents[1]

    def git(*a: str) -> str | None:
        try:
            r = subprocess.run(["git", "-C", str(repo), *a], capture_output=True, text=True, timeout=10)
        except (OSError, subprocess.SubprocessError):
            return None
        return r.stdout.strip() if r.returncode == 0 else None

    commit = git("rev-parse", "HEAD")
    status = git("status", "--porcelain", "--untracked-files=no") if commit else None
    return {"argv": list(argv), "command": shlex.join(["scalegen", *argv]),
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "commit": commit, "dirty": bool(status) if status is not None else None}


def cmd_plan(args) -> int:
    from scalegen.bench.plan import format_plan, plan_config
    from scalegen.config import load_config

    cfg = load_config(args.config, args.overrides)
    res = plan_config(cfg, world_size=args.num_processes, zero=args.zero, measure_prompts=args.measure_prompts,
                      cells=not args.no_table, growth=not args.no_growth)
    print(format_plan(res))
    _write_json(args.json, {"meta": _bench_meta(getattr(args, "argv", [])), **res})
    return 0


def cmd_bench(args) -> int:
    from scalegen.bench import run_bench

    meta = _bench_meta(getattr(args, "argv", []))
    res = run_bench(args.name, args.overrides, out_root=args.out)
    _write_json(args.json, {"meta": meta, **res} if isinstance(res, dict) else {"meta": meta, "results": res})
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


def cmd_prior_train_learned(args) -> int:
    from scalegen.train.learned_prior import learned_setup, train_learned

    cfg, opts = learned_setup(args.world, args.overrides or [])
    with _locked(args.out, "scalegen prior train-learned"):
        res = train_learned(cfg, opts, args.out)
    how = {"budget": f" (learned.minutes={opts.minutes:g} spent)", None: ""}.get(res.get("stopped"), "")
    if res["trained"]:
        print(f"trained steps {res['step'] - res['trained'] + 1}-{res['step']} of {opts.steps}{how} in "
              f"{res['wall_s']:.0f} s ({res['cpu_s']:.0f} s CPU), {res['params'] / 1e6:.2f}M parameters, loss "
              f"{res['loss_ema']:.4f}; use prior.name=learned prior.model={args.out}"
              + (" (rerun the same command to continue)" if res["step"] < opts.steps else ""))
    _write_json(args.json, {"meta": _bench_meta(getattr(args, "argv", [])), **res})
    return 0


def cmd_prior_score_learned(args) -> int:
    from scalegen.eval.learned import sample_sheet, score_learned

    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    res = score_learned(args.model, ts=tuple(args.t), n_eps=args.eps_rows, per_prompt=args.per_prompt,
                        steps=args.ddim_steps, cfg_scale=args.cfg, ref_views=args.ref_views, seed=args.seed,
                        exact_samples=not args.no_exact)
    images = res.pop("_images")
    rows = [[r["t"], r["mse_cond"], r["mse_uncond"], r["loss_exact_cond"], r["loss_learned_cond"],
             r["guidance_rms_exact"], r["guidance_rms_learned"], r["guidance_mse"]] for r in res["eps"]]
    print(_table(rows, ["t", "MSE cond", "MSE uncond", "loss exact", "loss learned", "|d| exact", "|d| learned",
                        "MSE d"]))
    rows = [[name, split, r["psnr"], r["iou"], r["r_at_1"], r["n"]] for name, per in res["samples"].items()
            for split, r in per.items()]
    print(_table(rows, ["samples", "split", "PSNR (dB)", "mask IoU", "R@1", "images"]))
    print(f"eps against the exact posterior of its training renders (d = eps_c - eps_u); samples: DDIM "
          f"{args.ddim_steps} steps, CFG {args.cfg:g}, scored against the nearest of {args.ref_views} reference views "
          f"(R@1 chance {res['r_at_1_chance']:.3f}); {res['wall_s']:.0f} s ({res['cpu_s']:.0f} s CPU); model at step "
          f"{res['steps_trained']}")
    if args.sheet:
        for name, imgs in images.items():
            sample_sheet(imgs, args.per_prompt, Path(args.sheet) / f"{name}.png")
        print(f"sample sheets (a row per prompt, seen then unseen) in {args.sheet}/")
    _write_json(args.json, {"meta": _bench_meta(getattr(args, "argv", [])), **res})
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
    overrides = list(args.overrides or [])
    load_config(None, overrides)  # every key checked (a typo gets its did-you-mean), whatever the encoder
    other = [o for o in overrides if not o.startswith("text.")]
    if other:
        raise ScalegenError(f"data build takes only text.* overrides (they configure --encoder); "
                            f"'{other[0]}' would change nothing here")
    if overrides and args.encoder == "none":
        raise ScalegenError(f"'{overrides[0]}' configures a text encoder, but --encoder is none; pass --encoder bow "
                            "or clip, or drop the override")
    encoder = None
    if args.encoder != "none":
        cfg = load_config(None, [f"text.encoder={args.encoder}"] + overrides)
        if args.encoder == "clip":
            from scalegen.text.clip import CLIPTextEncoder

            encoder = CLIPTextEncoder(cfg.text_model(), device=state.device)
        else:
            from scalegen.text import build_text_encoder

            encoder = build_text_encoder(cfg)
    store = args.store or ("none" if encoder is None else "views" if args.encoder == "clip" else "plain")
    t0 = time.perf_counter()

    def build(target):
        res = build_shards(args.corpus, target, encoder, shard_size=args.shard_size, splits=args.split,
                           column=args.column, store=store, compress=args.compress, batch_size=args.batch_size,
                           process_index=state.process_index, num_processes=state.num_processes,
                           log=lambda m: print(m, flush=True), overwrite=args.overwrite, barrier=state.wait_for_everyone)
        state.wait_for_everyone()
        m = write_manifest(args.corpus, target, res["plans"], res["report"], res["encoder"]) if state.is_main_process else None
        return res, m

    with _locked(args.out, "scalegen data build", state):
        out = Path(args.out)
        # A new build is staged and moved into place whole, so a refused one leaves nothing behind. A folder that
        # already holds a build (resumed, or replaced with --overwrite) and builds of several processes (which
        # share the folder) are written in place, after every input has been checked.
        if state.num_processes == 1 and (not out.exists() or not any(out.iterdir())):
            from scalegen.atomic import replace, staged_folder

            with staged_folder(out) as stage:
                try:
                    res, m = build(stage)
                except KeyboardInterrupt:
                    if any(stage.glob("*/shard-*.tar.json")):  # keep the finished shards: the same command resumes
                        if out.is_dir():
                            out.rmdir()
                        replace(stage, out)
                    raise
        else:
            res, m = build(out)
    if state.is_main_process:
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
          + ("; rebuild with the same `scalegen data build` command (it rewrites only damaged shards)" if bad else ""))
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
DESCRIPTION = ("Amortized text-to-3D generators trained by score distillation. Errors you can fix print one line "
               "starting with 'error:' and exit with code 2; `scalegen COMMAND --help` lists a command's options.")


def build_parser() -> argparse.ArgumentParser:
    ap = Parser(prog="scalegen", description=DESCRIPTION)
    ap.add_argument("--verbose", action="store_true",
                    help="also show third-party warnings that do not concern scalegen (e.g. DeepSpeed's accelerator probe)")
    sub = ap.add_subparsers(dest="command", required=True)

    p = sub.add_parser("train", help="train a generator (no arguments: the embedded oracle-world default)")
    p.add_argument("--config", type=existing_file, help="YAML experiment file (configs/...)")
    p.add_argument("--out", type=out_dir, help="run directory (default: train.out_dir)")
    p.add_argument("--resume", nargs="?", const="yes", choices=["yes", "auto"],
                   help="continue the run in --out from its last checkpoint; `--resume auto`: continue it if it "
                        "exists, else start it (requeued jobs)")
    p.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
    p.add_argument("overrides", nargs="*", help="key=value overrides, e.g. train.max_steps=100")
    p.set_defaults(fn=cmd_train)

    p = sub.add_parser("eval", help="oracle-world metrics of a run (PSNR, mask IoU, colour error, R@1); "
                                    "`eval clip`: CLIP scores on a prompt corpus")
    p.add_argument("--ckpt", type=model_ref, help="run directory, checkpoint folder, exported folder or cached Hub id")
    p.add_argument("--json", type=out_file, help="also write the figures to this JSON file")
    p.add_argument("--baseline", action="store_true", help="also evaluate the untrained generator")
    p.add_argument("--max-prompts", type=positive_int, default=None, help="per split (default: eval.max_prompts)")
    p.set_defaults(fn=cmd_eval)
    eval_sub = p.add_subparsers(dest="eval_command")
    q = eval_sub.add_parser("clip", help="CLIP similarity, CLIPScore and R@1 of a run (or of rendered views) on a corpus")
    q.add_argument("--ckpt", type=existing_dir, help="run directory or checkpoint folder to render")
    q.add_argument("--images", type=existing_dir, help="score views rendered elsewhere: DIR/<prompt>/<view>.png "
                                                      "(docs/evaluation.md)")
    q.add_argument("--corpus", required=True, type=existing_path, help="prompt file (ScaleDreamer JSON, text, CSV, JSON lines) or shard folder")
    q.add_argument("--split", nargs="+", help="corpus splits to score (default: the protocol's; test falls back to val)")
    q.add_argument("--protocol", default="scalegen", choices=_NamesOf("scalegen.eval.clip", "PROTOCOLS"),
                   metavar="NAME", help="%(choices)s (default %(default)s)")
    q.add_argument("--model", help="CLIP: transformers folder or hub id, open_clip NAME:PRETRAINED or folder")
    q.add_argument("--views", type=int_range(1, 360), help="views per prompt (protocol default)")
    q.add_argument("--resolution", type=image_int, help="rendered pixels per side (protocol default)")
    q.add_argument("--elevation", type=float_range(-90, 90), help="degrees (protocol default 15)")
    q.add_argument("--distance", type=positive_float, help="camera distance (default: the run's camera.eval_distance; "
                   "triplaneturbo: 3)")
    q.add_argument("--fovy", type=float_range(0, 180, lo_open=True, hi_open=True),
                   help="degrees (default: the run's camera.eval_fovy; triplaneturbo: 50)")
    q.add_argument("--view-source", choices=["field", "mesh"],
                   help="--ckpt views: the run's renders (field) or its exported mesh unlit on white (mesh; "
                        "triplaneturbo's default)")
    q.add_argument("--crop", choices=["left", "center"], help="left square (ScaleDreamer) or center crop")
    q.add_argument("--resize", choices=["bilinear", "bicubic"], help="resampling to CLIP's input size")
    q.add_argument("--prefix", help="caption prefix (triplaneturbo: 'A photo depicts')")
    q.add_argument("--clipscore-w", type=positive_float, help="CLIPScore weight w (2.5)")
    q.add_argument("--distractors", type=positive_int, help="k of the distractor R@1 (99)")
    q.add_argument("--seed", type=seed_int, help="distractor draw (0)")
    q.add_argument("--json", type=out_file, help="also write the summary to this JSON file")
    q.add_argument("--out", type=out_dir, help="results folder (default: RUN/eval-clip/PROTOCOL-CORPUS); rerun to resume")
    q.add_argument("--cache", type=out_dir, help="text-feature cache (default: $SCALEGEN_CACHE or ~/.cache/scalegen/clip-text)")
    q.add_argument("--batch", type=positive_int, default=64, help="images per CLIP forward (default 64)")
    q.add_argument("--contact", type=nonneg_int, default=16, help="prompts on the contact sheet (default 16)")
    q.add_argument("--glob", default="*", help="with --images: which files of a prompt folder are views")
    q.add_argument("--save-views", action="store_true", help="also write every view as OUT/views/<prompt>/<i>.png")
    q.add_argument("--overwrite", action="store_true", help="discard results of another evaluation in --out")
    q.add_argument("--cpu", action="store_true", help="run on the CPU even when a GPU is present")
    q.add_argument("--no-progress", action="store_true", help="no progress bar")
    q.set_defaults(fn=cmd_eval_clip)
    q = eval_sub.add_parser("make-tiny-clip", help="write a tiny random CLIP (tests and smoke runs)")
    q.add_argument("--out", required=True, type=out_dir, help="new folder")
    q.add_argument("--backend", default="transformers", choices=["transformers", "open_clip"])
    q.add_argument("--seed", type=seed_int, default=0)
    q.set_defaults(fn=cmd_eval_make_tiny_clip)
    q = eval_sub.add_parser("train-clip", help="train a small CLIP on an oracle world's ground-truth renders and "
                            "prompts (a transformers CLIP folder for --model)")
    q.add_argument("--world", type=existing_file, help="YAML config whose world/camera keys set the world "
                                                       "(default: the embedded default world)")
    q.add_argument("--out", required=True, type=out_dir, help="new folder for the CLIP")
    q.add_argument("--json", type=out_file, help="also write the summary to this JSON file")
    q.add_argument("overrides", nargs="*", help="clip.* options (clip.steps, clip.minutes, clip.size, ...) and "
                                                "config overrides (world.*, camera.*)")
    q.set_defaults(fn=cmd_eval_train_clip)

    p = sub.add_parser("generate", help="prompts -> meshes (GLB/OBJ/PLY), optionally textured, with turntables")
    p.add_argument("--ckpt", required=True, type=model_ref, help="run directory, checkpoint folder, exported folder "
                                                                 "(scalegen export-pretrained) or cached Hub id")
    p.add_argument("--prompt", help="one prompt")
    p.add_argument("--prompts", type=existing_file, help="a corpus file (.txt/.json/.jsonl/.csv): one asset per prompt")
    p.add_argument("--split", default="test", help="split of a JSON corpus (default: test)")
    p.add_argument("--out", required=True, type=out_path, help="output file (.glb/.obj/.ply) for --prompt, or a folder")
    p.add_argument("--format", help="glb | obj | ply (default glb; a file name's suffix decides for --prompt)")
    p.add_argument("--resolution", type=grid_int, default=128, help="marching-cubes cells per axis (default 128)")
    p.add_argument("--level", type=finite_float, default=None,
                   help="SDF level of the surface (default 1.5 * render.beta, which matches the volume renders)")
    p.add_argument("--simplify", type=int_range(4), default=None, metavar="FACES",
                   help="simplify to at most FACES faces (default: off; 10000 with --texture)")
    p.add_argument("--texture", action="store_true", help="UV atlas (xatlas) + baked base-colour texture, GLB only")
    p.add_argument("--texture-size", type=int_range(16, 8192), default=1024, help="texture width and height (default 1024)")
    p.add_argument("--turntable", action="store_true", help="also write an orbit video (MP4, or GIF without ffmpeg)")
    p.add_argument("--frames", type=int_range(1, 3600), default=24, help="turntable frames (default 24: one turn a second)")
    p.add_argument("--turntable-size", type=int_range(16, 4096), default=128,
                   help="turntable width and height, a multiple of 16 (default 128)")
    p.add_argument("--batch", type=positive_int, default=16, help="prompts per generator call (default 16)")
    p.add_argument("--threads", type=nonneg_int, default=0, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--overwrite", action="store_true", help="replace existing files")
    p.add_argument("--keep-fragments", action="store_true",
                   help="keep pieces smaller than 2%% of the largest (floaters are dropped by default)")
    p.set_defaults(fn=cmd_generate)

    p = sub.add_parser("demo", help="an interactive page (Gradio): prompt -> GLB viewer and download "
                       '(pip install "scalegen[demo]")')
    p.add_argument("--ckpt", required=True, type=model_ref, help="run directory, exported folder or cached Hub id")
    p.add_argument("--host", default="127.0.0.1", help="address to serve on (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=int_range(1, 65535), default=7860, help="port (default 7860)")
    p.add_argument("--threads", type=nonneg_int, default=0, help="torch CPU threads (default: torch's choice)")
    p.set_defaults(fn=cmd_demo)

    p = sub.add_parser("export-pretrained", help="a run as one folder in the Hugging Face layout (config.json, "
                       "model.safetensors, model card) for TextTo3DPipeline.from_pretrained or the Hub")
    p.add_argument("--ckpt", required=True, type=existing_dir, help="run directory or checkpoint folder")
    p.add_argument("--out", required=True, type=out_dir, help="new folder to write")
    p.add_argument("--eval-json", type=existing_file, help="the card's evaluation numbers: the file `scalegen eval --ckpt RUN --json F` "
                                       "wrote (default for an oracle run: evaluate it now)")
    p.add_argument("--eval-command", help="the command that produced --eval-json (for the card)")
    p.add_argument("--no-eval", action="store_true", help="no evaluation numbers in the card")
    p.add_argument("--no-gallery", action="store_true", help="no sample renders (gallery.png)")
    p.add_argument("--repo-id", help="the Hub id the card's loading example names (default: a folder path)")
    p.set_defaults(fn=cmd_export_pretrained)

    p = sub.add_parser("refine", help="per-prompt refinement: one prompt's 3D Gaussians or iNGP, from a sphere, an "
                                      "asset file or an amortized run's output")
    p.add_argument("--prompt", help="the prompt to refine")
    p.add_argument("--representation", choices=PER_PROMPT, help=f"default: {PER_PROMPT[0]}")
    p.add_argument("--distill", choices=DISTILLERS,
                   help="distiller (default: the base config's: the run's, or sds)")
    p.add_argument("--init-from", help="'sphere' (default), a run directory of `scalegen train` (its output for the "
                                       "prompt), or a PLY / OBJ / GLB file (3DGS PLY, point cloud or mesh)")
    p.add_argument("--up", choices=["y", "z"], default="y",
                   help="up axis of a mesh / point-cloud start file (default y, glTF's; a 3DGS PLY is read as is)")
    p.add_argument("--fit", action="store_true", help="centre and scale a start file to the start sphere")
    p.add_argument("--config", type=existing_file, help="YAML file applied over the preset")
    p.add_argument("--out", required=True, type=out_dir, help="output folder (checkpoints, gaussians.ply, mesh.glb, refine.json)")
    p.add_argument("--resume", nargs="?", const="yes", choices=["yes"], help="continue the refinement in --out")
    p.add_argument("--mesh-resolution", type=grid_int, default=128, help="marching-cubes grid of mesh.glb (default 128)")
    p.add_argument("--json", type=out_file, help="also write the report to this JSON file")
    p.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
    p.add_argument("overrides", nargs="*", help="key=value overrides, e.g. train.max_steps=200")
    p.set_defaults(fn=cmd_refine)

    p = sub.add_parser("gallery", help="a static page of a run's or an asset folder's assets (no network needed)")
    p.add_argument("source", type=existing_dir, help="run directory (assets are generated) or a folder from `generate --prompts`")
    p.add_argument("--out", required=True, type=out_dir, help="site folder to write (index.html, viewer/, assets/)")
    p.add_argument("--prompts", type=existing_file, help="with a run: a corpus file (default: an oracle run's unseen + seen prompts)")
    p.add_argument("--split", default="test", help="split of a JSON corpus (default: test)")
    p.add_argument("--max-prompts", type=nonneg_int, default=24, help="with a run: at most this many (default 24, 0 = all)")
    p.add_argument("--resolution", type=grid_int, default=128, help="with a run: marching-cubes cells per axis")
    p.add_argument("--texture", action="store_true", help="with a run: baked textures instead of vertex colours")
    p.add_argument("--frames", type=int_range(1, 3600), default=24, help="with a run: turntable frames (default 24)")
    p.add_argument("--turntable-size", type=int_range(16, 4096), default=128, help="with a run: turntable size (default 128)")
    p.add_argument("--batch", type=positive_int, default=16, help="with a run: prompts per generator call")
    p.add_argument("--threads", type=nonneg_int, default=0, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--viewer", type=existing_file, help="model-viewer-umd.min.js to vendor (default: node_modules, else npm install)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing site folder")
    p.set_defaults(fn=cmd_gallery)

    p = sub.add_parser("info", help="parameter counts and effective batch of a config")
    p.add_argument("--config", type=existing_file, help="YAML experiment file")
    p.add_argument("--json", type=out_file, help="also write the figures to this JSON file")
    p.add_argument("overrides", nargs="*")
    p.set_defaults(fn=cmd_info)

    p = sub.add_parser("plan", help="memory per GPU before launch: weights, optimizer state, activations counted "
                                     "on a real CPU step; fits 24 / 40 / 80 GB?")
    p.add_argument("--config", type=existing_file, help="YAML experiment file")
    p.add_argument("--num-processes", type=positive_int, default=1, help="ranks (GPUs) the run is launched on")
    p.add_argument("--zero", type=int, choices=(0, 2), default=0,
                   help="2: DeepSpeed ZeRO-2 (launch/deepspeed_zero2.yaml) partitions gradients and optimizer state")
    p.add_argument("--measure-prompts", type=positive_int, default=None,
                   help="prompts of the measured CPU micro-batch (default: data.prompts_per_step); fewer are "
                        "extrapolated along the growth measured at 2 and 3 prompts")
    p.add_argument("--no-table", action="store_true", help="plan the config as it is, without the fp32/bf16 x "
                                                           "checkpointing table (four fewer measured steps)")
    p.add_argument("--no-growth", action="store_true", help="skip the steps at 2 and 3 prompts (less time and "
                                                            "memory; the largest batch scales in proportion)")
    p.add_argument("--json", type=out_file, help="also write the plan to this JSON file")
    p.add_argument("overrides", nargs="*")
    p.set_defaults(fn=cmd_plan)

    p = sub.add_parser("prior", help="prior tools: make-tiny (a tiny random Stable Diffusion), convert-mvdream, "
                                      "make-tiny-mvdream, train-learned and score-learned (the learned world)")
    prior_sub = p.add_subparsers(dest="prior_command", required=True)
    q = prior_sub.add_parser("make-tiny", help="write a tiny random SD (unet, vae, scheduler, CLIP) in diffusers layout")
    q.add_argument("--out", required=True, type=out_dir, help="new folder")
    q.add_argument("--seed", type=seed_int, default=0)
    q.set_defaults(fn=cmd_prior_make_tiny)
    q = prior_sub.add_parser("make-tiny-mvdream",
                             help="write a tiny random MVDream checkpoint in the official layout (tests, smoke runs)")
    q.add_argument("--out", required=True, type=out_file, help="new .safetensors file")
    q.add_argument("--seed", type=seed_int, default=0)
    q.add_argument("--context-dim", type=int_range(1, 4096), default=32, help="text width (32 = the tiny SD's CLIP)")
    q.set_defaults(fn=cmd_prior_make_tiny_mvdream)
    q = prior_sub.add_parser("train-learned", help="train a small pixel-space diffusion UNet on an oracle world's "
                             "ground-truth renders (prior.name=learned prior.model=OUT); rerun to continue")
    q.add_argument("--world", type=existing_file, help="YAML config whose world/camera/render/text keys set the world "
                                                       "(default: the embedded default world)")
    q.add_argument("--out", required=True, type=out_dir, help="the prior's folder (checkpoints, bank, unet/, ...)")
    q.add_argument("--json", type=out_file, help="also write the run's summary to this JSON file")
    q.add_argument("overrides", nargs="*", help="learned.* options (learned.steps, learned.minutes, learned.size, ...) "
                                                "and config overrides (world.*, camera.*)")
    q.set_defaults(fn=cmd_prior_train_learned)
    q = prior_sub.add_parser("score-learned", help="a learned prior against the exact one: eps error per t and DDIM "
                             "samples scored against the ground truth (PSNR, mask IoU, R@1)")
    q.add_argument("--model", required=True, type=existing_dir, help="a `scalegen prior train-learned` folder")
    q.add_argument("--json", type=out_file, help="also write the figures to this JSON file")
    q.add_argument("--sheet", type=out_dir, help="folder for PNG sheets of the samples (learned, exact, ground truth)")
    q.add_argument("--t", type=int_range(0, 999), nargs="+", default=[50, 200, 500, 800, 950],
                   help="timesteps of the eps error (default 50 200 500 800 950)")
    q.add_argument("--eps-rows", type=positive_int, default=128, help="noisy images per t (default 128)")
    q.add_argument("--per-prompt", type=positive_int, default=4, help="samples per prompt (default 4)")
    q.add_argument("--ddim-steps", type=int_range(1, 1000), default=50, help="DDIM steps (default 50)")
    q.add_argument("--cfg", type=float_range(0.0), default=7.5, help="classifier-free guidance scale (default 7.5)")
    q.add_argument("--ref-views", type=positive_int, default=64, help="reference renders per prompt (default 64)")
    q.add_argument("--seed", type=seed_int, default=0)
    q.add_argument("--no-exact", action="store_true", help="skip the exact mixture's samples")
    q.add_argument("--threads", type=nonneg_int, default=0, help="torch CPU threads (default: torch's choice)")
    q.set_defaults(fn=cmd_prior_score_learned)
    q = prior_sub.add_parser("convert-mvdream", help="convert the official MVDream checkpoint (sd-v2.1-base-4view.pt) "
                             "to the folder prior.name=mvdream loads")
    q.add_argument("ckpt", type=existing_file, help="the official checkpoint (.pt/.ckpt, read without running pickled code, or .safetensors)")
    q.add_argument("out", type=out_dir, help="new folder: unet/, vae/, scheduler/ (+ tokenizer/, text_encoder/ with --text-from)")
    q.add_argument("--text-from", help="Stable Diffusion 2.1(-base) folder or cached hub id whose tokenizer/ and "
                                       "text_encoder/ (OpenCLIP ViT-H) are copied in")
    q.add_argument("--head-channels", type=positive_int, default=None,
                   help="channels per attention head (default: the checkpoint's metadata, else the official 64)")
    q.add_argument("--half", action="store_true", help="store the weights in fp16 (half the disk)")
    q.set_defaults(fn=cmd_prior_convert_mvdream)

    p = sub.add_parser("data", help="corpus tools: build (webdataset shards), check (verify them), compose (a corpus)")
    data_sub = p.add_subparsers(dest="data_command", required=True)
    q = data_sub.add_parser("build", help="write a corpus as webdataset shards, optionally with text embeddings")
    q.add_argument("--corpus", required=True, type=existing_file, help="ScaleDreamer JSON, JSON lines, text (a prompt per line) or CSV")
    q.add_argument("--out", required=True, type=out_dir, help="output folder (rerun the same command to resume a build)")
    q.add_argument("--encoder", default="none", choices=["none", "bow", "clip"],
                   help="text encoder whose embeddings to store (text.* overrides configure it)")
    q.add_argument("--store", choices=["none", "pooled", "plain", "views"],
                   help="embeddings to store: pooled only, plain prompt, or prompt + 4 view variants "
                        "(default: views for clip, plain for bow)")
    q.add_argument("--compress", default="none", choices=["none", "zlib"], help="compress stored embeddings")
    q.add_argument("--shard-size", type=positive_int, default=1000, help="prompts per shard (default 1000)")
    q.add_argument("--split", nargs="+", help="splits to write (default: all splits of the corpus)")
    q.add_argument("--column", default="prompt", help="CSV column / JSON-lines key holding the prompt")
    q.add_argument("--batch-size", type=positive_int, default=256, help="prompts per encoder call")
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
    q.add_argument("--out", required=True, type=out_file, help="output JSON ({train, val, test}; val = test = unseen)")
    q.add_argument("--world", choices=["att3d", "oracle"], default="att3d",
                   help="att3d: subject x activity x attire prompts (real priors); oracle: the oracle world's "
                        "compositional grammar (world.* of --config and overrides), with ground truth")
    q.add_argument("--config", type=existing_file, help="--world oracle: YAML whose world.* keys set the vocabulary "
                                    "(e.g. configs/oracle/world_compose.yaml)")
    q.add_argument("--n", type=int_range(1, 10_000_000), default=100_000, help="training prompts (default 100000)")
    q.add_argument("--unseen-pairs", type=positive_int, default=20, help="att3d: subject-activity pairs held out (default 20)")
    q.add_argument("--n-val", type=int_range(1, 10_000_000), default=2000,
                   help="unseen prompts written to val/test (default 2000; oracle: per held-out level)")
    q.add_argument("--seed", type=seed_int, default=0, help="which prompts are drawn (the held-out combinations are "
                                                       "world.seed's)")
    q.add_argument("overrides", nargs="*", help="--world oracle: world.* overrides, e.g. world.colors=[red,blue]")
    q.set_defaults(fn=cmd_data_compose)

    p = sub.add_parser("bench", help="benchmarks (figures for docs/results/, see docs/benchmarks.md)")
    p.add_argument("name", choices=BENCH_NAMES, metavar="NAME", help=" | ".join(BENCH_NAMES))
    p.add_argument("--json", type=out_file, help="also write the figures to this JSON file")
    p.add_argument("--out", type=out_dir, default="runs/bench", help="folder for the benchmark's runs")
    p.add_argument("overrides", nargs="*", help="key=value overrides applied to every run")
    p.set_defaults(fn=cmd_bench)
    return ap


class _DropProbeWarnings:
    """A logging filter for DeepSpeed's accelerator probe ("Setting accelerator to CPU ... we were unable to
    detect it"): on a CPU machine it is expected, and it says nothing the user can act on."""

    def filter(self, record) -> bool:
        return not (record.filename == "real_accelerator.py" and record.levelno <= 30)


def quiet_third_party(verbose: bool) -> None:
    """Silence third-party warnings that do not concern the user, unless ``--verbose``. The filter sits on
    DeepSpeed's logger before DeepSpeed is imported (its own setup resets the level, not the filters)."""
    import logging

    ds = logging.getLogger("DeepSpeed")
    for f in [f for f in ds.filters if isinstance(f, _DropProbeWarnings)]:
        ds.removeFilter(f)
    if not verbose:
        ds.addFilter(_DropProbeWarnings())


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    entry = argv is None  # run as the `scalegen` command (not called in-process)
    argv = list(sys.argv[1:] if argv is None else argv)
    given = list(argv)  # as typed, for the record a bench writes into its JSON
    # --verbose is global but may be written anywhere (`scalegen info --verbose`).
    verbose = "--verbose" in argv
    argv = [a for a in argv if a != "--verbose"]
    quiet_third_party(verbose)
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
    args.argv = given
    try:
        return args.fn(args)
    except (Preempted, Interrupted) as e:
        if isinstance(e, Interrupted) and args.fn not in (cmd_train, cmd_refine):
            print(f"interrupted: {_interrupt_advice(args)}", file=sys.stderr)  # e.g. a benchmark's training: rerun it
        else:
            print(f"stopped: {e}", file=sys.stderr)
        return e.exit_code
    except ScalegenError as e:
        print("error: " + " ".join(str(e).split("\n")), file=sys.stderr)  # one line, whatever a file name holds
        return 2
    except KeyboardInterrupt:
        _quiet_exit(entry)
        try:
            advice = _interrupt_advice(args)
        except Exception:  # noqa: BLE001 - the advice must never turn an interrupt into a traceback
            advice = "nothing more is known about what was kept"
        print(f"interrupted: {advice}", file=sys.stderr, flush=True)
        return 130


def _quiet_exit(entry: bool) -> None:
    """After Ctrl-C, make further Ctrl-Cs and a closed stdout (``| head``) end the process quietly: no
    'Exception ignored ... write to closed file' from the interpreter's final flush. ``entry``: main()
    is the process's entry point (not called in-process by a test or a script), which is about to exit."""
    import signal

    if entry:
        signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        sys.stdout.flush()
    except (OSError, ValueError):
        pass
    # A stdout that cannot be flushed at exit prints a traceback-like line; give Python a stream it can flush.
    if sys.stdout is not None and getattr(sys.stdout, "closed", False):
        sys.stdout = open(os.devnull, "w")


def _interrupt_advice(args) -> str:
    """What of an interrupted command's work is kept and how to go on (the first Ctrl-C of training is
    handled inside the loop, which writes a checkpoint; this is every other command, and a second Ctrl-C)."""
    fn = getattr(args, "fn", None)
    if fn in (cmd_train, cmd_refine):
        from scalegen.train.checkpoint import checkpoint_step, latest_checkpoint

        out = args.out
        cmd = "train" if fn is cmd_train else "refine"
        if not out or not Path(out).is_dir():
            return f"no run folder was written; start again with the same scalegen {cmd} command"
        ckpt = latest_checkpoint(out)
        if ckpt is None:
            return (f"'{out}' has no checkpoint yet, so nothing can be resumed; remove it and start again with the "
                    f"same scalegen {cmd} command")
        return (f"stopped at once (the steps after the last checkpoint are lost); continue with `scalegen {cmd} --out "
                f"{out} --resume` (resumes at step {checkpoint_step(ckpt)})")
    if fn is cmd_data_build:
        out = Path(args.out)
        shards = [p for p in out.glob("*/shard-*.tar")] if out.is_dir() else []
        if not shards:
            return f"no shard was finished in '{out}'; rerun the same scalegen data build command"
        return (f"{len(shards)} finished shard(s) in '{out}' are kept; rerun the same scalegen data build command to "
                "build the rest (finished shards are checked and skipped)")
    if fn is cmd_eval_clip:
        out = Path(args.out) if args.out else None
        if out is None or not out.is_dir():
            return "nothing was scored yet; rerun the same scalegen eval clip command"
        return (f"the prompts scored so far are kept in '{out}' (progress/); rerun the same scalegen eval clip "
                "command to score the rest")
    if fn is cmd_generate:
        return (f"no asset was written to '{args.out}' (assets are moved into place only when all are generated); "
                "rerun the same scalegen generate command")
    if fn is cmd_bench:
        return (f"no figures were written{' to ' + args.json if args.json else ''}; the benchmark's runs so far stay "
                f"in '{args.out}'; rerun the same scalegen bench command")
    return "nothing was finished; rerun the same command"


if __name__ == "__main__":
    sys.exit(main())
