"""Shared fixtures: tiny configs that go through the real code paths quickly on 2 CPU cores."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

SHARED = Path(__file__).resolve().parents[2] / "shared"

TINY = [
    "camera.resolution=16", "camera.views_per_prompt=2", "data.prompts_per_step=2",
    "render.samples=12", "render.importance_samples=8", "render.eikonal_points=256",
    "generator.hash_levels=4", "generator.hash_log2_size=12", "generator.hash_max_resolution=64",
    "generator.mlp_hidden=16", "generator.hyper_hidden=16", "text.dim=32",
    "prior.oracle.samples=16", "prior.oracle.importance_samples=8", "prior.oracle.n_uncond=4",
    "world.colors=[red, green, blue]", "world.shapes=[sphere, cube]", "world.sizes=[small, large]",
    "world.n_unseen=2", "camera.eval_resolution=16", "camera.eval_views=2",
    "eval.samples=16", "eval.importance_samples=8", "train.logger=none", "train.progress=false",
    "train.threads=1",
]


from scalegen.priors.fakes import LinearPrior  # noqa: E402,F401 - shared with the benches


@pytest.fixture(autouse=True)
def _deterministic():
    torch.manual_seed(0)
    yield


@pytest.fixture
def tiny_cfg():
    from scalegen.config import load_config

    return load_config(None, TINY)


# A small corpus in ScaleDreamer's format for tests that need *some* corpus (so a user's clone, without
# ../shared, runs them); only tests about the real corpora read ../shared/corpora.
PROMPTS = ["a red sports car", "a blue tulip in a clay pot", "a car made out of sushi", "a wooden chair",
           "a DSLR photo of a hamburger", "a small yellow duck", "a stack of pancakes", "a green teapot"]


@pytest.fixture(scope="session")
def small_corpus(tmp_path_factory) -> Path:
    import json

    p = tmp_path_factory.mktemp("corpus") / "small_prompt_library.json"
    p.write_text(json.dumps({"train": PROMPTS, "val": PROMPTS[:2], "test": PROMPTS[:2]}))
    return p


def shared_path(*parts: str) -> Path:
    p = SHARED.joinpath(*parts)
    if not p.exists():
        pytest.skip(f"{p} is absent (the ../shared folder ships with CI, not with user clones)")
    return p
