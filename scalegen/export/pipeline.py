"""Prompts to asset files: the path behind ``scalegen generate`` and ``scalegen gallery``.

Per batch of prompts: generator forward (text encoding included) -> SDF on the grid pyramid ->
marching cubes -> [simplify] -> colours -> [UV atlas + baked texture] -> write -> [turntable],
each stage timed.

Nothing partial is left behind: every check a user can fail (prompts, format, output paths,
existing files) runs in ``plan_jobs``, before the model is loaded; files are written into a
staging folder beside their destination and renamed into place only once every prompt has
succeeded, so an empty shape in prompt 900 of 1000 leaves the output folder as it was.
"""
from __future__ import annotations

import json
import os
import shutil
import time
from dataclasses import dataclass, field as dataclass_field
from pathlib import Path
from typing import Callable, Optional

import torch

from scalegen import atomic
from scalegen.errors import ExportError
from scalegen.export.files import FORMATS, asset_name, check_format, mesh_bytes, write_atomic
from scalegen.export.mesh import StageTimes, extract_meshes, render_level
from scalegen.export.turntable import (crop_size, render_turntables, turntable_cameras, video_suffix,
                                       write_video)

MANIFEST = "assets.json"  # in an output folder: prompt -> files, what `scalegen gallery` reads
TEXTURE_FACES = 10_000  # --texture simplifies to this many faces unless --simplify says otherwise
TURNTABLE_MARGIN_BETAS = 6.0  # volume-rendered window: the meshes' projection grown by this many beta


@dataclass
class GenerateOptions:
    format: str = "glb"
    resolution: int = 128  # marching-cubes cells per axis
    level: Optional[float] = None  # SDF level of the surface; None: render_level(render.beta)
    min_fragment: float = 0.02  # drop pieces below this fraction of the largest (0 keeps all)
    simplify: Optional[int] = None  # at most this many faces; None: off, or TEXTURE_FACES with texture
    texture: bool = False  # UV atlas + baked base-colour texture (GLB only)
    texture_size: int = 1024
    turntable: bool = False
    turntable_frames: int = 24
    turntable_size: int = 128
    batch: int = 16  # prompts per generator call
    overwrite: bool = False


@dataclass
class Job:
    prompt: str
    mesh: Path  # final destination
    turntable: Optional[Path] = None


@dataclass
class Plan:
    jobs: list[Job]
    format: str  # glb, obj or ply
    folder: Optional[Path]  # folder output (with a manifest); None for a single file
    staging: Path  # where files are written before they are renamed into place
    creates_folder: bool = False
    times: StageTimes = dataclass_field(default_factory=StageTimes)


def check_options(opts: GenerateOptions, fmt: str) -> None:
    check_format(fmt)
    if opts.texture and fmt != "glb":
        raise ExportError(f"--texture bakes into a GLB; write a .glb (got {fmt})")
    if opts.resolution < 8 or opts.resolution > 1024:
        raise ExportError(f"--resolution must be between 8 and 1024 cells, got {opts.resolution}")
    if opts.batch < 1:
        raise ExportError("--batch must be at least 1")
    if opts.simplify is not None and opts.simplify < 4:
        raise ExportError("--simplify must be at least 4 faces")
    if opts.turntable and (opts.turntable_frames < 2 or opts.turntable_size < 16 or opts.turntable_size % 16):
        raise ExportError("turntables need at least 2 frames and a size that is a multiple of 16 (>= 16)")


def plan_jobs(prompts: list[str], out: str | Path, opts: GenerateOptions, single: bool,
              format_given: bool = False) -> Plan:
    """Destinations of every asset, checked: ``single`` (one ``--prompt``) writes the file ``out``
    (or into the folder ``out`` when that exists); otherwise one file per prompt in folder ``out``,
    named ``NNNN_<slug>.<format>``. Raises ``ExportError`` for anything that would fail later."""
    if not prompts:
        raise ExportError("no prompts given")
    for i, p in enumerate(prompts):
        if not p.strip():
            raise ExportError(f"prompt {i + 1} is empty; every prompt must describe an asset")
    fmt = check_format(opts.format)
    out = Path(out)
    suffixes = tuple(f".{f}" for f in FORMATS)
    video = video_suffix() if opts.turntable else None
    if single and not out.is_dir():
        if out.suffix.lower() not in suffixes:
            raise ExportError(f"cannot write '{out}': choose a file ending in {', '.join(suffixes)} (or an existing "
                              "folder)")
        if format_given and out.suffix.lower().lstrip(".") != fmt:
            raise ExportError(f"--format {fmt} contradicts '{out}'; drop --format or change the suffix")
        fmt = out.suffix.lower().lstrip(".")
        parent = out.parent if str(out.parent) else Path(".")
        _check_folder(parent)
        jobs = [Job(prompts[0], out, out.with_suffix(video) if video else None)]
        folder, staging, creates = None, parent / f".scalegen-staging-{os.getpid()}", False
    else:
        if out.suffix.lower() in suffixes:
            raise ExportError(f"with --prompts, --out must be a folder (one asset per prompt), not '{out}'")
        if out.exists() and not out.is_dir():
            raise ExportError(f"'{out}' is a file; give a folder for the assets")
        anchor = next((p for p in [out, *out.parents] if p.exists()), Path("."))
        _check_folder(anchor)
        names = [asset_name(i, p) for i, p in enumerate(prompts)]
        jobs = [Job(p, out / f"{n}.{fmt}", out / f"{n}{video}" if video else None)
                for p, n in zip(prompts, names)]
        folder, staging, creates = out, out / f".scalegen-staging-{os.getpid()}", not out.exists()
    check_options(opts, fmt)
    if not opts.overwrite:
        taken = [p for j in jobs for p in (j.mesh, j.turntable) if p is not None and p.exists()]
        if taken:
            more = f" (and {len(taken) - 1} more)" if len(taken) > 1 else ""
            raise ExportError(f"'{taken[0]}' already exists{more}; pass --overwrite to replace it")
    return Plan(jobs, fmt, folder, staging, creates)


