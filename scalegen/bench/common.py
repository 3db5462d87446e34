"""Shared pieces of the oracle-world benchmarks."""
from __future__ import annotations

import shutil
import time
from pathlib import Path

from scalegen.config import load_config
from scalegen.eval.oracle import evaluate_oracle
from scalegen.priors import build_world
from scalegen.train.loop import train
from scalegen.train.model import load_run


def train_and_evaluate(overrides: list[str], run_dir: Path) -> dict:
    """Fresh run of the default config with ``overrides``; oracle metrics of its last checkpoint."""
    cfg = load_config(None, ["train.logger=none", "train.progress=false", *overrides])
    if run_dir.exists():
        shutil.rmtree(run_dir)
    t0 = time.perf_counter()
    train(cfg, run_dir)
    train_s = time.perf_counter() - t0
    cfg, text_encoder, model, _ = load_run(run_dir)
    res = evaluate_oracle(cfg, model, text_encoder, build_world(cfg))
    return {"train_s": train_s, "steps": cfg.train.max_steps, **res}
