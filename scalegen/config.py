"""Typed experiment schema.

Every key has a typed default here; YAML files under ``configs/`` and ``key=value`` overrides
only change values. An unknown key or a value of the wrong type is a ``ConfigError`` that names
the key (and the closest valid keys), so a typo can never silently fall back to a default.

Step positions have ONE meaning everywhere (weight ramps, the timestep anneal, the learning-rate
warm-up; ``step_position``): a value below 1.0 is a fraction of ``train.max_steps``, so a config
keeps its shape when the budget changes; 1.0 and above is an absolute step count, so ``1.0`` is
step 1 (threestudio's ramps start at step 1), never "the whole run". The anneal over the whole run
is ``distill.t_anneal_steps: null`` (the default).

Scheduled weights (``Schedule``) are either a number or ``[start_step, start_value, end_value,
end_step]`` (threestudio's order, linear in between), with step positions as above.
"""
from __future__ import annotations

import dataclasses
import difflib
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, Literal, Optional, Union

import yaml

from scalegen.errors import ConfigError

Schedule = Union[float, list]


@dataclass(frozen=True)
class Range:
    """The valid range of a numeric key (or of every element of a list key), checked when a config is
    built, before anything runs: ``Annotated[int, Range(ge=1)]``."""

    ge: Optional[float] = None
    gt: Optional[float] = None
    le: Optional[float] = None
    lt: Optional[float] = None

    def check(self, key: str, value) -> None:
        for v in value if isinstance(value, list) else [value]:
            if v is None or isinstance(v, (str, bool)):
                continue
            for op, bound, ok in ((">=", self.ge, lambda a, b: a >= b), (">", self.gt, lambda a, b: a > b),
                                  ("<=", self.le, lambda a, b: a <= b), ("<", self.lt, lambda a, b: a < b)):
                if bound is not None and not ok(v, bound):
                    raise ConfigError(f"config key '{key}' must be {op} {bound:g}, got {v!r}")


AtLeast1 = Range(ge=1)  # counts and intervals
NonNeg = Range(ge=0)
Positive = Range(gt=0)  # rates, scales, lengths
Unit = Range(ge=0, le=1)  # probabilities, fractions


def step_position(position: float, max_steps: int) -> float:
    """A config's step position in steps: below 1.0 a fraction of ``max_steps``, else a step count."""
    return position * max_steps if position < 1.0 else float(position)


def schedule_value(value: Schedule, step: int, max_steps: int) -> float:
    """Evaluate a ``Schedule`` at ``step``."""
    if isinstance(value, (int, float)):
        return float(value)
    s0, v0, v1, s1 = value
    s0, s1 = step_position(s0, max_steps), step_position(s1, max_steps)
    if step <= s0:
        return float(v0)
    if step >= s1:
        return float(v1)
    return float(v0 + (v1 - v0) * (step - s0) / max(s1 - s0, 1e-9))


@dataclass
class WorldConfig:
    """The procedural oracle world. ``single`` (the default): prompts are `a <size> <color> <shape>`.
    ``compositional`` (configs/oracle/world_*.yaml; scalegen/data/oracle_grammar.py): one or two objects
    with a spatial relation, surface patterns, objects with a front, optionally under-specified prompts
    and K instances per scene, with held-out combinations at three levels."""

    # the grammar: `a <size> <color> <shape>`, or the compositional one
    kind: Literal["single", "compositional"] = "single"
    # the grammar's colour words
    colors: list[str] = field(default_factory=lambda: ["red", "green", "blue", "yellow", "purple", "orange"])
    # the grammar's shape words
    shapes: list[str] = field(default_factory=lambda: ["sphere", "cube", "cylinder", "cone", "torus"])
    sizes: list[str] = field(default_factory=lambda: ["small", "large"])  # the grammar's size words
    n_unseen: Annotated[int, NonNeg] = 10  # single: attribute combinations held out of training (every attribute stays seen)
    seed: int = 0  # which combinations are held out (compositional: also the instances' turns and the prompts drawn)
    # --- compositional only -------------------------------------------------------------------------
    patterns: list[Literal["plain", "striped", "checkered", "two-tone"]] = field(
        default_factory=lambda: ["plain", "striped", "checkered", "two-tone"])  # surface patterns a prompt may name
    relations: list[Literal["on top of", "left of", "right of", "in front of", "behind"]] = field(
        default_factory=lambda: ["on top of", "left of", "right of", "in front of", "behind"])  # relations of two-object prompts
    fronts: list[str] = field(default_factory=list)  # marker colours: "a blue cylinder with a yellow front"
    underspecified: bool = False  # prompts may omit size, colour or shape ("a cube", "a red object")
    max_completions: Annotated[int, AtLeast1] = 64  # prompts standing for more completions are not in the world
    instances: Annotated[int, AtLeast1] = 1  # K: each scene in K instances (small turns/shifts), K modes per prompt
    instance_rotation: Annotated[float, NonNeg] = 15.0  # degrees of yaw, at most, of instances 1..K-1
    instance_offset: Annotated[float, NonNeg] = 0.04  # ground-plane shift, at most, of instances 1..K-1
    unseen_attribute_pairs: Annotated[int, NonNeg] = 3  # (colour, shape) pairs no training prompt binds
    unseen_object_pairs: Annotated[int, NonNeg] = 2  # shape pairs never in one training scene
    unseen_relation_uses: Annotated[int, NonNeg] = 2  # (first shape, relation) uses never trained
    n_prompts: Annotated[int, AtLeast1] = 2000  # training prompts of data.prompts=oracle
    n_eval: Annotated[int, NonNeg] = 32  # evaluation prompts per held-out level


