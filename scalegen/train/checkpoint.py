"""Atomic checkpoints: safetensors weights + a small state (optimizer, data position, RNG).

Layout of a run directory::

    RUN/config.yaml                       the resolved config of the run
    RUN/checkpoints/step_000100/          one checkpoint
        model.safetensors                 weights (no pickle)
        optimizer.pt                      optimizer state (loaded with weights_only=True)
        rng.pt                            RNG states (loaded with weights_only=True)
        state.json                        step, data position, world size
    RUN/checkpoints/latest                name of the newest complete checkpoint

A checkpoint is written into a temporary folder and renamed into place, then ``latest`` is
replaced atomically, so a crash at any moment leaves the previous checkpoint intact.
"""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from scalegen.errors import CheckpointError


def checkpoints_dir(run_dir: str | Path) -> Path:
    return Path(run_dir) / "checkpoints"


def latest_checkpoint(run_dir: str | Path) -> Path | None:
    d = checkpoints_dir(run_dir)
    marker = d / "latest"
    if marker.is_file():
        c = d / marker.read_text().strip()
        if (c / "model.safetensors").is_file():
            return c
    # Fall back to the newest complete folder (e.g. the marker was lost).
    done = sorted(p for p in d.glob("step_*") if (p / "state.json").is_file())
    return done[-1] if done else None


def _write_atomic_text(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(text)
    os.replace(tmp, path)


def temp_checkpoint_dir(run_dir: str | Path, step: int, fresh: bool = True) -> Path:
    """The temporary folder a checkpoint is written into before it is renamed into place; the same
    name on every rank (DeepSpeed's ranks each write their part into it). ``fresh``: (re)create it."""
    tmp = checkpoints_dir(run_dir) / f".tmp-step_{step:07d}"
    if fresh:
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir(parents=True)
    return tmp


def save_checkpoint(run_dir: str | Path, step: int, model_state: dict, optimizer_state: dict,
                    state: dict, rng: dict, keep: int = 2, tmp: Path | None = None) -> Path:
    """Write weights (safetensors), optimizer state, state.json and RNG into ``tmp`` (a fresh temporary
    folder unless given) and rename it to ``step_N``: a crash never leaves a half checkpoint as latest."""
    d = checkpoints_dir(run_dir)
    d.mkdir(parents=True, exist_ok=True)
    name = f"step_{step:07d}"
    final = d / name
    if tmp is None:
        tmp = temp_checkpoint_dir(run_dir, step)
    tensors = {k: v.detach().contiguous().cpu() for k, v in model_state.items()}
    save_file(tensors, str(tmp / "model.safetensors"))
    torch.save(optimizer_state, tmp / "optimizer.pt")
    torch.save(rng, tmp / "rng.pt")
    (tmp / "state.json").write_text(json.dumps({"step": step, **state}, indent=1))
    if final.exists():  # re-saving the same step (e.g. final save right after a periodic one)
        shutil.rmtree(final)
    os.rename(tmp, final)
    _write_atomic_text(d / "latest", name)
    old = sorted(p for p in d.glob("step_*") if p != final)
    for p in old[: max(len(old) - (keep - 1), 0)]:
        shutil.rmtree(p, ignore_errors=True)
    return final


def load_weights(ckpt: Path) -> dict[str, torch.Tensor]:
    try:
        return load_file(str(ckpt / "model.safetensors"))
    except Exception as e:  # noqa: BLE001 - any parse failure is the same user problem
        raise CheckpointError(f"checkpoint '{ckpt}' has unreadable weights ({e.__class__.__name__}); "
                              "resume from an earlier checkpoint or retrain") from None


def load_training_state(ckpt: Path) -> tuple[dict, dict, dict]:
    """(optimizer state, rng state, state.json) of a checkpoint, without executing pickles."""
    try:
        opt = torch.load(ckpt / "optimizer.pt", map_location="cpu", weights_only=True)
        rng = torch.load(ckpt / "rng.pt", map_location="cpu", weights_only=True)
        state = json.loads((ckpt / "state.json").read_text())
    except Exception as e:  # noqa: BLE001
        raise CheckpointError(f"checkpoint '{ckpt}' is incomplete or corrupt ({e.__class__.__name__}); "
                              "delete it to resume from the one before") from None
    return opt, rng, state


def checkpoint_step(ckpt: Path) -> int:
    """The training step a checkpoint folder holds (from its name, ``step_0000300``)."""
    return int(Path(ckpt).name.split("_")[-1])


def resolve_checkpoint(path: str | Path) -> Path:
    """A run directory or a checkpoint folder -> the checkpoint folder to load."""
    p = Path(path)
    if not p.exists():
        raise CheckpointError(f"'{path}' does not exist; pass a run directory written by `scalegen train`")
    if (p / "model.safetensors").is_file():
        return p
    c = latest_checkpoint(p)
    if c is None:
        raise CheckpointError(f"'{path}' holds no checkpoint yet; train longer than train.ckpt_every steps "
                              "or pass a run directory that has checkpoints/")
    return c


def run_dir_of(ckpt: Path) -> Path:
    return ckpt.parent.parent


def rng_state() -> dict:
    out = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        out["cuda"] = torch.stack(torch.cuda.get_rng_state_all())
    return out


def set_rng_state(rng: dict) -> None:
    torch.set_rng_state(rng["torch"])
    if "cuda" in rng and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(list(rng["cuda"]))
