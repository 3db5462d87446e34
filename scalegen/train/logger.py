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
        if resume_step == 0 and self.path.exists():
            self.path.unlink()
        elif resume_step > 0 and self.path.exists():
            # Drop lines past the checkpoint we resume from: they will be recomputed.
            lines = [ln for ln in self.path.read_text().splitlines() if ln.strip()]
            keep = [ln for ln in lines if json.loads(ln).get("step", 0) <= resume_step]
            self.path.write_text("".join(ln + "\n" for ln in keep))
        if cfg.train.logger == "wandb":
            try:
                import wandb  # noqa: PLC0415 - optional at import time
            except ImportError:
                raise ConfigError("train.logger=wandb needs the wandb package: pip install wandb, "
                                  "or set train.logger=none") from None
            id_file = run_dir / "wandb_id.txt"
            run_id = id_file.read_text().strip() if id_file.is_file() else secrets.token_hex(4)
            id_file.write_text(run_id)
            self.wandb = wandb.init(project=cfg.train.wandb_project, dir=str(run_dir), id=run_id,
                                    resume="allow", name=run_dir.name, config=cfg.to_dict(),
                                    mode=wandb_mode())

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

    def close(self) -> None:
        if self.wandb is not None:
            self.wandb.finish()
            self.wandb = None


def read_metrics(run_dir: str | Path) -> list[dict]:
    p = Path(run_dir) / "metrics.jsonl"
    return [json.loads(ln) for ln in p.read_text().splitlines() if ln.strip()] if p.exists() else []