@dataclass
class DataConfig:
    prompts: str = "oracle"  # "oracle" (the world's seen prompts) or a corpus file (JSON/TXT/CSV)
    split: str = "train"  # the split of a corpus that has them (ScaleDreamer JSON: train / val / test)
    prompts_per_step: Annotated[int, AtLeast1] = 8  # per process
    shards: Optional[str] = None  # `scalegen data build` folder (or its manifest.json); replaces data.prompts
    shard_url: Optional[str] = None  # URL template of a shard, e.g. "pipe:aws s3 cp s3://b/c/{name} -" (default: local)
    shuffle_shards: Annotated[int, AtLeast1] = 4  # shuffle buffer: samples of this many consecutive shards are permuted together
    num_workers: Annotated[int, NonNeg] = 0  # dataloader workers reading shards (the batch order does not depend on it)
    on_corrupt: Literal["fail", "skip"] = "fail"  # a corrupt/truncated shard: stop, or skip it and count it
    embed_cache: Annotated[int, AtLeast1] = 4096  # prompts whose text embeddings are kept in memory when shards carry none (LRU)
    prompt: Optional[str] = None  # one prompt (per-prompt refinement, `scalegen refine`); replaces data.prompts


@dataclass
class CameraConfig:
    """ScaleDreamer's Stable Diffusion camera distribution, plus the evaluation orbit."""

    views_per_prompt: Annotated[int, AtLeast1] = 4  # training views rendered per prompt per step
    # stratified: ScaleDreamer's SD cameras (azimuth stratified per view, each view its own elevation,
    # distance, fovy); mvdream: views 360/V degrees apart from a random start sharing one elevation, fovy
    # and distance per object, distance = distance_range draw / tan(fovy / 2) (data/cameras.py)
    sampler: Literal["stratified", "mvdream"] = "stratified"
    share_across_prompts: bool = True  # one camera set per step: grid features computed once
    resolution: Annotated[int, Range(ge=8)] = 32  # training render size in pixels (square)
    # a resolution / batch schedule: [[step, resolution, views_per_prompt], ...], steps increasing. From each
    # step position on (below 1.0 a fraction of train.max_steps, else the 0-based index of the step being taken,
    # as threestudio's global_step) the run renders at that resolution with that many views per prompt; before
    # the first, at camera.resolution with camera.views_per_prompt. MVDream-threestudio's 64 px x 8 views, then
    # 256 px x 4 from step 5000: resolution 64, views_per_prompt 8, view_group 4, [[5000, 256, 4]]
    resolution_milestones: list[list[float]] = field(default_factory=list)
    # the views that share one elevation / fovy / distance (sampler mvdream), one timestep (distill.t_per=prompt)
    # and one multi-view denoising (MVDream's num_frames); views_per_prompt (and every milestone's) is a multiple
    # of it. MVDream-threestudio's batch 8 of n_view 4 is views_per_prompt 8, view_group 4. null: views_per_prompt
    view_group: Annotated[Optional[int], AtLeast1] = None
    elevation_range: list[float] = field(default_factory=lambda: [-10.0, 45.0])  # training elevations, degrees
    sphere_uniform_fraction: Annotated[float, Unit] = 0.5  # half the elevations uniform on the sphere, half in degrees
    # how the "uniform on the sphere" share of elevations is drawn (data/cameras.py, docs/reference-fidelity.md):
    # sine: asin(U[sin lo, sin hi]), truly uniform over the sphere's band (ScaleDreamer's uncond.py, the SD runs);
    # mvdream: asin(2 U[(lo + 90)/180, (hi + 90)/180] - 1), as MVDream-threestudio's and ScaleDreamer's multi-view
    # data modules draw it (for [0, 30] deg: within [0, 19.47] deg); null: the sampler's reference (stratified:
    # sine, mvdream: mvdream)
    sphere_draw: Optional[Literal["sine", "mvdream"]] = None
    distance_range: list[float] = field(default_factory=lambda: [1.0, 1.5])  # mvdream: relative (x 1/tan(fovy/2))
    fovy_range: list[float] = field(default_factory=lambda: [40.0, 70.0])  # training vertical field of view, degrees
    eval_elevation: float = 15.0  # evaluation orbit: elevation, degrees
    eval_distance: Annotated[float, Positive] = 1.5  # evaluation orbit: camera distance from the centre
    eval_fovy: Annotated[float, Range(gt=0, lt=180)] = 60.0  # evaluation orbit: vertical field of view, degrees
    eval_views: Annotated[int, AtLeast1] = 8  # evaluation orbit: views, evenly spaced in azimuth
    eval_resolution: Annotated[int, Range(ge=8)] = 64  # evaluation orbit: render size in pixels

    def views_per_group(self) -> int:
        """``view_group``, or ``views_per_prompt`` when unset (one group per prompt)."""
        return self.view_group or self.views_per_prompt

    def at_step(self, step: int, max_steps: int) -> "CameraConfig":
        """The cameras of 0-based step ``step``: ``resolution`` and ``views_per_prompt`` of the last
        ``resolution_milestones`` entry whose step position is <= ``step`` (the group size stays fixed)."""
        res, views = self.resolution, self.views_per_prompt
        for at, r, v in self.resolution_milestones:
            if step >= step_position(at, max_steps):
                res, views = int(r), int(v)
        return dataclasses.replace(self, resolution=res, views_per_prompt=views, view_group=self.views_per_group(),
                                   resolution_milestones=[])


@dataclass
class TextConfig:
    encoder: Literal["bow", "clip"] = "bow"  # bow: offline token-hash bag of words (oracle world)
    # bow only: "bag" ignores word order; "rotary" turns each word's vector by its position (RoPE), so
    # "a red cube on top of a blue sphere" and "a blue cube on top of a red sphere" differ (compositional world)
    word_order: Literal["bag", "rotary"] = "bag"
    dim: Annotated[int, AtLeast1] = 128  # bow only (CLIP's width comes from its weights)
    max_tokens: Annotated[int, AtLeast1] = 16  # bow only (CLIP: 77)
    model: Optional[str] = None  # clip: diffusers folder or hub id; null: the same as prior.model


