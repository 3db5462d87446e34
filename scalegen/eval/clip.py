"""CLIP prompt-consistency of 3D generators across prompt corpora: ``scalegen eval clip``.

"CLIP R-precision" is not one protocol in the field, so a protocol here is a named preset of every
choice that moves the numbers, each overridable, and the summary JSON records the effective one:

* ``scaledreamer`` (ScaleDreamer, ECCV 2024; ``evaluation/CLIP/evaluation_amortized.py`` and
  ``threestudio/data/uncond.py`` of theEricMa/ScaleDreamer): CLIP ViT-L/14 with OpenAI weights through
  transformers; 120 test views with azimuths ``linspace(0, 360, 120)`` (both ends included, so the
  first and last views coincide) at 15 degrees elevation, 512 px, camera distance 1.5 and fovy 70 in
  their SD configs; each saved grid image cropped to its left square (the RGB panel) and resized to
  224 bilinearly; raw cosine similarity; R@1 per view by argmax over *every prompt in the results
  folder*, averaged per prompt then over prompts. Their MG15/DF415/AT2520 test split equals the
  train split, and R@1 = 1.000 on MG15 (15 candidates) and 0.276 on DF415 (415) are not comparable.
* ``triplaneturbo`` (TriplaneTurbo, CVPR 2025; ``evaluation/clipscore/compute.py`` and
  ``evaluation/mesh_visualize.py`` of theEricMa/TriplaneTurbo): OpenAI CLIP ViT-B/32 as ``clip.load``
  builds it, with QuickGELU (open_clip's ``ViT-B-32-quickgelu``: plain ``ViT-B-32`` with the OpenAI
  weights builds GELU layers in open_clip >= 2.2x, open_clip #771); with ``--ckpt`` the exported mesh,
  fitted to [-0.9, 0.9]^3 and rendered unlit (vertex colours) on white at radius 3, fovy 50 (kiui's
  ``kire``: ``MeshViews``); 4 views at azimuths 0/90/180/270, 15 degrees, 512 px; Resize(224, bicubic) +
  CenterCrop(224); captions
  prefixed with "A photo depicts" *without* a space (their compute.py drops the space Hessel's
  clipscore.py adds: override with ``--prefix "A photo depicts "``); CLIPScore w = 2.5; R@1 over the
  DF415 prompts. (Their R@1 clamps negative cosines to 0 before argmax; real CLIP cosines of
  renders are positive, so we do not.)
* ``scalegen`` (ours): ViT-L/14 OpenAI weights (ScaleDreamer's, so similarities compare), 8 views
  evenly spaced at 15 degrees rendered at 224 px (CLIP's input: no resampling), CLIP's own
  preprocessing; R@1 of each prompt among itself and a fixed, seeded set of 99 distractor prompts of
  the same corpus (chance 1/100 for corpora of any size), reported beside R@1 against all prompts;
  seen (train split) and unseen prompts reported separately.

Every protocol reports all four figures (``clip_similarity``, ``clip_score``, ``r_at_1_all``,
``r_at_1_distractors``); ties are shared (scalegen/eval/retrieval.py). Renders are quantised to
8 bits before scoring, as a saved PNG is, so ``--ckpt`` scores equal ``--images`` scores of the views
``--save-views`` writes.

Scale: text features are computed once per (model, prompt) and cached on disk; images are encoded
in batches; prompts are split across processes (``accelerate launch``) and gathered; each process
appends its finished prompts to ``OUT/progress/part-RANK.jsonl``, so a rerun with the same command
skips them (any number of processes).
"""
from __future__ import annotations

import csv
import dataclasses
import hashlib
import json
import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from torch import Tensor

from scalegen import atomic
from scalegen.data.cameras import Cameras
from scalegen.data.prompts import corpus_splits, read_corpus
from scalegen.errors import DataError, ExportError, ScalegenError
from scalegen.eval.clip_models import ClipModel, TextFeatureCache
from scalegen.eval.report import format_table
from scalegen.eval.retrieval import clip_score, distractors, r_at_1
from scalegen.render.base import Renderer

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".webp")
ROW_FORMAT = 1  # bump when the per-prompt row changes: old progress is then refused, not misread


