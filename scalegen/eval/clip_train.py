"""`scalegen eval train-clip`: a small CLIP trained on an oracle world, so `eval clip` numbers mean something.

Every CLIP figure of the repository otherwise comes from a randomly initialised CLIP (no weights can be
downloaded here). This one is trained contrastively (CLIP's symmetric InfoNCE with a learned temperature,
Radford et al. 2021) on the world's ground-truth renders and prompts: a bank of ``views_per_prompt`` renders
of each *training* prompt at cameras of the training distribution, drawn once from the seed; each step takes
``batch`` distinct prompts and one random view of each (distinct prompts, so no two rows of a batch are the
same caption). Images go through exactly the preprocessing `eval clip` applies (``clip.clip_pixels``: the
scalegen protocol's centre crop and bicubic resize to the model's input size, uint8 rounding, OpenAI's mean
and std); captions through CLIP's real BPE tokenizer.

It is saved as a transformers ``CLIPModel`` folder (config.json, model.safetensors, tokenizer, preprocessor
config), which ``clip_models.load_clip`` reads like a downloaded CLIP (``--model DIR``), and it is written
whole at the end (``atomic.staged_folder``): a run stopped early leaves nothing. ``clip_train.json`` in the
folder records the world, the options and the model's R@1 on ground truth (``truth_r_at_1``): each
ground-truth view of the scalegen protocol's orbit (8 views at elevation 15, the world's evaluation distance
and fov) retrieves its prompt among all the world's prompts (seen and unseen); chance is 1/#prompts.
"""
from __future__ import annotations

import dataclasses
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Annotated, Callable, Literal

import torch

from scalegen import atomic
from scalegen.config import AtLeast1, NonNeg, Positive, Range, load_config, parse_options
from scalegen.data.cameras import Cameras, make_cameras, sample_train_cameras
from scalegen.errors import ConfigError, ScalegenError
from scalegen.eval.clip import PROTOCOLS, azimuth_degrees, clip_pixels
from scalegen.eval.clip_models import OPENAI_MEAN, OPENAI_STD
from scalegen.eval.retrieval import r_at_1
from scalegen.priors import build_ground_truth

INFO_FILE = "clip_train.json"
# (width, layers, heads, patch) of both towers
CLIP_SIZES = {"small": (128, 4, 4, 4), "tiny": (32, 1, 2, 8)}


@dataclass
class ClipTraining:
    """``clip.*`` options of `scalegen eval train-clip` (key=value overrides)."""

    size: Literal["small", "tiny"] = "small"  # the towers (CLIP_SIZES); tiny for tests
    steps: Annotated[int, AtLeast1] = 3000  # optimizer steps
    minutes: Annotated[float, NonNeg] = 20.0  # wall-clock budget of the training loop; 0 = none
    batch: Annotated[int, AtLeast1] = 32  # distinct prompts per step (at most the training prompts)
    lr: Annotated[float, Positive] = 5e-4  # AdamW learning rate after the warm-up
    warmup: Annotated[int, NonNeg] = 100  # steps of linear warm-up
    weight_decay: Annotated[float, NonNeg] = 0.1
    views_per_prompt: Annotated[int, AtLeast1] = 32  # bank renders per training prompt
    render_resolution: Annotated[int, Range(ge=8)] = 64  # bank render size (resized to image_size like eval clip)
    image_size: Annotated[int, Range(ge=8)] = 32  # the vision tower's input
    embed_dim: Annotated[int, AtLeast1] = 64  # the shared embedding width
    seed: Annotated[int, Range(ge=0)] = 0
    threads: Annotated[int, NonNeg] = 0  # torch CPU threads (0: torch's choice)
    progress: bool = True  # tqdm bar


def clip_setup(world_config: str | None, overrides: list[str]):
    """(the world's Config, ClipTraining) of a `train-clip` command line."""
    mine = [o for o in overrides if o.split("=", 1)[0].startswith("clip.")]
    rest = [o for o in overrides if o not in mine]
    opts = parse_options(ClipTraining, mine, "clip", "`scalegen eval train-clip` options")
    cfg = load_config(world_config, rest)
    if cfg.world.kind != "single":
        raise ConfigError("scalegen eval train-clip trains on the default (world.kind=single) world's prompts")
    return cfg, opts