@dataclass
class OracleConfig:
    sharpness: Annotated[float, Positive] = 0.1  # s: per-component std of the pixel-space Gaussian mixture
    # camera_aware: the prompt rendered at the row's camera (MVDream-like); view_agnostic: from fixed cameras (SD-like)
    mode: Literal["camera_aware", "view_agnostic"] = "camera_aware"
    n_uncond: Annotated[int, AtLeast1] = 16  # components of the unconditional mixture (prompts), own prompt always in
    n_fixed_views: Annotated[int, AtLeast1] = 8  # view-agnostic mode: renders per prompt from fixed cameras
    # view-agnostic mode: condition on the view bucket of the row's camera (front/side/back/overhead by
    # prior.front_threshold etc.), the oracle's counterpart of Stable Diffusion's view-dependent prompts;
    # with prior.perp_neg > 0 the CFG pairs get Perp-Neg (negatives: the other buckets)
    view_prompts: bool = False
    samples: Annotated[int, Range(ge=2)] = 48  # ground-truth proposal samples per ray (SDF only)
    importance_samples: Annotated[int, NonNeg] = 32  # ground-truth samples composited (midpoint rule)


@dataclass
class PriorConfig:
    # the frozen diffusion prior the generator is distilled from
    # learned: a small UNet trained on the oracle world's renders (`scalegen prior train-learned`), prior.model=its folder
    name: Literal["oracle", "stable_diffusion", "mvdream", "learned"] = "oracle"
    oracle: OracleConfig = field(default_factory=OracleConfig)
    # --- stable_diffusion and mvdream (scalegen/priors/stable_diffusion.py, mvdream.py) ------------
    # SD: a diffusers folder or hub id (unet/ vae/ scheduler/); mvdream: a `scalegen prior convert-mvdream` folder;
    # learned: a `scalegen prior train-learned --out` folder
    model: str = "stabilityai/stable-diffusion-2-1-base"
    dtype: Literal["fp16", "bf16", "fp32"] = "fp16"  # UNet + VAE weights (fp32 on CPU)
    channels_last: bool = True  # UNet in channels-last memory format
    compile: bool = False  # torch.compile the UNet (first steps are slow; GPU only)
    # render -> bilinear resize to this -> VAE encode (with grad); null: the prior's own (SD 512, MVDream 256)
    encode_resolution: Annotated[Optional[int], Range(ge=8)] = None
    # latents are resized to this when the VAE returns another size; null: the UNet's own (SD 64, MVDream 32)
    latent_resolution: Annotated[Optional[int], AtLeast1] = None
    negative_prompt: str = ""  # the unconditional branch's prompt
    # --- stable_diffusion only (MVDream takes the prompt as it is; the camera says the view) --------
    view_dependent: bool = True  # "<prompt>, <front|side|back|overhead> view" by camera angle
    front_threshold: Annotated[float, Range(ge=0, le=180)] = 30.0  # degrees of azimuth either side of +x that count as front
    back_threshold: Annotated[float, Range(ge=0, le=180)] = 30.0  # degrees either side of -x that count as back
    overhead_threshold: Annotated[float, Range(ge=-90, le=90)] = 60.0  # elevation above which a view is overhead
    perp_neg: Annotated[float, NonNeg] = 0.0  # Perp-Neg strength (0 = off); ScaleDreamer 0.5 (guidance_perp_neg -0.5)
    perp_neg_f_fs: list[float] = field(default_factory=lambda: [4.0, 0.5, -2.426])  # a e^(-b r) + c
    # side-to-front weight, as perp_neg_f_fs
    perp_neg_f_sf: list[float] = field(default_factory=lambda: [4.0, 0.5, -2.426])
    # side-to-back weight, as perp_neg_f_fs
    perp_neg_f_sb: list[float] = field(default_factory=lambda: [1.0, 0.5, -0.606])
    # front-side-back weight, as perp_neg_f_fs
    perp_neg_f_fsb: list[float] = field(default_factory=lambda: [1.0, 0.5, 0.967])
    text_cache_size: Annotated[int, AtLeast1] = 1024  # prompts whose UNet embeddings stay on the device (LRU)

    def resolutions(self) -> tuple[int, int]:
        """(encode, latent) resolution: the configured ones, else the prior's native sizes."""
        enc, lat = NATIVE_RESOLUTION.get(self.name, (512, 64))
        return self.encode_resolution or enc, self.latent_resolution or lat


# The one list of each kind of name (the Literal types below, the command line's choices and the build_*
# functions' branches all follow these; tests/test_interfaces.py checks the modules that implement them).
AMORTIZED = ("hyper_ingp", "conv3d", "triplane_transformer")  # generators of any prompt
PER_PROMPT = ("gaussians", "ingp")  # generators that are one prompt's scene (per-prompt refinement)
GENERATOR_PRESETS = ("paper", "small")  # conv3d / triplane_transformer sizes (their modules' PRESETS)
DISTILLERS = ("sds", "csd", "vsd", "asd", "vdm")
NATIVE_RESOLUTION = {"stable_diffusion": (512, 64), "mvdream": (256, 32)}  # (VAE input, UNet latent) sizes


