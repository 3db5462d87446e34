"""Atomic checkpoints: safetensors weights + a small state (optimizer, data position, RNG).

Layout of a run directory::

    RUN/config.yaml                       the resolved config of the run
    RUN/checkpoints/step_000100/          one checkpoint
        model.safetensors                 weights (no pickle)
        optimizer.pt                      optimizer state (loaded with weights_only=True)
        rng.pt                            RNG states (loaded with weights_only=True)
        state.json                        step, data position, world size, sha256 of each file above
    RUN/checkpoints/latest                name of the newest complete checkpoint

A checkpoint is written into a temporary folder and renamed into place, then ``latest`` is
replaced atomically (``scalegen.atomic``), so a crash at any moment leaves the previous checkpoint
intact. Every file is checked against the sha256 that state.json records for it before it is used
(``verify_file``): a file changed after it was written (a disk or copy error, a byte flipped inside
the tensor data, which safetensors would load silently) is refused with its name.
"""
from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from scalegen import atomic
from scalegen.errors import CheckpointError

CHECKED_FILES = ("model.safetensors", "optimizer.pt", "rng.pt")  # their sha256 is recorded in state.json


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


def file_sha256(path: str | Path, chunk: int = 1 << 20) -> str:
    """sha256 of a file, read in 1 MiB chunks (streaming: memory does not grow with the file)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def read_state(ckpt: Path) -> dict:
    """A checkpoint's state.json, or a one-line error naming it."""
    try:
        state = json.loads((Path(ckpt) / "state.json").read_text())
        if not isinstance(state, dict):
            raise TypeError("not a JSON object")
    except Exception as e:  # noqa: BLE001 - missing, unreadable or garbage: the same user problem
        raise CheckpointError(f"checkpoint '{ckpt}' is incomplete or corrupt (state.json: {e.__class__.__name__}); "
                              "delete it to resume from the one before") from None
    return state


def verify_file(ckpt: Path, name: str, state: dict | None = None) -> Path:
    """``ckpt/name`` after checking it against the sha256 its state.json records (checkpoints written
    before digests were recorded are loaded unchecked)."""
    path = Path(ckpt) / name
    state = read_state(ckpt) if state is None else state
    want = state.get("files", {}).get(name)
    if want is None:
        return path
    if not path.is_file():
        raise CheckpointError(f"checkpoint file '{path}' is missing; delete checkpoint '{ckpt}' to resume from the "
                              "one before, or retrain")
    if file_sha256(path) != want:
        raise CheckpointError(f"checkpoint file '{path}' does not match the sha256 recorded in its state.json (it "
                              f"changed after it was written: a disk or copy error); delete checkpoint '{ckpt}' to "
                              "resume from the one before, or retrain")
    return path


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
    files = {f: file_sha256(tmp / f) for f in CHECKED_FILES}
    atomic.write_json(tmp / "state.json", {"step": step, **state, "files": files}, indent=1)
    if final.exists():  # re-saving the same step (e.g. final save right after a periodic one)
        shutil.rmtree(final)
    atomic.replace(tmp, final)
    atomic.write_text(d / "latest", name)
    old = sorted(p for p in d.glob("step_*") if p != final)
    for p in old[: max(len(old) - (keep - 1), 0)]:
        shutil.rmtree(p, ignore_errors=True)
    return final


def load_weights(ckpt: Path) -> dict[str, torch.Tensor]:
    """The tensors of ``ckpt/model.safetensors``, verified against state.json's sha256 first."""
    path = verify_file(ckpt, "model.safetensors")
    try:
        return load_file(str(path))
    except Exception as e:  # noqa: BLE001 - any parse failure is the same user problem
        raise CheckpointError(f"checkpoint file '{path}' is unreadable ({e.__class__.__name__}); delete checkpoint "
                              f"'{ckpt}' to resume from the one before, or retrain") from None


def load_training_state(ckpt: Path) -> tuple[dict, dict, dict]:
    """(optimizer state, rng state, state.json) of a checkpoint, verified and without executing pickles."""
    state = read_state(ckpt)
    paths = {f: verify_file(ckpt, f, state) for f in ("optimizer.pt", "rng.pt")}
    try:
        opt = torch.load(paths["optimizer.pt"], map_location="cpu", weights_only=True)
        rng = torch.load(paths["rng.pt"], map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001
        raise CheckpointError(f"checkpoint '{ckpt}' is incomplete or corrupt ({e.__class__.__name__}); "
                              "delete it to resume from the one before") from None
    return opt, rng, state


def shape_mismatch(built: dict[str, torch.Tensor], saved: dict[str, torch.Tensor]) -> tuple[str, list, list] | None:
    """(key, shape in the checkpoint, shape built now) of the first tensor whose shapes differ, or None."""
    for k, t in built.items():
        if k in saved and tuple(saved[k].shape) != tuple(t.shape):
            return k, list(saved[k].shape), list(t.shape)
    return None


def config_changes(saved: dict, now: dict, prefix: str = "") -> list[tuple[str, object, object]]:
    """(dotted key, saved value, value now) of every config key whose value differs."""
    out = []
    for k in sorted(set(saved) | set(now)):
        a, b = saved.get(k), now.get(k)
        if isinstance(a, dict) and isinstance(b, dict):
            out += config_changes(a, b, f"{prefix}{k}.")
        elif a != b:
            out.append((f"{prefix}{k}", a, b))
    return out


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
