"""``TextTo3DPipeline``: a trained generator as one Python object, the way the field ships models.

    from scalegen import TextTo3DPipeline
    pipe = TextTo3DPipeline.from_pretrained("runs/quickstart")   # a run, an exported folder or a Hub id
    pipe(["a small blue torus"])[0].save("torus.glb")

The command line loads through it too (``scalegen generate``, ``scalegen demo``), so the two never
disagree. ``save_pretrained`` writes the Hugging Face layout (``config.json``, ``model.safetensors``,
a model card) that ``from_pretrained`` reads back to the bit (``pretrained.py``).

The room sits on the top floor beside ``refine``, ``bench`` and ``cli``: it composes train (loading)
and export (meshes, renders).
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import torch

from scalegen.errors import DataError, ExportError, ScalegenError
from scalegen.export.files import check_format, to_trimesh, write_mesh
from scalegen.export.gaussian_ply import write_gaussian_ply
from scalegen.export.mesh import Mesh, extract_meshes, render_level
from scalegen.generators import GaussianScene
from scalegen.pipeline.pretrained import load_pretrained, push_to_hub, save_pretrained, world_of


@dataclass
class GaussianCloud:
    """The raw 3D Gaussians of a refined scene (what a 3DGS PLY holds)."""

    means: torch.Tensor
    log_scales: torch.Tensor
    quats: torch.Tensor
    opacity_logits: torch.Tensor
    sh: torch.Tensor

    def save(self, path: str | Path) -> Path:
        return write_gaussian_ply(path, self.means, self.log_scales, self.quats, self.opacity_logits, self.sh)


@dataclass
class Asset:
    """One prompt's result: its surface (``mesh``, a y-up ``trimesh.Trimesh``), optional renders
    (uint8 [V, H, W, 3] along the evaluation orbit) and, for a Gaussian scene, the Gaussians."""

    prompt: str
    surface: Mesh
    renders: Optional[np.ndarray] = None
    gaussians: Optional[GaussianCloud] = None

    @property
    def mesh(self):
        return to_trimesh(self.surface)

    def save(self, path: str | Path, format: Optional[str] = None) -> Path:
        """Write the asset (glb, obj or ply by ``format`` or the suffix), atomically. A Gaussian scene's
        ``.ply`` holds its Gaussians (what splat viewers read); its mesh goes to glb or obj."""
        fmt = check_format(format or Path(path).suffix)
        if fmt == "ply" and self.gaussians is not None:
            return self.gaussians.save(path)
        return write_mesh(self.surface, path, fmt)


class TextTo3DPipeline:
    """Prompts -> 3D assets in one forward pass of a trained generator (no optimisation).

    ``cfg`` is the run's resolved config, ``model`` its ``SceneModel`` (generator + background),
    ``text_encoder`` the frozen text encoder the generator was trained with.
    """

    def __init__(self, cfg, text_encoder, model, source: str = ""):
        self.cfg, self.text_encoder, self.model, self.source = cfg, text_encoder, model.eval(), source
        self.device = torch.device("cpu")
        self._world, self._world_known = None, False

    @property
    def world(self):
        """The oracle world the generator was trained in (its prompts, its ground truth), or None."""
        if not self._world_known:
            self._world, self._world_known = world_of(self.cfg), True
        return self._world

    @classmethod
    def from_pretrained(cls, name_or_path: str | Path, device: str | torch.device | None = None) -> "TextTo3DPipeline":
        """Load a run folder, a checkpoint folder, a folder ``save_pretrained`` wrote, or a Hugging Face
        Hub id from the local cache (``owner/name``; no download here: a missing one is a one-line error
        with the command that fetches it)."""
        cfg, text_encoder, model, source = load_pretrained(name_or_path)
        pipe = cls(cfg, text_encoder, model, source)
        return pipe.to(device) if device is not None else pipe

    def to(self, device: str | torch.device) -> "TextTo3DPipeline":
        self.device = torch.device(device)
        self.model.to(self.device)  # text conditions are moved to it per call (a CLIP tower stays put)
        return self

    @property
    def is_gaussian_scene(self) -> bool:
        return isinstance(self.model.generator, GaussianScene)

    def check_prompts(self, prompts: Sequence[str]) -> list[str]:
        """The prompts, whitespace-normalised; empty ones are refused (a mesh of nothing)."""
        out = [" ".join(str(p).split()) for p in prompts]
        for i, p in enumerate(out):
            if not p:
                raise ExportError(f"prompt {i + 1} is empty; every prompt must describe an asset")
        return out

    def check_world_prompts(self, prompts: Sequence[str], name: str | Path | None = None) -> None:
        """An oracle-world generator has only ever seen the world's grammar: a prompt outside it would give
        a mesh of nothing in particular, so it is refused (with the grammar), not exported. A per-prompt
        scene (`scalegen refine`) has only its own prompt. ``name``: how the user named the model."""
        cfg, name = self.cfg, name or self.source
        if cfg.data.prompt is not None and any(p.strip().lower() != cfg.data.prompt.strip().lower() for p in prompts):
            raise ScalegenError(f"'{name}' is the per-prompt scene of '{cfg.data.prompt}'; export that prompt (its "
                                "mesh.glb is already in the folder) or use an amortized run")
        world = self.world
        if world is None:  # a learned prior: any text
            return
        for p in prompts:
            try:
                world.parse(p)
            except DataError as e:
                shape = "a <size> <color> <shape>" if cfg.world.kind == "single" else "its compositional grammar"
                raise ScalegenError(f"'{name}' was trained in the oracle world, which only has prompts like "
                                    f"'{world.seen[0]}' ({shape}); {p!r} is not one of them ({e}), so its "
                                    "mesh would mean nothing: use a run trained with a real prior for free text") from None

    def noise(self, n: int, seed: Optional[int]) -> Optional[torch.Tensor]:
        """``z`` for ``n`` prompts: None (the generator's deterministic mean, what ``scalegen generate``
        writes) without a seed or for a generator that takes no noise, else N(0, I) drawn from ``seed``."""
        width = self.model.generator.noise_dim()
        if seed is None or width == 0:
            return None
        g = torch.Generator().manual_seed(int(seed))
        return torch.randn(n, width, generator=g).to(self.device)

    @torch.no_grad()
    def fields(self, prompts: Sequence[str], seed: Optional[int] = None):
        """(field, background) of a batch of prompts: the generator's raw output."""
        cond = self.text_encoder.encode(list(prompts)).to(self.device)
        z = self.noise(len(prompts), seed)
        return self.model.generator(cond, z), self.model.background.bind(cond)

    @torch.no_grad()
    def __call__(self, prompts: str | Sequence[str], seed: Optional[int] = None, resolution: int = 128,
                 batch_size: int = 16, renders: int = 0, render_size: int = 128, level: Optional[float] = None,
                 min_fragment: float = 0.02) -> list[Asset]:
        """One ``Asset`` per prompt: the surface extracted at ``resolution`` marching-cubes cells per axis
        (the level the volume renders show unless ``level``), and ``renders`` views of ``render_size``
        pixels along the evaluation orbit when asked for."""
        prompts = self.check_prompts([prompts] if isinstance(prompts, str) else prompts)
        if batch_size < 1:
            raise ExportError(f"batch_size must be at least 1, got {batch_size}")
        if not 8 <= resolution <= 1024:
            raise ExportError(f"resolution must be between 8 and 1024 cells, got {resolution}")
        gaussian = self.is_gaussian_scene
        iso = (0.0 if gaussian else render_level(self.cfg.render.beta)) if level is None else level
        assets: list[Asset] = []
        for s in range(0, len(prompts), batch_size):
            batch = prompts[s:s + batch_size]
            seed_b = None if seed is None else int(seed) + s  # each batch its own draw, reproducible
            field, background = self.fields(batch, seed_b)
            meshes = extract_meshes(field, self.cfg.render.bound, resolution, iso, min_fragment, names=batch)
            views = self.render(field, background, renders, render_size) if renders else [None] * len(batch)
            cloud = (GaussianCloud(field.means, field.log_scales, field.quats, field.opacity_logits, field.sh)
                     if gaussian else None)
            assets += [Asset(p, m, v, cloud) for p, m, v in zip(batch, meshes, views)]
        return assets

    def render(self, field, background, views: int, size: int) -> np.ndarray:
        """uint8 [B, views, size, size, 3] along the evaluation orbit (the turntable's cameras)."""
        from scalegen.export.turntable import render_turntables, turntable_cameras  # noqa: PLC0415
        from scalegen.render import build_renderer  # noqa: PLC0415

        renderer = build_renderer(self.cfg).eval().to(self.device)
        cams = turntable_cameras(self.cfg, views, size).to(self.device)
        return render_turntables(field, background, renderer, cams, self.cfg.eval.samples,
                                 self.cfg.eval.importance_samples)

    def save_pretrained(self, out: str | Path, **card) -> Path:
        """Write ``out`` in the Hugging Face layout (config.json, model.safetensors, README.md); ``card``
        takes what the model card reports (``eval_results``, ``eval_command``, ``gallery``, ...)."""
        return save_pretrained(self, out, **card)

    def push_to_hub(self, repo_id: str, folder: str | Path | None = None, private: bool = False, **card) -> str:
        """``save_pretrained`` into ``folder`` (a temporary one by default), then upload it with
        huggingface_hub (needs a token and network). Returns the repository's URL."""
        return push_to_hub(self, repo_id, folder, private=private, **card)