@dataclass
class GaussiansConfig:
    """generator.name=gaussians: one prompt's 3D Gaussians (per-prompt refinement, generators/gaussians.py)."""

    n_init: Annotated[int, AtLeast1] = 4096  # Gaussians of the sphere start (a start from a file or a run brings its own)
    sh_degree: Annotated[int, Range(ge=0, le=3)] = 0  # view-dependent colour; 0 = one colour per Gaussian
    init_opacity: Annotated[float, Range(gt=0, lt=1)] = 0.1  # start opacity in a volume (sphere, point cloud): 3DGS's
    surface_opacity: Annotated[float, Range(gt=0, lt=1)] = 0.8  # start opacity of discs on a known surface (run, mesh)
    densify_from: Annotated[float, NonNeg] = 0.0  # densify in [from, until) (step positions), every densify_every steps
    densify_until: Annotated[float, NonNeg] = 0.6  # end of the densification window (step position)
    densify_every: Annotated[int, AtLeast1] = 50  # steps between densifications
    densify_grad: Annotated[float, Positive] = 2e-4  # mean screen-space gradient (NDC) above which a Gaussian is cloned/split
    percent_dense: Annotated[float, Positive] = 0.01  # clone below this size (x render.bound), split above
    min_opacity: Annotated[float, Unit] = 0.005  # prune below this opacity
    max_scale: Annotated[float, Positive] = 0.1  # prune above this size (x render.bound)
    max_gaussians: Annotated[int, AtLeast1] = 20000  # densification stops growing the set here (CPU budget)
    opacity_reset_every: Annotated[int, NonNeg] = 0  # 3DGS resets opacities to <= 0.01 every N steps; 0 = never
    mesh_level: Annotated[float, Positive] = 0.5  # mesh export: the surface where the summed density reaches this
    # a start from an amortized run: steps fitting the surface discs to the run's own renders (RGB and opacity,
    # random training views) before distillation, so the start renders as the run does; 0 = the discs as placed
    start_fit_steps: Annotated[int, NonNeg] = 200
    # the fit's learning rates: optim.group_lr x start_fit_lr_scale, decaying exponentially to start_fit_lr_end of
    # that by the last fit step, no densification (the measured comparison: docs/notes/2026-12-01-refine-converged-fit.md)
    start_fit_lr_scale: Annotated[float, Positive] = 10.0
    start_fit_lr_end: Annotated[float, Range(gt=0, le=1)] = 0.01  # the fit's last rate, as a fraction of its first


@dataclass
class GeneratorConfig:
    # hyper_ingp / conv3d / triplane_transformer: amortized (any prompt); gaussians / ingp: one prompt's scene
    # (per-prompt refinement: data.prompt, data.prompts_per_step=1)
    name: Literal[AMORTIZED + PER_PROMPT] = "hyper_ingp"
    # Multi-resolution hash grid shared by all prompts (paper: 16 x 2, 2^19, 16 -> 4096).
    hash_levels: Annotated[int, AtLeast1] = 8  # resolution levels of the hash grid
    hash_features: Annotated[int, AtLeast1] = 2  # features per level
    hash_log2_size: Annotated[int, Range(ge=4, le=24)] = 16  # log2 of each level's hash table size
    hash_base_resolution: Annotated[int, AtLeast1] = 16  # coarsest level's cells per axis
    hash_max_resolution: Annotated[int, AtLeast1] = 256  # finest level's cells per axis
    # Per-prompt bias-free MLPs emitted by the hypernetwork.
    mlp_hidden: Annotated[int, AtLeast1] = 64  # hidden width of the per-prompt SDF / colour MLPs
    hyper_hidden: Annotated[int, AtLeast1] = 64  # hidden width of the hypernetwork
    hyper_out_gain: Annotated[float, Positive] = 1.0  # xavier gain of the hypernetwork's last layer
    # SDF bias |x| - r: every prompt starts as this sphere. 0.35 sits between the oracle world's sizes
    # (0.30 small, 0.45 large): from 0.5, small objects stay too large at 300 steps
    # (docs/notes/2026-11-29-start-sphere-and-t-range.md).
    sdf_radius: Annotated[float, Positive] = 0.35
    backend: Literal["torch", "tcnn"] = "torch"  # hash grid: pure PyTorch, or tiny-cuda-nn (CUDA only)
    # conv3d / triplane_transformer (scalegen/generators/conv3d.py, triplane_transformer.py).
    preset: Literal[GENERATOR_PRESETS] = "paper"  # paper: ScaleDreamer's sizes; small: oracle world on CPU
    channel_multiplier: Annotated[int, Range(ge=1, le=2)] = 1  # conv3d: widths at resolutions >= 32 (paper: 1 -> 88.7M, 2 -> 144.8M)
    z_dim: Annotated[int, NonNeg] = 0  # conv3d noise width; 0 = the preset's (paper 64)
    # conv3d: draw z ~ N(0, I) and per-voxel synthesis noise in training (ScaleDreamer); false: z = 0 and no
    # synthesis noise in training too, as at evaluation (a world with one answer per prompt has nothing to sample)
    sample_noise: bool = True
    # conv3d / triplane_transformer: scale of the initial weights of the layers that write the features (to-grid
    # convs, deconv). The decoders are bias-free ReLU MLPs (1-homogeneous), so the first field is the start sphere
    # plus a residual this many times the plain init's; 1 = the reference's init
    feature_init_scale: Annotated[float, Positive] = 1.0
    # conv3d / triplane_transformer: scale the text condition (conv3d: the pooled embedding; triplane: each token) to
    # unit second moment before it enters. CLIP's layer-normed embeddings are near that already; the oracle's
    # bag-of-words vectors have rms 1/sqrt(text.dim) and so reach the styles / cross-attention ~10x weaker
    text_norm: bool = False
    checkpointing: bool = False  # recompute each block in backward (less activation memory, more time)
    bf16: bool = False  # run the conv / transformer trunk under bfloat16 autocast
    gaussians: GaussiansConfig = field(default_factory=GaussiansConfig)