@dataclass
class Protocol:
    name: str
    model: str  # see clip_models.load_clip
    views: int
    azimuths: Literal["even", "inclusive"]  # even: i*360/V; inclusive: linspace(0, 360, V) (ScaleDreamer)
    elevation: float  # degrees
    resolution: int  # rendered pixels per side
    crop: Literal["left", "center"]  # left: the left square (ScaleDreamer's grids); center: CLIP's CenterCrop
    resize: Literal["bilinear", "bicubic"]  # to the model's input size (antialiased, like PIL)
    caption_prefix: str
    clipscore_w: float
    distractors: int  # k of the distractor R@1
    seed: int  # distractor draw
    splits: list[str] = field(default_factory=lambda: ["test"])
    distance: float | None = None  # camera distance; None = the run's camera.eval_distance
    fovy: float | None = None  # degrees; None = the run's camera.eval_fovy
    headline: Literal["all", "distractors"] = "all"  # the R@1 the protocol's paper reports
    # --ckpt views: "field", the run's renderer (its field over its background); "mesh", the mesh `scalegen
    # generate` exports, centred on its bounding box and scaled so its longest side spans [-mesh_bound,
    # mesh_bound] (kiui's Mesh.load, TriplaneTurbo's renderer), its vertex colours unlit on white
    view_source: Literal["field", "mesh"] = "field"
    mesh_bound: float = 0.9
    mesh_resolution: int = 128  # marching-cubes cells per axis (`scalegen generate`'s default)


PROTOCOLS = {
    "scaledreamer": Protocol("scaledreamer", "openai/clip-vit-large-patch14", views=120, azimuths="inclusive",
                             elevation=15.0, resolution=512, crop="left", resize="bilinear", caption_prefix="",
                             clipscore_w=2.5, distractors=99, seed=0, splits=["test"], headline="all"),
    "triplaneturbo": Protocol("triplaneturbo", "ViT-B-32-quickgelu:openai", views=4, azimuths="even", elevation=15.0,
                              resolution=512, crop="center", resize="bicubic", caption_prefix="A photo depicts",
                              clipscore_w=2.5, distractors=99, seed=0, splits=["test"], distance=3.0, fovy=50.0,
                              headline="all", view_source="mesh"),
    "scalegen": Protocol("scalegen", "openai/clip-vit-large-patch14", views=8, azimuths="even", elevation=15.0,
                         resolution=224, crop="center", resize="bicubic", caption_prefix="", clipscore_w=2.5,
                         distractors=99, seed=0, splits=["test", "val"], headline="distractors"),
}


def make_protocol(name: str, **overrides) -> Protocol:
    """Preset ``name`` with the non-None ``overrides`` applied (checked: positive counts, known names)."""
    if name not in PROTOCOLS:
        raise ScalegenError(f"unknown protocol '{name}'; choose from {', '.join(PROTOCOLS)}")
    p = dataclasses.replace(PROTOCOLS[name], **{k: v for k, v in overrides.items() if v is not None})
    for key in ("views", "resolution", "mesh_resolution"):
        if getattr(p, key) < 1:
            raise ScalegenError(f"--{key} must be at least 1, got {getattr(p, key)}")
    if p.distractors < 1:
        raise ScalegenError(f"--distractors must be at least 1, got {p.distractors}")
    return p


def azimuth_degrees(p: Protocol) -> list[float]:
    if p.azimuths == "inclusive":
        return torch.linspace(0.0, 360.0, p.views).tolist()
    return [i * 360.0 / p.views for i in range(p.views)]


