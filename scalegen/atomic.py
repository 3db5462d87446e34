"""Atomic writes: every file and folder scalegen writes appears whole or not at all.

A crash, a Ctrl-C or a full disk in the middle of a write must leave the previous version (or
nothing), never half a file that a later command trusts. So a file is written to a temporary
sibling, flushed to disk, then renamed over its target (a rename within one filesystem is atomic on
POSIX, NFS included); a folder is built in a staging sibling and moved into place at the end.
This module is the one place that renames; it sits on the ground floor beside ``errors`` so every
room may use it.
"""
from __future__ import annotations

import json
import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


def _tmp_sibling(path: Path, tag: str) -> Path:
    """A hidden sibling unique to this process, so two writers never share a temporary. It keeps the
    suffix: some writers (imageio's ffmpeg, PIL, trimesh) choose the format by it."""
    return path.with_name(f".{path.stem}.{tag}-{os.getpid()}{path.suffix}")


def replace(src: str | Path, dst: str | Path) -> Path:
    """Move ``src`` over ``dst`` in one step (both on one filesystem)."""
    os.replace(src, dst)
    return Path(dst)


@contextmanager
def writing(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path to write; on success it replaces ``path``, on error it is removed.

    For writers that need a file name (safetensors, trimesh, imageio):
    ``with writing(p) as tmp: save_file(tensors, str(tmp))``.
    """
    path = Path(path)
    tmp = _tmp_sibling(path, "tmp")
    try:
        yield tmp
        if tmp.exists():
            with open(tmp, "rb+") as f:
                os.fsync(f.fileno())
        replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def write_bytes(path: str | Path, data: bytes) -> Path:
    """Write ``data`` to ``path`` atomically."""
    with writing(path) as tmp:
        tmp.write_bytes(data)
    return Path(path)


def write_text(path: str | Path, text: str) -> Path:
    """Write ``text`` (UTF-8) to ``path`` atomically."""
    return write_bytes(path, text.encode("utf-8"))


def write_json(path: str | Path, obj, indent: int | None = 2) -> Path:
    """Write ``obj`` as JSON (with a final newline) to ``path`` atomically."""
    return write_text(path, json.dumps(obj, indent=indent) + "\n")


@contextmanager
def staged_folder(dest: str | Path, overwrite: bool = False) -> Iterator[Path]:
    """Build a folder in a staging sibling and move it to ``dest`` only when the block succeeds.

    A refused or interrupted build leaves nothing at ``dest`` (and removes its staging folder), so
    the corrected command is never told the output already exists. ``dest`` must not exist, or be
    an empty folder (removed first); with ``overwrite`` an existing ``dest`` (the user asked to
    replace it) is removed only once the new folder is complete, so a failed build keeps the old one.
    """
    dest = Path(dest)
    stage = _tmp_sibling(dest, "staging")
    shutil.rmtree(stage, ignore_errors=True)
    stage.mkdir(parents=True)
    try:
        yield stage
        if overwrite and dest.is_dir() and not dest.is_symlink():
            shutil.rmtree(dest)
        elif overwrite and dest.exists():
            dest.unlink()
        elif dest.is_dir() and not any(dest.iterdir()):
            dest.rmdir()
        replace(stage, dest)
    finally:
        shutil.rmtree(stage, ignore_errors=True)