def build_clip(opts: ClipTraining, folder: Path):
    """A randomly initialised transformers CLIP of ``opts.size`` with CLIP's real tokenizer, written into
    ``folder`` (tokenizer + preprocessor files); returns (model, tokenizer)."""
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel  # noqa: PLC0415

    from scalegen.text.clip import save_clip_tokenizer  # noqa: PLC0415

    width, layers, heads, patch = CLIP_SIZES[opts.size]
    tok, vocab = save_clip_tokenizer(folder, pad_token="<|endoftext|>")
    CLIPImageProcessor(size={"shortest_edge": opts.image_size},
                       crop_size={"height": opts.image_size, "width": opts.image_size},
                       image_mean=list(OPENAI_MEAN), image_std=list(OPENAI_STD)).save_pretrained(folder)
    torch.manual_seed(opts.seed)
    cfg = CLIPConfig(
        text_config=dict(vocab_size=len(vocab), hidden_size=width, intermediate_size=4 * width,
                         num_hidden_layers=layers, num_attention_heads=heads, max_position_embeddings=77,
                         bos_token_id=vocab["<|startoftext|>"], eos_token_id=vocab["<|endoftext|>"],
                         pad_token_id=vocab["<|endoftext|>"], hidden_act="quick_gelu"),
        vision_config=dict(hidden_size=width, intermediate_size=4 * width, num_hidden_layers=layers,
                           num_attention_heads=heads, image_size=opts.image_size, patch_size=patch,
                           hidden_act="quick_gelu"),
        projection_dim=opts.embed_dim)
    return CLIPModel(cfg), tok


@torch.no_grad()
def render_views(truth, prompts: list[str], cams: Cameras, seed: int = 0) -> torch.Tensor:
    """uint8 [P, V, 3, H, W] ground truth of ``prompts`` at cameras [P, V] (or shared [1, V]), each view one
    of the prompt's components drawn uniformly (seeded; ``GroundTruth.draw_mixture``)."""
    ids = [truth.world.index(p) for p in prompts]
    rgb, _, _ = truth.draw_mixture(ids, cams, torch.Generator().manual_seed(seed))
    return (rgb.clamp(0, 1) * 255).round().byte()


def protocol_truth(cfg, truth, prompts: list[str], resolution: int = 64) -> torch.Tensor:
    """Ground truth of ``prompts`` on the scalegen protocol's orbit (as `eval clip --ckpt` renders a run):
    uint8 [P, V, 3, R, R]."""
    p = PROTOCOLS["scalegen"]
    full = lambda x: torch.full((1, p.views), float(x))  # noqa: E731
    cams = make_cameras(full(p.elevation), torch.tensor([azimuth_degrees(p)]), full(cfg.camera.eval_distance),
                        full(cfg.camera.eval_fovy), resolution, resolution)
    return render_views(truth, prompts, cams)


@torch.no_grad()
def truth_r_at_1(clip, views: torch.Tensor, prompts: list[str], splits: dict[str, list[str]]) -> dict:
    """Per split: mean R@1 of every view of ``views`` [P, V, 3, R, R] (uint8) retrieving its prompt among all
    ``prompts`` with ``clip`` (a clip_models.ClipModel), preprocessed as the scalegen protocol does."""
    p = PROTOCOLS["scalegen"]
    text = clip.encode_text(prompts)
    n, v = views.shape[:2]
    pix = clip_pixels(views.flatten(0, 1).to(clip.device), clip.image_size, p.crop, p.resize, clip.mean, clip.std)
    img = torch.cat([clip.encode_images(pix[i:i + 256]) for i in range(0, len(pix), 256)])
    hits = r_at_1(img @ text.T, torch.arange(n).repeat_interleave(v).to(img.device)).view(n, v).mean(1)
    index = {q: i for i, q in enumerate(prompts)}
    out = {name: float(hits[[index[q] for q in qs]].mean()) for name, qs in splits.items() if qs}
    out["chance"] = 1.0 / n
    return out