# --- images -> CLIP pixels -------------------------------------------------------------------
def clip_pixels(images: Tensor, size: int, crop: str, resize: str, mean, std) -> Tensor:
    """uint8 [N, 3, H, W] -> normalised float [N, 3, size, size] per the protocol's crop/resize."""
    x = images.float()
    h, w = x.shape[-2:]
    if crop == "left":  # PIL crop((0, 0, h, h)): the first square of a side-by-side grid, then resize
        s = min(h, w)
        x = x[..., :s, :s]
        x = torch.nn.functional.interpolate(x, size=(size, size), mode=resize, antialias=True, align_corners=False)
    else:  # Resize(size) on the shorter side, then CenterCrop(size)
        scale = size / min(h, w)
        nh, nw = max(size, round(h * scale)), max(size, round(w * scale))
        x = torch.nn.functional.interpolate(x, size=(nh, nw), mode=resize, antialias=True, align_corners=False)
        top, left = (nh - size) // 2, (nw - size) // 2
        x = x[..., top:top + size, left:left + size]
    x = x.clamp(0, 255).round() / 255.0  # PIL resizes in uint8
    m = torch.tensor(mean, dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
    s = torch.tensor(std, dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
    return (x - m) / s


def to_uint8(rgb: Tensor) -> Tensor:
    """float [..., 3, H, W] in [0, 1] -> uint8, rounded as an 8-bit PNG stores it."""
    return (rgb.clamp(0, 1) * 255 + 0.5).to(torch.uint8)


# --- the corpus ------------------------------------------------------------------------------
@dataclass
class Pool:
    """The prompts scored (unique, corpus order) and whether each is in the corpus' train split
    (``seen`` is None when the corpus has no train split to compare with)."""

    prompts: list[str]
    seen: list[bool] | None
    splits: list[str]  # the splits actually read

    def digest(self) -> str:
        return hashlib.sha1("\n".join(self.prompts).encode()).hexdigest()


def _shard_prompts(source: str, split: str) -> list[str]:
    from scalegen.data.stream import ShardStream  # noqa: PLC0415

    return [p for b in ShardStream(source, split, batch_size=4096, mode="eval") for p in b.prompts]


def read_pool(corpus: str, splits: list[str]) -> Pool:
    """Unique prompts of ``splits`` of a corpus file or shard folder. A missing ``test`` split falls
    back to ``val`` (ScaleDreamer's rule); a file without splits (text, CSV, JSON lines, a JSON list)
    is read whole."""
    is_shards = Path(corpus).is_dir()
    if is_shards:
        from scalegen.data.shards import load_manifest  # noqa: PLC0415

        available = list(load_manifest(corpus)[0]["splits"])
        read = lambda s: _shard_prompts(corpus, s)  # noqa: E731
    else:
        available = corpus_splits(corpus)
        read = lambda s: read_corpus(corpus, split=s, split_flag="--split")  # noqa: E731
    has_splits = is_shards or available != ["train"] or _is_mapping(corpus)
    if not has_splits:
        chosen = ["train"]
    else:
        chosen = []
        for s in splits:
            if s in available:
                chosen.append(s)
            elif s == "test" and "val" in available and "val" not in splits:
                chosen.append("val")
        if not chosen:
            raise DataError(f"corpus '{corpus}' has none of the splits {', '.join(splits)} (it has "
                            f"{', '.join(available)}); pass --split with one of them")
    prompts: list[str] = []
    for s in chosen:
        prompts += read(s)
    prompts = list(dict.fromkeys(prompts))
    if not prompts:
        raise DataError(f"corpus '{corpus}' (splits {', '.join(chosen)}) holds no prompts")
    seen = None
    if has_splits and "train" in available:
        train = set(prompts) if chosen == ["train"] else set(read("train"))
        seen = [p in train for p in prompts]
    return Pool(prompts, seen, chosen)


def _is_mapping(corpus: str) -> bool:
    p = Path(corpus)
    if p.suffix.lower() != ".json" or not p.is_file():
        return False
    return isinstance(json.loads(p.read_text()), dict)


# --- where views come from -------------------------------------------------------------------
def protocol_cameras(protocol: Protocol, distance: float, fovy: float):
    """The protocol's shared orbit, [1, V] cameras."""
    from scalegen.data.cameras import make_cameras  # noqa: PLC0415

    full = lambda x: torch.full((1, protocol.views), float(x))  # noqa: E731
    return make_cameras(full(protocol.elevation), torch.tensor([azimuth_degrees(protocol)]), full(distance),
                        full(fovy), protocol.resolution, protocol.resolution)


@torch.no_grad()
def render_views(model, text_encoder, renderer: Renderer, cameras: Cameras, prompts: list[str], samples: int,
                 importance_samples: int, device, ray_budget: int = 1 << 18) -> list[Tensor]:
    """uint8 [V, 3, R, R] per prompt: a SceneModel's renders on shared ``cameras`` [1, V], views in
    chunks of at most ``ray_budget`` rays (512 px x 120 views never sits in memory at once)."""
    field_, bg = model(text_encoder.encode(prompts).to(device))
    b, v, r = len(prompts), cameras.shape[1], cameras.height
    step = max(1, ray_budget // (b * r * r))
    rgb = []
    for s in range(0, v, step):
        sub = cameras.map(lambda t: t[:, s:s + step])
        out = renderer(field_, sub, background=bg, **renderer.eval_options(samples, importance_samples))
        rgb.append(to_uint8(out.rgb).view(b, -1, 3, r, r).cpu())
    return list(torch.cat(rgb, dim=1))


class ViewSource:
    """Where CLIP evaluation gets each prompt's views (uint8 [V, 3, H, W]): a run rendered on the
    protocol's orbit (``RunViews``) or images some system rendered (``FolderViews``)."""

    def describe(self) -> dict:
        """What the source is, merged into the summary's protocol entry."""
        raise NotImplementedError

    def identity(self) -> dict:
        """What must not change for partial results in OUT/ to be resumed."""
        raise NotImplementedError

    def views(self, prompts: list[str]) -> list[Tensor]:
        raise NotImplementedError

    # --- optional ------------------------------------------------------------------------------------
    def has_views(self, prompt: str) -> bool:
        """Whether the source has views of ``prompt`` (default: every prompt can be rendered)."""
        return True

    def views_per_prompt(self, protocol: Protocol) -> int:
        """How many views a prompt is expected to have, to size the scoring batches (default: the protocol's)."""
        return protocol.views

    def cameras_as_rendered(self) -> bool:
        """True when the views came with their own cameras, so the protocol's orbit does not describe
        them (default False: the source renders the protocol's orbit)."""
        return False

    def summary_extra(self) -> dict:
        """Extra summary entries (default none)."""
        return {}


class RunViews(ViewSource):
    """Views of a trained run, rendered on the protocol's orbit (the run's eval samples per ray)."""

    def __init__(self, cfg, text_encoder, model, ckpt, protocol: Protocol, device):
        """``(cfg, text_encoder, model, ckpt)`` as ``train.model.load_run`` returns them."""
        from scalegen.render import build_renderer  # noqa: PLC0415

        self.cfg, self.text_encoder, self.ckpt = cfg, text_encoder, ckpt
        self.model = model.to(device)
        self.renderer = build_renderer(self.cfg).eval().to(device)
        self.device = torch.device(device)
        c = self.cfg.camera
        self.distance = protocol.distance if protocol.distance is not None else c.eval_distance
        self.fovy = protocol.fovy if protocol.fovy is not None else c.eval_fovy
        self.cameras = protocol_cameras(protocol, self.distance, self.fovy).to(device)

    def describe(self) -> dict:
        return {"source": "ckpt", "checkpoint": str(self.ckpt), "distance": self.distance, "fovy": self.fovy,
                "render_samples": self.cfg.eval.samples, "render_importance_samples": self.cfg.eval.importance_samples}

    def identity(self) -> dict:
        w = Path(self.ckpt) / "model.safetensors"
        st = w.stat() if w.is_file() else None
        return {"checkpoint": str(Path(self.ckpt).resolve()), "weights": [st.st_size, st.st_mtime_ns] if st else None}

    def views(self, prompts: list[str]) -> list[Tensor]:
        return render_views(self.model, self.text_encoder, self.renderer, self.cameras, prompts, self.cfg.eval.samples,
                            self.cfg.eval.importance_samples, self.device)


def fit_to_box(verts: Tensor, bound: float) -> Tensor:
    """``verts`` [N, 3] centred on their bounding box and scaled so the longest side spans [-bound, bound]
    (kiui's ``Mesh.auto_size``, which TriplaneTurbo's renders go through)."""
    lo, hi = verts.amin(0), verts.amax(0)
    return (verts - (lo + hi) / 2) * (2 * bound / (hi - lo).max().clamp(min=1e-12))


class MeshViews(RunViews):
    """Views of a trained run as TriplaneTurbo scores them (``evaluation/mesh_visualize.py``: kiui's ``kire``
    renderer in albedo mode, radius 3, fovy 50, white background): each prompt's mesh exported as `scalegen
    generate` exports it (``export.mesh.extract_meshes`` at ``render_level(render.beta)``), fitted to the
    protocol's ``mesh_bound`` box, its vertex colours rendered unlit on white (``render.raster.shade_unlit``).
    A prompt whose shape is empty (no surface) is scored on blank white views, as the reference's renderer
    would show it, and counted in ``empty``."""

    def __init__(self, cfg, text_encoder, model, ckpt, protocol: Protocol, device):
        super().__init__(cfg, text_encoder, model, ckpt, protocol, device)
        self.protocol = protocol
        self.cameras = self.cameras.to("cpu")
        self.empty: list[str] = []

    def describe(self) -> dict:
        return {"source": "ckpt_mesh", "checkpoint": str(self.ckpt), "distance": self.distance, "fovy": self.fovy,
                "mesh_bound": self.protocol.mesh_bound, "mesh_resolution": self.protocol.mesh_resolution,
                "shading": "unlit vertex colours on white"}

    def _meshes(self, prompts: list[str]):
        from scalegen.export.mesh import extract_meshes, render_level  # noqa: PLC0415

        field_, _ = self.model(self.text_encoder.encode(prompts).to(self.device))
        return extract_meshes(field_, self.cfg.render.bound, self.protocol.mesh_resolution,
                              render_level(self.cfg.render.beta), names=prompts)

    @torch.no_grad()
    def views(self, prompts: list[str]) -> list[Tensor]:
        from scalegen.render.raster import shade_unlit  # noqa: PLC0415

        try:
            meshes = self._meshes(prompts)
        except ExportError:  # some prompt has no surface: export the others one by one
            meshes = []
            for p in prompts:
                try:
                    meshes += self._meshes([p])
                except ExportError:
                    meshes.append(None)
                    self.empty.append(p)
                    print(f"note: the shape of {p!r} has no surface; it is scored on blank white views", flush=True)
        out = []
        r = self.protocol.resolution
        for m in meshes:
            if m is None:
                out.append(torch.full((self.protocol.views, 3, r, r), 255, dtype=torch.uint8))
                continue
            verts = fit_to_box(torch.from_numpy(m.verts).float(), self.protocol.mesh_bound)
            rgb, _ = shade_unlit(verts, torch.from_numpy(m.faces).long(), torch.from_numpy(m.colours), self.cameras)
            out.append(to_uint8(rgb))
        return out


def run_views(cfg, text_encoder, model, ckpt, protocol: Protocol, device) -> RunViews:
    """The --ckpt view source of ``protocol``: the run's renders (``view_source: field``) or its mesh (``mesh``)."""
    cls = MeshViews if protocol.view_source == "mesh" else RunViews
    return cls(cfg, text_encoder, model, ckpt, protocol, device)


def folder_key(text: str) -> str:
    """What survives both references' folder naming: ScaleDreamer drops ',' and '.' and writes '_'
    for ' '; TriplaneTurbo reads '_' back as ' '."""
    return " ".join(text.replace(",", "").replace(".", "").replace("_", " ").split())


def folder_name(prompt: str) -> str:
    """ScaleDreamer's result-folder name of ``prompt`` (``test_step`` in their system); names over
    200 bytes are cut and end in '~' + 10 hex digits of the prompt's SHA-1, which ``match`` reads."""
    name = prompt.replace(",", "").replace(".", "").replace(" ", "_").replace("/", "_")
    if len(name.encode()) > 200:
        name = name.encode()[:180].decode(errors="ignore") + "~" + hashlib.sha1(prompt.encode()).hexdigest()[:10]
    return name


class FolderViews(ViewSource):
    """Views rendered by any system: ``DIR/<prompt folder>/<view>.png|jpg`` (any number of views per
    prompt, any file names). Folder names are matched to the corpus' prompts ignoring commas, full
    stops and '_' vs ' ' (ScaleDreamer's and TriplaneTurbo's layouts both work)."""

    def __init__(self, root: str, pool: Pool, glob: str = "*"):
        self.root = Path(root)
        if not self.root.is_dir():
            raise DataError(f"--images '{root}' is not a folder; give DIR/<prompt>/<view>.png")
        keyed: dict[str, list[str]] = {}
        for p in pool.prompts:
            keyed.setdefault(folder_key(p), []).append(p)
        by_hash = {hashlib.sha1(p.encode()).hexdigest()[:10]: p for p in pool.prompts}
        self.folders: dict[str, Path] = {}
        unknown, ambiguous = [], []
        for d in sorted(x for x in self.root.iterdir() if x.is_dir()):
            files = [f for f in d.glob(glob) if f.suffix.lower() in IMAGE_SUFFIXES and f.is_file()]
            if not files:
                continue
            if "~" in d.name and d.name.rsplit("~", 1)[1] in by_hash:
                hits = [by_hash[d.name.rsplit("~", 1)[1]]]
            else:
                hits = keyed.get(folder_key(d.name), [])
            if len(hits) > 1:
                ambiguous.append((d.name, hits))
            elif not hits:
                unknown.append(d.name)
            else:
                self.folders[hits[0]] = d
        if ambiguous:
            name, hits = ambiguous[0]
            raise DataError(f"folder '{name}' matches {len(hits)} corpus prompts ({hits[0]!r}, {hits[1]!r}) once commas "
                            "and full stops are dropped; rename it to the exact prompt")
        if unknown:
            raise DataError(f"{len(unknown)} folder(s) in '{root}' match no prompt of the corpus split(s), e.g. "
                            f"'{unknown[0]}'; pass the corpus and --split the views were rendered from")
        if not self.folders:
            raise DataError(f"'{root}' has no prompt folders with images; expected DIR/<prompt>/<view>.png")
        self.glob = glob
        self.missing = [p for p in pool.prompts if p not in self.folders]

    def describe(self) -> dict:
        return {"source": "images", "images": str(self.root.resolve()), "glob": self.glob,
                "prompts_without_images": len(self.missing)}

    def identity(self) -> dict:
        return {"images": str(self.root.resolve())}

    def has_views(self, prompt: str) -> bool:
        return prompt in self.folders

    def views_per_prompt(self, protocol: Protocol) -> int:
        return 8  # any number per prompt: a guess for batching only

    def cameras_as_rendered(self) -> bool:
        return True

    def summary_extra(self) -> dict:
        return {"prompts_without_images": len(self.missing)}

    def views(self, prompts: list[str]) -> list[Tensor]:
        from PIL import Image  # noqa: PLC0415

        out = []
        for p in prompts:
            files = sorted(f for f in self.folders[p].glob(self.glob) if f.suffix.lower() in IMAGE_SUFFIXES)
            imgs = []
            for f in files:
                try:
                    with Image.open(f) as im:
                        imgs.append(torch.from_numpy(np.array(im.convert("RGB"))).permute(2, 0, 1))
                except OSError as e:
                    raise DataError(f"cannot read image '{f}' ({e}); delete or re-render it") from None
            shapes = {tuple(i.shape) for i in imgs}
            if len(shapes) > 1:
                raise DataError(f"images of '{self.folders[p]}' differ in size ({sorted(shapes)[:2]}); render every "
                                "view of a prompt at one size")
            out.append(torch.stack(imgs))
        return out


# --- scoring ---------------------------------------------------------------------------------
@torch.no_grad()
def prompt_rows(views: list[Tensor], own: list[int], text: Tensor, prompts_sorted: list[str], clip: ClipModel,
                protocol: Protocol, batch: int) -> list[dict]:
    """Metrics of a group of prompts: ``views[j]`` uint8 [V_j, 3, H, W] of the prompt in column
    ``own[j]`` of ``text`` [N, D] (unit text features of the sorted pool)."""
    n = text.shape[0]
    pixels = [clip_pixels(v.to(clip.device), clip.image_size, protocol.crop, protocol.resize, clip.mean, clip.std)
              for v in views]
    flat = torch.cat(pixels)
    feats = torch.cat([clip.encode_images(flat[s:s + batch]) for s in range(0, len(flat), batch)])
    rows, start = [], 0
    for j, px in enumerate(pixels):
        f = feats[start:start + len(px)]
        start += len(px)
        sims = f @ text.T  # [V, N] cosines (unit vectors)
        cand = torch.tensor([own[j]] + distractors(own[j], n, protocol.distractors, protocol.seed), device=sims.device)
        cos = sims[:, own[j]]
        rows.append({
            "n_views": len(px),
            "clip_similarity": float(cos.mean()),
            "clip_score": float(clip_score(cos, protocol.clipscore_w).mean()),
            "r_at_1_all": float(r_at_1(sims, own[j]).mean()),
            "r_at_1_distractors": float(r_at_1(sims[:, cand], 0).mean()),
            "retrieved": prompts_sorted[int(sims.mean(0).argmax())],
        })
    return rows


METRICS = ("clip_similarity", "clip_score", "r_at_1_all", "r_at_1_distractors")


def summarise(rows: list[dict], n_pool: int, k_eff: int) -> dict:
    def group(rs: list[dict]) -> dict:
        out = {m: float(np.mean([r[m] for r in rs])) for m in METRICS}
        return {**out, "n_prompts": len(rs), "n_images": int(sum(r["n_views"] for r in rs))}

    res = group(rows)
    res["chance_all"], res["chance_distractors"] = 1.0 / n_pool, 1.0 / (k_eff + 1)
    seen = [r for r in rows if r["seen"] is True]
    unseen = [r for r in rows if r["seen"] is False]
    if seen and unseen:
        res["seen"], res["unseen"] = group(seen), group(unseen)
    return res


def _read_progress(out: Path) -> dict[int, dict]:
    rows: dict[int, dict] = {}
    for part in sorted((out / "progress").glob("part-*.jsonl")):
        for line in part.read_text().splitlines():
            try:
                r = json.loads(line)
            except json.JSONDecodeError:
                continue  # a line cut by a crash: that prompt is scored again
            rows[int(r["index"])] = r
    return rows


def _open_part(out: Path, rank: int):
    """This rank's progress file for appending; a torn last line (crash mid-write) is cut first."""
    path = out / "progress" / f"part-{rank}.jsonl"
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.is_file():
        data = path.read_bytes()
        if data and not data.endswith(b"\n"):
            with path.open("r+b") as f:
                f.truncate(data.rfind(b"\n") + 1)
    return path.open("a")


def _atomic_write(path: Path, write) -> None:
    """``write(tmp)`` fills a temporary that then replaces ``path`` (scalegen.atomic)."""
    with atomic.writing(path) as tmp:
        write(tmp)


def _save_png(path: Path, image: Tensor) -> None:
    from PIL import Image  # noqa: PLC0415

    path.parent.mkdir(parents=True, exist_ok=True)
    _atomic_write(path, lambda t: Image.fromarray(image.permute(1, 2, 0).numpy()).save(t, format="PNG"))


def _thumb_row(views: Tensor, n: int = 8, size: int = 96, gap: int = 2) -> Tensor:
    """Up to ``n`` evenly spaced views, each resized to ``size``, side by side on white
    (uint8 [3, size, n * (size + gap) - gap])."""
    idx = torch.linspace(0, len(views) - 1, min(n, len(views))).round().long()
    v = views[idx].float()
    s = min(v.shape[-2:])
    v = torch.nn.functional.interpolate(v[..., :s, :s], size=(size, size), mode="bilinear", antialias=True)
    v = torch.nn.functional.pad(v.clamp(0, 255).round(), (0, gap), value=255.0)
    return torch.cat(list(v), dim=2)[..., :-gap].to(torch.uint8)


def contact_prompts(pool: Pool, n: int) -> list[int]:
    """Corpus indices of the prompts on the contact sheet: the first ``n``, half seen and half
    unseen when the corpus has both."""
    if pool.seen and any(pool.seen) and not all(pool.seen):
        s = [i for i, x in enumerate(pool.seen) if x][: (n + 1) // 2]
        u = [i for i, x in enumerate(pool.seen) if not x][: n // 2]
        return sorted(s + u)
    return list(range(min(n, len(pool.prompts))))


def write_contact_sheet(path: Path, out: Path, rows: list[dict], size: int = 96) -> int:
    """A grid of views per prompt (a row each) with its prompt and scores, from ``OUT/thumbs``."""
    from PIL import Image, ImageDraw  # noqa: PLC0415

    entries = [(r, out / "thumbs" / f"{r['index']:07d}.png") for r in rows]
    entries = [(r, p) for r, p in entries if p.is_file()]
    if not entries:
        return 0
    thumbs = [Image.open(p).convert("RGB") for _, p in entries]
    label_h, pad = 26, 4
    width = max(t.width for t in thumbs) + 2 * pad
    sheet = Image.new("RGB", (max(width, 480), len(entries) * (size + label_h + pad) + pad), "white")
    draw = ImageDraw.Draw(sheet)
    y = pad
    for (r, _), t in zip(entries, thumbs):
        tag = "" if r["seen"] is None else (" [seen]" if r["seen"] else " [unseen]")
        draw.text((pad, y), (r["prompt"][:90] + tag), fill=(0, 0, 0))
        hit = "" if r["retrieved"] == r["prompt"] else f"  retrieves: {r['retrieved'][:50]}"
        draw.text((pad, y + 12), f"sim {r['clip_similarity']:.3f}  R@1 all {r['r_at_1_all']:.2f}  "
                                 f"R@1 k {r['r_at_1_distractors']:.2f}{hit}", fill=(90, 90, 90))
        sheet.paste(t, (pad, y + label_h))
        y += size + label_h + pad
    _atomic_write(path, lambda tmp: sheet.save(tmp, format="PNG"))
    return len(entries)


def markdown_table(summary: dict) -> str:
    p = summary["protocol"]
    if p["source"] == "images":
        how = f"views read from {p['images']}"
    else:
        how = f"{p['views']} views at {p['resolution']} px, elevation {p['elevation']:g}"
    lines = [f"CLIP evaluation, protocol `{p['name']}` ({p['model']}, {how}, caption prefix {p['caption_prefix']!r})", "",
             f"| prompts | n | CLIP similarity | CLIPScore (w={p['clipscore_w']:g}) | R@1 vs all ({summary['n_pool']}) "
             f"| R@1 vs {summary['k_distractors']} distractors |",
             "| --- | ---: | ---: | ---: | ---: | ---: |"]
    groups = [("all", summary)] + [(g, summary[g]) for g in ("seen", "unseen") if g in summary]
    for g, r in groups:
        lines.append(f"| {g} | {r['n_prompts']} | {r['clip_similarity']:.4f} | {r['clip_score']:.4f} | "
                     f"{r['r_at_1_all']:.3f} | {r['r_at_1_distractors']:.3f} |")
    lines.append(f"| chance | | | | {summary['chance_all']:.3f} | {summary['chance_distractors']:.3f} |")
    return "\n".join(lines) + "\n"


def people_table(summary: dict) -> str:
    groups = [("all", summary)] + [(g, summary[g]) for g in ("seen", "unseen") if g in summary]
    rows = [[g, r["n_prompts"], r["clip_similarity"], r["clip_score"], r["r_at_1_all"], r["r_at_1_distractors"]]
            for g, r in groups]
    rows.append(["chance", "-", "-", "-", summary["chance_all"], summary["chance_distractors"]])
    return format_table(rows, ["prompts", "n", "CLIP sim", "CLIPScore", f"R@1 all ({summary['n_pool']})",
                               f"R@1 {summary['k_distractors']}+1"])


def evaluate_clip(source: ViewSource, pool: Pool, protocol: Protocol, clip: ClipModel, out: str | Path, cache_dir: str | Path,
                  state=None, batch: int = 64, contact: int = 16, save_views: bool = False, overwrite: bool = False,
                  progress: bool = True) -> dict:
    """Score ``source`` (a ``ViewSource``: RunViews or FolderViews) on ``pool`` under ``protocol``; writes OUT/ and returns
    the summary (the same dict as OUT/summary.json). ``state``: an accelerate ``PartialState``
    (None: one process)."""
    from tqdm import tqdm  # noqa: PLC0415

    rank = state.process_index if state is not None else 0
    world = state.num_processes if state is not None else 1
    is_main = rank == 0
    barrier = state.wait_for_everyone if state is not None else (lambda: None)
    out = Path(out)
    t0 = time.perf_counter()

    prompts_sorted = sorted(pool.prompts)
    column = {p: i for i, p in enumerate(prompts_sorted)}
    k_eff = min(protocol.distractors, len(prompts_sorted) - 1)
    if k_eff < 1:
        raise DataError("CLIP retrieval needs at least 2 distinct prompts; the corpus split has 1")
    effective = {**dataclasses.asdict(protocol), "azimuth_degrees": azimuth_degrees(protocol),
                 "model_id": clip.model_id, "backend": clip.backend, "image_size": clip.image_size,
                 "mean": list(clip.mean), "std": list(clip.std), "splits": pool.splits,
                 "distractors_effective": k_eff, "ties": "shared (a tie of m at the maximum counts 1/m)",
                 "aggregation": "per view, mean over a prompt's views, then mean over prompts",
                 **source.describe()}
    if source.cameras_as_rendered():
        for k in ("views", "azimuths", "azimuth_degrees", "elevation", "resolution", "distance", "fovy", "view_source",
                  "mesh_bound", "mesh_resolution"):
            effective[k] = "as rendered"
    identity = {"row_format": ROW_FORMAT, "pool": pool.digest(), "model_id": clip.model_id,
                "protocol": {k: v for k, v in effective.items() if k not in ("prompts_without_images",)},
                **source.identity()}
    ident_path = out / "identity.json"
    if is_main:
        out.mkdir(parents=True, exist_ok=True)
        if ident_path.is_file() and json.loads(ident_path.read_text()) != identity:
            if not overwrite:
                old = json.loads(ident_path.read_text())
                diff = sorted(k for k in set(old) | set(identity) if old.get(k) != identity.get(k))
                raise ScalegenError(f"'{out}' holds results of another evaluation ({', '.join(diff)} differ); give a "
                                    "new --out, or --overwrite to discard them")
        if overwrite or not ident_path.is_file():
            for sub in ("progress", "thumbs", "views"):
                shutil.rmtree(out / sub, ignore_errors=True)
            _atomic_write(ident_path, lambda t: t.write_text(json.dumps(identity, indent=1) + "\n"))
    barrier()

    # Text features: computed once (the main process fills the cache, the others read it).
    cache = TextFeatureCache(cache_dir, clip)
    texts = [protocol.caption_prefix + p for p in prompts_sorted]
    if is_main:
        text = cache.features(texts, write=True, progress=progress)
    barrier()
    if not is_main:
        text = cache.features(texts, write=False)

    done = _read_progress(out)
    barrier()
    todo_all = [i for i in range(len(pool.prompts)) if i not in done and
                source.has_views(pool.prompts[i])]
    mine = todo_all[rank::world]
    sheet = set(contact_prompts(pool, contact))
    group = max(1, batch // source.views_per_prompt(protocol))
    text = text.to(clip.device)
    bar = tqdm(total=len(mine), desc=f"clip {protocol.name}" + (f" (rank 0 of {world})" if world > 1 else ""),
               unit="prompt", disable=not (progress and is_main))
    n_images = 0
    with _open_part(out, rank) as part:
        for s in range(0, len(mine), group):
            idx = mine[s:s + group]
            prompts = [pool.prompts[i] for i in idx]
            views = source.views(prompts)
            rows = prompt_rows(views, [column[p] for p in prompts], text, prompts_sorted, clip, protocol, batch)
            for i, p, v, r in zip(idx, prompts, views, rows):
                if save_views:
                    for j, img in enumerate(v):
                        _save_png(out / "views" / folder_name(p) / f"{j}.png", img)
                if i in sheet:
                    _save_png(out / "thumbs" / f"{i:07d}.png", _thumb_row(v))
                r.update(index=i, prompt=p, seen=None if pool.seen is None else pool.seen[i])
                part.write(json.dumps(r) + "\n")
                n_images += len(v)
            part.flush()
            os.fsync(part.fileno())
            bar.update(len(idx))
    bar.close()
    barrier()
    score_s = time.perf_counter() - t0

    rows = sorted(_read_progress(out).values(), key=lambda r: r["index"])
    if not rows:
        raise DataError("no prompt was scored (no images matched the corpus)")
    summary = {**summarise(rows, len(prompts_sorted), k_eff), "n_pool": len(prompts_sorted), "k_distractors": k_eff,
               "protocol": effective, "eval_s": score_s}
    summary.update(source.summary_extra())
    if n_images and world == 1:
        summary["images_per_s"] = n_images / score_s
    if is_main:
        fields = ["index", "prompt", "seen", "n_views", *METRICS, "retrieved"]

        def write_csv(tmp: Path) -> None:
            with tmp.open("w", newline="") as f:
                w = csv.DictWriter(f, fieldnames=fields, extrasaction="ignore")
                w.writeheader()
                w.writerows(rows)

        _atomic_write(out / "per_prompt.csv", write_csv)
        _atomic_write(out / "summary.json", lambda t: t.write_text(json.dumps(summary, indent=2) + "\n"))
        _atomic_write(out / "summary.md", lambda t: t.write_text(markdown_table(summary)))
        write_contact_sheet(out / "contact_sheet.png", out, [r for r in rows if r["index"] in sheet])
    barrier()
    return summary
