"""Metrics: always appended to ``RUN/metrics.jsonl`` (machine-readable, survives crashes), and
mirrored to Weights & Biases when ``train.logger=wandb`` (offline automatically when no API key
is configured, so a machine without network or account still trains and can `wandb sync` later).
"""
from __future__ import annotations

import json
import os
import secrets
from pathlib import Path

import numpy as np

from scalegen import atomic
from scalegen.errors import ConfigError


def wandb_mode() -> str:
    if os.environ.get("WANDB_MODE"):
        return os.environ["WANDB_MODE"]
    has_key = bool(os.environ.get("WANDB_API_KEY")) or (Path.home() / ".netrc").is_file() and \
        "api.wandb.ai" in (Path.home() / ".netrc").read_text(errors="ignore")
    return "online" if has_key else "offline"


class MetricLogger:
    def __init__(self, run_dir: Path, cfg, enabled: bool = True, resume_step: int = 0):
        self.path = run_dir / "metrics.jsonl"
        self.enabled = enabled
        self.wandb = None
        if not enabled:
            return
        self.val_path = run_dir / "val" / "metrics.jsonl"
        for path in (self.path, self.val_path):
            if resume_step == 0 and path.exists():
                path.unlink()
            elif resume_step > 0 and path.exists():
                # Drop lines past the checkpoint we resume from (they will be recomputed) and a partial line
                # that a crash mid-write left behind.
                records, bad = parse_metrics(path.read_text())
                if bad:
                    print(f"{path}: dropped {bad} unreadable line(s) (a crash mid-write leaves a partial last line)")
                keep = [r for r in records if r.get("step", 0) <= resume_step]
                atomic.write_text(path, "".join(json.dumps(r) + "\n" for r in keep))
        if cfg.train.logger == "wandb":
            try:
                import wandb  # noqa: PLC0415 - optional at import time
            except ImportError:
                raise ConfigError('train.logger=wandb needs the wandb package, an extra: pip install "scalegen[wandb]" '
                                  "(or set train.logger=none)") from None
            id_file = run_dir / "wandb_id.txt"
            run_id = id_file.read_text().strip() if id_file.is_file() else secrets.token_hex(4)
            atomic.write_text(id_file, run_id)
            # One wandb run per job (only the main process logs), grouped by run folder so that the
            # requeued pieces of a preempted job and its resumes line up.
            self.wandb = wandb.init(project=cfg.train.wandb_project, dir=str(run_dir), id=run_id,
                                    resume="allow", name=run_dir.name, group=run_dir.name, job_type="train",
                                    config=cfg.to_dict(), mode=wandb_mode())

    def log(self, step: int, metrics: dict) -> None:
        if not self.enabled:
            return
        with self.path.open("a") as f:
            f.write(json.dumps({"step": step, **metrics}) + "\n")
        if self.wandb is not None:
            self.wandb.log(metrics, step=step)

    def log_image(self, step: int, key: str, image: np.ndarray) -> None:
        if self.wandb is not None:
            import wandb  # noqa: PLC0415

            self.wandb.log({key: wandb.Image(image)}, step=step)

    def log_validation(self, step: int, metrics: dict) -> None:
        """Validation metrics: appended to ``RUN/val/metrics.jsonl`` (``metrics.jsonl`` keeps one training
        record per logged step) and mirrored to W&B."""
        if not self.enabled:
            return
        self.val_path.parent.mkdir(parents=True, exist_ok=True)
        with self.val_path.open("a") as f:
            f.write(json.dumps({"step": step, **metrics}) + "\n")
        if self.wandb is not None:
            self.wandb.log(metrics, step=step)

    def log_files(self, step: int, files: dict[str, Path]) -> None:
        """3D assets and videos of a validation: ``{key: path}``, a .glb logged as ``wandb.Object3D``, an
        .mp4/.gif as ``wandb.Video`` (the files themselves are already in the run folder)."""
        if self.wandb is None or not files:
            return
        import wandb  # noqa: PLC0415

        media = {k: wandb.Object3D(str(p)) if Path(p).suffix == ".glb" else wandb.Video(str(p), format=Path(p).suffix[1:])
                 for k, p in files.items()}
        self.wandb.log(media, step=step)

    def close(self) -> None:
        if self.wandb is not None:
            self.wandb.finish()
            self.wandb = None


def parse_metrics(text: str) -> tuple[list[dict], int]:
    """(records, number of unreadable lines) of a metrics.jsonl text."""
    records, bad = [], 0
    for ln in text.splitlines():
        if not ln.strip():
            continue
        try:
            r = json.loads(ln)
        except json.JSONDecodeError:
            bad += 1
            continue
        if isinstance(r, dict):
            records.append(r)
        else:
            bad += 1
    return records, bad


def read_metrics(run_dir: str | Path) -> list[dict]:
    """The readable records of a run's metrics.jsonl (a partial last line is skipped)."""
    p = Path(run_dir) / "metrics.jsonl"
    return parse_metrics(p.read_text())[0] if p.exists() else []