def train_clip(cfg, opts: ClipTraining, out: str | Path, log: Callable = print) -> dict:
    """Train the CLIP and write it to ``out`` (a new folder); returns the summary also saved as clip_train.json."""
    from scalegen.eval.clip_models import load_clip  # noqa: PLC0415

    out = Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ScalegenError(f"'{out}' exists and is not empty; give a new folder for the trained CLIP")
    if opts.threads:
        torch.set_num_threads(opts.threads)
    truth = build_ground_truth(cfg)
    world = truth.world
    seen, unseen = world.splits()["seen"], world.splits().get("unseen", [])
    prompts = seen + unseen
    batch = min(opts.batch, len(seen))
    gen = torch.Generator().manual_seed(opts.seed)
    cam_cfg = dataclasses.replace(cfg.camera, views_per_prompt=opts.views_per_prompt, share_across_prompts=False,
                                  resolution=opts.render_resolution, resolution_milestones=[])
    t_render = time.perf_counter()
    bank = render_views(truth, seen, sample_train_cameras(cam_cfg, len(seen), gen), opts.seed)  # [P, V, 3, R, R] uint8
    log(f"rendered {len(seen)} prompts x {opts.views_per_prompt} views at {opts.render_resolution} px in "
        f"{time.perf_counter() - t_render:.0f} s")
    p = PROTOCOLS["scalegen"]
    t0, c0 = time.perf_counter(), time.process_time()
    with atomic.staged_folder(out) as stage:
        model, tok = build_clip(opts, stage)
        pix = clip_pixels(bank.flatten(0, 1), opts.image_size, p.crop, p.resize, OPENAI_MEAN, OPENAI_STD)
        pix = pix.view(len(seen), opts.views_per_prompt, *pix.shape[1:])
        ids = tok(seen, padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids
        optim = torch.optim.AdamW(model.parameters(), lr=opts.lr, weight_decay=opts.weight_decay)
        bar = None
        if opts.progress:
            from tqdm.auto import tqdm  # noqa: PLC0415

            bar = tqdm(total=opts.steps, desc="train-clip", dynamic_ncols=True, unit="step")
        model.train()
        step, ema, stopped = 0, float("nan"), None
        labels = torch.arange(batch)
        while step < opts.steps:
            rows = torch.randperm(len(seen), generator=gen)[:batch]
            views = torch.randint(opts.views_per_prompt, (batch,), generator=gen)
            for g in optim.param_groups:
                g["lr"] = opts.lr * min(1.0, (step + 1) / max(1, opts.warmup))
            # the towers as clip_models.TransformersClip reads them: projections of the pooled outputs
            img = model.visual_projection(model.vision_model(pixel_values=pix[rows, views]).pooler_output)
            txt = model.text_projection(model.text_model(input_ids=ids[rows]).pooler_output)
            img, txt = torch.nn.functional.normalize(img, dim=-1), torch.nn.functional.normalize(txt, dim=-1)
            logits = model.logit_scale.exp().clamp(max=100.0) * img @ txt.T
            loss = 0.5 * (torch.nn.functional.cross_entropy(logits, labels)
                          + torch.nn.functional.cross_entropy(logits.T, labels))
            optim.zero_grad(set_to_none=True)
            loss.backward()
            optim.step()
            step += 1
            lv = loss.item()
            ema = lv if ema != ema else 0.98 * ema + 0.02 * lv
            if bar is not None:
                bar.update(1)
                bar.set_postfix(loss=f"{ema:.3f}", refresh=False)
            if opts.minutes > 0 and time.perf_counter() - t0 > 60.0 * opts.minutes:
                stopped = "budget"
                break
        if bar is not None:
            bar.close()
        wall, cpu = time.perf_counter() - t0, time.process_time() - c0
        model.eval().save_pretrained(stage, safe_serialization=True)
        clip = load_clip(str(stage))  # the loader `eval clip --model DIR` uses
        r1 = truth_r_at_1(clip, protocol_truth(cfg, truth, prompts), prompts, {"seen": seen, "unseen": unseen})
        summary = {"steps": step, "steps_asked": opts.steps, "stopped": stopped, "loss_ema": ema, "train_wall_s": wall,
                   "train_cpu_s": cpu, "params": sum(q.numel() for q in model.parameters()),
                   "options": asdict(opts), "world": asdict(cfg.world), "truth_r_at_1": r1}
        atomic.write_json(stage / INFO_FILE, summary)
    return summary


__all__ = ["CLIP_SIZES", "ClipTraining", "INFO_FILE", "build_clip", "clip_setup", "protocol_truth", "render_views",
           "train_clip", "truth_r_at_1"]