@dataclass
class RenderConfig:
    bound: Annotated[float, Positive] = 0.75  # scene box half-size; near/far are this box's ray intersections
    samples: Annotated[int, Range(ge=2)] = 32  # stratified proposal samples per ray
    importance_samples: Annotated[int, NonNeg] = 32  # samples per ray drawn from the proposal's weights
    composite: Literal["fine", "all"] = "fine"  # fine: only importance samples carry gradients
    uniform_mix: Annotated[float, Unit] = 0.2  # share of the importance pdf that is uniform along the ray
    beta: Annotated[float, Positive] = 1.0 / 30.0  # VolSDF Laplace scale (ScaleDreamer: fixed, 1/30)
    near_min: Annotated[float, Positive] = 0.05  # smallest near distance of a ray
    # step of the central differences that give SDF gradients (normals, eikonal)
    normal_eps: Annotated[float, Positive] = 0.01
    eikonal_points: Annotated[int, AtLeast1] = 4096  # ray samples per step used for the eikonal term
    # env: a text-conditioned environment map per prompt; solid: one learned colour
    background: Literal["env", "solid"] = "env"
    bg_random_prob: Annotated[float, Unit] = 0.0  # random solid-colour background augmentation (SD runs: 0.2)
    # generator.name=gaussians: the rasterizer (render/gaussians.py)
    splat_backend: Literal["auto", "torch", "gsplat"] = "auto"  # auto: gsplat's CUDA kernels when installed on a GPU
    splat_blur: Annotated[float, NonNeg] = 0.3  # px^2 added to every projected covariance (3DGS / gsplat eps2d)


@dataclass
class DistillConfig:
    name: Literal[DISTILLERS] = "sds"
    guidance_scale: Annotated[float, NonNeg] = 7.5
    weighting: Literal["sds", "uniform"] = "sds"  # w(t) = 1 - alphabar_t, or 1
    # [min, max] of t / T at step 0, annealed to t_range_end
    t_range_start: list[float] = field(default_factory=lambda: [0.50, 0.98])
    # ScaleDreamer ends at [0.02, 0.50] (the SD configs keep it); the oracle default ends at 0.25, where the CFG
    # term has vanished (bench guidance). Its measured effect is within run-to-run spread
    # (docs/notes/2026-11-29-start-sphere-and-t-range.md).
    t_range_end: list[float] = field(default_factory=lambda: [0.02, 0.25])
    t_anneal_steps: Annotated[Optional[float], Positive] = None  # length of the linear anneal (step position); null: the whole run
    t_per: Literal["image", "prompt"] = "image"  # SD: per image; MVDream: per view group (required)
    asd_eta: Annotated[float, NonNeg] = 0.1  # dt = floor(U(0,1) * eta * (t - t_min_now))
    # SDS as MVDream's x0 reconstruction (its Sec. 3.2): g = z - x0_hat, x0_hat from eps_cfg with its std
    # rescaled per object towards the conditional x0's by sds_x0_rescale (0: none; MVDream 0.5, CFG 50)
    sds_x0_recon: bool = False
    sds_x0_rescale: Annotated[float, Unit] = 0.5  # see sds_x0_recon
    # Stateful distillers (VSD's eps_phi, VDM's M_psi): their own optimizer group and learning rate.
    lr: Annotated[float, Positive] = 1e-3
    net_width: int = 32  # channels of the small conv nets (VDM's M_psi; VSD's correction in the oracle world)
    net_blocks: Annotated[int, NonNeg] = 2  # residual blocks of those nets
    vsd_lora_rank: Annotated[int, AtLeast1] = 4  # Stable Diffusion: rank of the LoRA copy of the UNet
    # Stable Diffusion: probability of dropping the LoRA's camera condition
    vsd_camera_dropout: Annotated[float, Unit] = 0.1
    dca_schedule: Literal["constant", "linear", "cosine"] = "linear"  # VDM's lambda(t)
    dca_lambda: Annotated[list[float], Unit] = field(default_factory=lambda: [1.0, 0.0])  # lambda at t = 0 and at t = T


@dataclass
class LossConfig:
    distill: Annotated[float, NonNeg] = 1.0  # weight of the distillation loss
    eikonal: Schedule = 0.1  # weight of the eikonal term (|grad SDF| = 1); a number or a ramp
    sparsity: Schedule = 0.0  # weight of the opacity sparsity term; a number or a ramp
    # weight of the opacity entropy term (pushes opacities to 0 or 1); a number or a ramp
    opacity_entropy: Schedule = 0.0


@dataclass
class OptimConfig:
    name: Literal["adam", "adamw", "adan"] = "adam"  # adan: 3 betas (ScaleDreamer CP100k: 0.98, 0.92, 0.99)
    lr: Annotated[float, Positive] = 1e-3  # every generator parameter group not named in group_lr
    group_lr: dict[str, Annotated[float, Positive]] = field(default_factory=lambda: {"grid": 1e-2})  # per-module rates
    lr_background: Annotated[float, NonNeg] = 1e-3  # the background's learning rate (0 keeps it fixed)
    # Adam's (b1, b2); Adan takes three
    betas: Annotated[list[float], Range(ge=0, lt=1)] = field(default_factory=lambda: [0.0, 0.99])
    eps: Annotated[float, Positive] = 1e-8  # the optimizer's epsilon
    weight_decay: Annotated[float, NonNeg] = 0.0  # decoupled for adamw / adan, L2 for adam
    grad_clip: Annotated[Optional[float], Positive] = 1.0  # clip the global gradient norm to this; null: no clipping
    lr_schedule: Literal["constant", "cosine"] = "constant"  # cosine: decay to min_lr_ratio * lr
    min_lr_ratio: Annotated[float, Unit] = 0.1  # cosine schedule's final rate, as a fraction of lr
    warmup_steps: Annotated[float, NonNeg] = 0.0  # linear warm-up length (step position: below 1.0 a fraction of max_steps)