def _check_folder(folder: Path) -> None:
    if not folder.is_dir():
        raise ExportError(f"folder '{folder}' does not exist; create it first")
    if not os.access(folder, os.W_OK):
        raise ExportError(f"folder '{folder}' is not writable")


@torch.no_grad()
def generate_assets(plan: Plan, cfg, model, text_encoder, opts: GenerateOptions,
                    log: Callable[[str], None] = print, checkpoint: str = "") -> dict:
    """Run ``plan``: every asset is generated and staged, then all are moved into place (and the
    folder's manifest updated). Returns the manifest entries and the seconds per stage."""
    from scalegen.render import build_renderer  # noqa: PLC0415

    level = render_level(cfg.render.beta) if opts.level is None else opts.level
    max_faces = opts.simplify if opts.simplify is not None else (TEXTURE_FACES if opts.texture else 0)
    renderer = build_renderer(cfg).eval() if opts.turntable else None
    cams = turntable_cameras(cfg, opts.turntable_frames, opts.turntable_size) if opts.turntable else None
    times = plan.times
    entries = []
    if plan.creates_folder:
        plan.folder.mkdir(parents=True)
    plan.staging.mkdir()
    t_start = time.perf_counter()
    try:
        for s in range(0, len(plan.jobs), opts.batch):
            batch = plan.jobs[s:s + opts.batch]
            prompts = [j.prompt for j in batch]
            t_batch = t = time.perf_counter()
            field, background = model(text_encoder.encode(prompts))
            t = times.add("generator", t)
            meshes = extract_meshes(field, cfg.render.bound, opts.resolution, level, opts.min_fragment, max_faces,
                                    names=prompts, times=times)
            t = time.perf_counter()
            if opts.texture:
                from scalegen.export.texture import bake_textures  # noqa: PLC0415 - optional dependency

                meshes = bake_textures(field, meshes, opts.texture_size)
                t = times.add("texture", t)
            for job, mesh in zip(batch, meshes):
                write_atomic(plan.staging / job.mesh.name, mesh_bytes(mesh, plan.format))
                entries.append({"prompt": job.prompt, "mesh": job.mesh.name, "vertices": len(mesh.verts),
                                "faces": len(mesh.faces), "textured": mesh.texture is not None,
                                "turntable": job.turntable.name if job.turntable else None})
            t = times.add("write", t)
            if opts.turntable:
                crop = crop_size([m.verts for m in meshes], cams, TURNTABLE_MARGIN_BETAS * cfg.render.beta)
                frames = render_turntables(field, background, renderer, cams, cfg.eval.samples,
                                           cfg.eval.importance_samples, crop=crop)
                for job, f in zip(batch, frames):
                    write_video(f, plan.staging / job.turntable.name)
                times.add("turntable", t)
            for e in entries[s:]:
                log(f"{e['mesh']}: {e['vertices']} vertices, {e['faces']} faces  ({e['prompt']})")
            log(f"batch {s // opts.batch + 1}/{-(-len(plan.jobs) // opts.batch)}: {len(batch)} assets in "
                f"{time.perf_counter() - t_batch:.2f} s")
        _commit(plan, entries, checkpoint)
    except BaseException:
        shutil.rmtree(plan.staging, ignore_errors=True)
        if plan.creates_folder and plan.folder.is_dir() and not any(plan.folder.iterdir()):
            plan.folder.rmdir()
        raise
    total = time.perf_counter() - t_start
    return {"assets": entries, "seconds": dict(times.seconds), "total_s": total,
            "seconds_per_asset": total / max(len(entries), 1)}


def _commit(plan: Plan, entries: list[dict], checkpoint: str) -> None:
    """Move every staged file into place, then write the folder's manifest (merged by file name)."""
    for job in plan.jobs:
        for dest in (job.mesh, job.turntable):
            if dest is not None:
                atomic.replace(plan.staging / dest.name, dest)
    plan.staging.rmdir()
    if plan.folder is not None:
        path = plan.folder / MANIFEST
        old = read_manifest(plan.folder) if path.is_file() else {"assets": []}
        new_names = {e["mesh"] for e in entries}
        assets = [e for e in old["assets"] if e["mesh"] not in new_names] + entries
        write_atomic(path, (json.dumps({"checkpoint": checkpoint, "assets": assets}, indent=1) + "\n").encode())


def read_manifest(folder: str | Path) -> dict:
    """The manifest of an asset folder written by ``scalegen generate --prompts``."""
    path = Path(folder) / MANIFEST
    try:
        data = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise ExportError(f"cannot read '{path}' ({e}); regenerate the folder with scalegen generate") from None
    if not isinstance(data, dict) or not isinstance(data.get("assets"), list):
        raise ExportError(f"'{path}' is not a scalegen asset manifest (no 'assets' list)")
    return data