@dataclass
class TrainConfig:
    max_steps: Annotated[int, AtLeast1] = 300  # optimizer steps of the run
    seed: Annotated[int, NonNeg] = 0  # data order, cameras, noise and initialisation
    out_dir: str = "runs/default"  # run directory when --out is not given
    log_every: Annotated[int, AtLeast1] = 10  # steps between lines of metrics.jsonl (and the logger)
    val_every: Annotated[int, AtLeast1] = 200  # steps between validation grids in val/
    # validation also writes this many prompts' meshes (GLB) and turntables to RUN/val/step_N/ and logs them to
    # W&B as Object3D and video, with the oracle metrics of the grid's prompts (`scalegen train` only; 0: none)
    val_assets: Annotated[int, NonNeg] = 2
    ckpt_every: Annotated[int, AtLeast1] = 100  # steps between checkpoints
    keep_ckpts: Annotated[int, AtLeast1] = 2  # newest checkpoints kept; older ones are deleted
    # null: what the launcher says (`accelerate launch --mixed_precision`, an accelerate/DeepSpeed config), else fp32
    mixed_precision: Optional[Literal["no", "fp16", "bf16"]] = None
    # metrics.jsonl is always written; wandb mirrors it to Weights & Biases (an extra: pip install "scalegen[wandb]")
    logger: Literal["wandb", "none"] = "none"
    wandb_project: str = "scalegen"
    progress: bool = True  # tqdm progress bar
    threads: Annotated[int, NonNeg] = 0  # torch CPU threads; 0 = torch's default
    skip_nonfinite: bool = True  # skip a step whose loss or gradient is not finite on any rank (one flag read per step)
    max_bad_steps: Annotated[int, AtLeast1] = 20  # ... and stop after this many such steps in a row
    collective_timeout_s: Annotated[int, AtLeast1] = 600  # a rank that stops answering fails the others after this
    grad_accum: Annotated[int, AtLeast1] = 1  # micro-batches per optimizer step (max_steps counts optimizer steps, as Lightning)


@dataclass
class EvalConfig:
    samples: Annotated[int, Range(ge=2)] = 32  # proposal samples per ray when scoring (render.samples is training's)
    importance_samples: Annotated[int, NonNeg] = 32  # importance samples per ray when scoring
    max_prompts: Annotated[int, NonNeg] = 0  # per split; 0 = all


@dataclass
class Config:
    world: WorldConfig = field(default_factory=WorldConfig)
    data: DataConfig = field(default_factory=DataConfig)
    camera: CameraConfig = field(default_factory=CameraConfig)
    text: TextConfig = field(default_factory=TextConfig)
    prior: PriorConfig = field(default_factory=PriorConfig)
    generator: GeneratorConfig = field(default_factory=GeneratorConfig)
    render: RenderConfig = field(default_factory=RenderConfig)
    distill: DistillConfig = field(default_factory=DistillConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def text_model(self) -> str:
        """The CLIP text tower's folder or hub id: ``text.model``, or ``prior.model`` when unset, so
        one folder is all a Stable Diffusion user passes."""
        return self.text.model or self.prior.model

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)


# ----------------------------------------------------------------------------------------------
# Loading, overrides and validation


def _keys(cls) -> list[str]:
    """All dotted keys of a config dataclass (for 'did you mean')."""
    out = []
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        tp = hints[f.name]
        if dataclasses.is_dataclass(tp):
            out += [f"{f.name}.{k}" for k in _keys(tp)]
        else:
            out.append(f.name)
    return out


LIST_KEYS = "`scalegen train --print-config` lists every key"


def _leaf_keys(data: Any, prefix: str = "") -> list[str]:
    """Dotted leaf keys of a (nested) mapping of overrides."""
    if not isinstance(data, dict):
        return [prefix.rstrip(".")]
    return [k for key, v in data.items() for k in _leaf_keys(v, f"{prefix}{key}.")]


def _unknown(key: str, valid: list[str], listing: str = LIST_KEYS, value: Any = None) -> ConfigError:
    """The error for an unknown key, with the closest keys; a mistyped section (``trian.max_steps``) is
    matched against the section names and its keys are suggested under the closest section."""
    close = difflib.get_close_matches(key, valid, n=3, cutoff=0.6)
    if not close and isinstance(value, dict):
        sections = sorted({v.rsplit(".", 1)[0] for v in valid if "." in v})
        near = difflib.get_close_matches(key, sections, n=3, cutoff=0.6)
        if near:
            leaves = _leaf_keys(value)
            fixed = [f"{s}.{leaf}" for s in near for leaf in leaves if f"{s}.{leaf}" in valid]
            hint = f"did you mean {', '.join(repr(c) for c in fixed[:3])}?" if fixed else \
                f"did you mean section {', '.join(repr(c) for c in near)}?"
            return ConfigError(f"unknown config section '{key}' (in '{key}.{leaves[0]}'; {hint}); {listing}")
    hint = f" (did you mean {', '.join(repr(c) for c in close)}?)" if close else ""
    return ConfigError(f"unknown config key '{key}'{hint}; {listing}")


def _coerce(key: str, tp: Any, value: Any) -> Any:
    """Check ``value`` against the annotation ``tp`` and convert where it is lossless."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin is Annotated:
        value = _coerce(key, args[0], value)
        for meta in args[1:]:
            if isinstance(meta, Range):
                meta.check(key, value)
        return value
    if tp is Any:
        return value
    if origin is Union:
        if value is None and type(None) in args:
            return None
        errors = []
        for a in args:
            if a is type(None):
                continue
            try:
                return _coerce(key, a, value)
            except ConfigError as e:
                errors.append(str(e))
        names = " or ".join(getattr(a, "__name__", str(a)) for a in args if a is not type(None))
        raise ConfigError(f"config key '{key}' must be {names}, got {value!r}")
    if origin is Literal:
        if value not in args:
            raise ConfigError(f"config key '{key}' must be one of {', '.join(map(repr, args))}, got {value!r}")
        return value
    if origin is dict or tp is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"config key '{key}' must be a mapping, got {value!r}")
        if args:
            return {_coerce(f"{key}", args[0], k): _coerce(f"{key}.{k}", args[1], v) for k, v in value.items()}
        return value
    if origin in (list, tuple) or tp in (list, tuple):
        if isinstance(value, tuple):
            value = list(value)
        if not isinstance(value, list):
            raise ConfigError(f"config key '{key}' must be a list, got {value!r}")
        if args:
            return [_coerce(f"{key}[{i}]", args[0], v) for i, v in enumerate(value)]
        return value
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"config key '{key}' must be true or false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, (int, float)) or int(value) != value:
            raise ConfigError(f"config key '{key}' must be an integer, got {value!r}")
        return int(value)
    if tp is float:
        if isinstance(value, str):  # YAML 1.1 reads "1e-6" (no dot) as a string
            try:
                value = float(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"config key '{key}' must be a number, got {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"config key '{key}' must be a string, got {value!r}")
        return value
    return value


def _build(cls, data: dict, prefix: str, valid: list[str], listing: str = LIST_KEYS):
    if not isinstance(data, dict):
        raise ConfigError(f"config section '{prefix.rstrip('.')}' must be a mapping, got {data!r}")
    hints = typing.get_type_hints(cls, include_extras=True)
    names = {f.name for f in dataclasses.fields(cls)}
    for k in data:
        if k not in names:
            raise _unknown(prefix + str(k), valid, listing, data[k])
    kwargs = {}
    for f in dataclasses.fields(cls):
        if f.name not in data:
            continue
        tp = hints[f.name]
        if dataclasses.is_dataclass(tp):
            kwargs[f.name] = _build(tp, data[f.name] or {}, prefix + f.name + ".", valid, listing)
        else:
            kwargs[f.name] = _coerce(prefix + f.name, tp, data[f.name])
    return cls(**kwargs)


def _deep_merge(base: dict, new: dict) -> dict:
    out = dict(base)
    for k, v in new.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = _deep_merge(out[k], v)
        else:
            out[k] = v
    return out


def parse_overrides(overrides: list[str]) -> dict:
    """``["train.max_steps=10", "distill.name=asd"]`` -> nested dict (values parsed as YAML)."""
    out: dict = {}
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override '{item}' must look like key=value, e.g. train.max_steps=100")
        key, raw = item.split("=", 1)
        try:
            value = yaml.safe_load(raw) if raw != "" else ""
        except yaml.YAMLError:
            value = raw
        node = out
        parts = key.strip().split(".")
        for p in parts[:-1]:
            node = node.setdefault(p, {})
        node[parts[-1]] = value
    return out


def parse_options(cls, overrides: list[str], section: str, listing: str):
    """A typed options dataclass ``cls`` from ``section.key=value`` overrides (a benchmark's
    ``bench.*`` options), checked exactly like config keys: unknown keys name the closest ones."""
    data = parse_overrides(overrides)
    extra = [k for k in data if k != section]
    if extra:
        raise ConfigError(f"'{extra[0]}' is not an option here; options are {section}.<name>=value")
    valid = [f"{section}.{k}" for k in _keys(cls)]
    return _build(cls, data.get(section) or {}, section + ".", valid, listing)


def load_yaml(path: str | Path) -> dict:
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"config file '{path}' does not exist; pass a YAML file such as configs/oracle/default.yaml")
    try:
        data = yaml.safe_load(p.read_text()) or {}
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark is not None else ""
        raise ConfigError(f"config file '{path}' is not valid YAML{where}; fix the syntax and retry") from None
    if not isinstance(data, dict):
        raise ConfigError(f"config file '{path}' must hold a mapping of sections, not {type(data).__name__}")
    return data


def from_dict(data: dict) -> Config:
    cfg = _build(Config, data, "", _keys(Config))
    validate(cfg)
    return cfg


def load_run_config(run_dir: str | Path, overrides: list[str] | None = None) -> Config:
    """The saved ``config.yaml`` of a run directory, with ``key=value`` overrides on top."""
    data = load_yaml(Path(run_dir) / "config.yaml")
    if overrides:
        data = _deep_merge(data, parse_overrides(overrides))
    return from_dict(data)


def compose_config(layers: list[dict], overrides: list[str] | None = None) -> Config:
    """Defaults <- each layer of nested sections in turn (deep-merged) <- ``key=value`` overrides, validated."""
    data: dict = {}
    for layer in layers:
        data = _deep_merge(data, layer)
    if overrides:
        data = _deep_merge(data, parse_overrides(overrides))
    return from_dict(data)


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> Config:
    """Defaults <- YAML file <- ``key=value`` overrides, validated."""
    data = load_yaml(path) if path else {}
    if overrides:
        data = _deep_merge(data, parse_overrides(overrides))
    return from_dict(data)


def validate(cfg: Config) -> None:
    """Cross-key checks that a key's type and ``Range`` alone cannot express."""
    def need(cond: bool, msg: str) -> None:
        if not cond:
            raise ConfigError(msg)

    c = cfg.camera
    need(len(c.elevation_range) == 2 and -90 <= c.elevation_range[0] <= c.elevation_range[1] <= 90,
         "camera.elevation_range must be [low, high] in degrees within [-90, 90]")
    need(len(c.distance_range) == 2 and 0 < c.distance_range[0] <= c.distance_range[1],
         "camera.distance_range must be [low, high] with 0 < low <= high")
    need(len(c.fovy_range) == 2 and 0 < c.fovy_range[0] <= c.fovy_range[1] < 180,
         "camera.fovy_range must be [low, high] degrees inside (0, 180)")
    # the view group matters where views are grouped: MVDream's sampler and prior, one t per group
    grouped = c.sampler == "mvdream" or cfg.prior.name == "mvdream" or cfg.distill.t_per == "prompt"
    g = c.views_per_group() if grouped or c.view_group else 1
    need(c.views_per_prompt % g == 0, f"camera.views_per_prompt ({c.views_per_prompt}) must be a multiple of "
         f"camera.view_group ({g})")
    steps = [step_position(m[0], cfg.train.max_steps) if len(m) == 3 else -1.0 for m in c.resolution_milestones]
    for m in c.resolution_milestones:
        need(len(m) == 3 and m[0] >= 0 and all(x == int(x) for x in m[1:]) and m[1] >= 8 and m[2] >= 1,
             f"camera.resolution_milestones entries must be [step, resolution >= 8, views_per_prompt >= 1], e.g. "
             f"[[5000, 256, 4]]; got {m!r}")
        need(m[2] % g == 0, f"camera.resolution_milestones: {m[2]:g} views per prompt is not a multiple of the view "
             f"group {g} (camera.view_group, else camera.views_per_prompt); got {m!r}")
    need(all(a < b for a, b in zip(steps, steps[1:])),
         f"camera.resolution_milestones must be in increasing step order, got {c.resolution_milestones!r}")
    for name in ("t_range_start", "t_range_end"):
        r = getattr(cfg.distill, name)
        need(len(r) == 2 and 0.0 <= r[0] <= r[1] <= 1.0, f"distill.{name} must be [low, high] fractions of T in [0, 1]")
    need(len(cfg.distill.dca_lambda) == 2, "distill.dca_lambda must be [lambda at t=0, lambda at t=T]")
    need(cfg.distill.net_width % 8 == 0 and cfg.distill.net_width > 0,
         "distill.net_width must be a positive multiple of 8 (GroupNorm groups)")
    if cfg.optim.name == "adan":
        need(len(cfg.optim.betas) == 3, "optim.betas must be [beta1, beta2, beta3] for adan, e.g. [0.98, 0.92, 0.99]")
    else:
        need(len(cfg.optim.betas) == 2, "optim.betas must be [beta1, beta2]")
    p = cfg.prior
    if p.name == "mvdream":
        need(cfg.distill.t_per == "prompt", "prior.name=mvdream needs distill.t_per=prompt: MVDream denoises the "
             "views of an object together, at one timestep")
        need(p.perp_neg == 0, "prior.perp_neg is Stable Diffusion's; MVDream's camera condition replaces it (set 0)")
    need(not (p.perp_neg > 0 and not p.view_dependent),
         "prior.perp_neg needs prior.view_dependent=true (its negatives are the other views' prompts)")
    if p.name == "oracle":
        need(not (p.oracle.view_prompts and p.oracle.mode != "view_agnostic"),
             "prior.oracle.view_prompts needs prior.oracle.mode=view_agnostic (the camera-aware oracle already "
             "knows the exact view)")
        need(not (p.perp_neg > 0 and not p.oracle.view_prompts),
             "prior.perp_neg in the oracle world needs prior.oracle.view_prompts=true (its negatives are the other "
             "view buckets)")
    for key in ("perp_neg_f_fs", "perp_neg_f_sf", "perp_neg_f_sb", "perp_neg_f_fsb"):
        need(len(getattr(p, key)) == 3, f"prior.{key} must be [a, b, c] of a*exp(-b*r)+c")
    need(cfg.generator.hash_max_resolution >= cfg.generator.hash_base_resolution,
         "generator.hash_max_resolution must be >= generator.hash_base_resolution")
    need(cfg.generator.sdf_radius < cfg.render.bound,
         "generator.sdf_radius must be smaller than render.bound (the start sphere must fit in the scene box)")
    if cfg.generator.name in PER_PROMPT:
        need(bool(cfg.data.prompt), f"generator.name={cfg.generator.name} is one prompt's scene: give data.prompt "
             "(`scalegen refine --prompt TEXT` does)")
        need(cfg.data.prompts_per_step == 1, f"generator.name={cfg.generator.name} renders one prompt per step: set "
             "data.prompts_per_step=1")
        need(not cfg.data.shards, "per-prompt refinement trains on data.prompt; drop data.shards")
    if cfg.data.prompt is not None:
        need(bool(cfg.data.prompt.strip()), "data.prompt is empty; describe the asset, e.g. 'a large red cube'")
    w = cfg.world
    need(len(w.colors) >= 2 and len(w.shapes) >= 2 and len(w.sizes) >= 1,
         "world needs at least 2 colors, 2 shapes and 1 size")
    if w.kind == "single":
        n_total = len(w.colors) * len(w.shapes) * len(w.sizes)
        need(w.n_unseen <= n_total // 2, f"world.n_unseen must be between 0 and {n_total // 2} for this grammar")
    else:
        need(len(w.patterns) >= 1, "world.patterns needs at least one pattern (e.g. [plain])")
        need(cfg.text.encoder != "bow" or cfg.text.word_order == "rotary" or not w.relations,
             "world.kind=compositional with relations needs text.word_order=rotary: a bag of words cannot tell "
             "'a red cube on top of a blue sphere' from 'a blue cube on top of a red sphere'")
    for key in ("eikonal", "sparsity", "opacity_entropy"):
        v = getattr(cfg.loss, key)
        if isinstance(v, (int, float)):
            need(v >= 0, f"config key 'loss.{key}' must be >= 0, got {v!r}")
        else:
            need(isinstance(v, list) and len(v) == 4 and all(isinstance(x, (int, float)) for x in v)
                 and min(v) >= 0,
                 f"config key 'loss.{key}' must be a weight >= 0 or [start_step, start_value, end_value, end_step] "
                 f"of numbers >= 0 (steps below 1.0: fractions of train.max_steps), got {v!r}")
