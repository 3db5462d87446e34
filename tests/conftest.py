"""Shared fixtures: tiny configs that go through the real code paths quickly on 2 CPU cores."""
from __future__ import annotations

import contextlib
import io
import os
import subprocess
import traceback
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
    "train.threads=1", "train.val_assets=0",  # validation's 3D assets: tests/test_pipeline.py turns them on
]


from scalegen.priors.fakes import LinearPrior  # noqa: E402,F401 - shared with the benches
from scalegen.render.base import Field  # noqa: E402


@pytest.fixture(autouse=True)
def _deterministic():
    torch.manual_seed(0)
    yield


@pytest.fixture
def one_thread():
    """Two threads on a shared 2-core machine run several times slower than one (use with
    ``pytestmark = pytest.mark.usefixtures("one_thread")``)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


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


def fit_to_sphere(model, cond, bound: float, radius: float, rgb, steps: int, points: int):
    """Fit an amortized model's field for ``cond`` directly (at random 3D points in the scene box) to a sphere's
    SDF and one colour: a 'trained' run of a known shape without distillation. Returns the Adam optimizer."""
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(steps):
        pts = (torch.rand(1, points, 3) * 2 - 1) * bound
        field, _ = model(cond)
        sdf, col = field.query(pts)
        loss = (sdf - (pts.norm(dim=-1) - radius)).pow(2).mean() + (col - torch.tensor(rgb).float()).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    return opt


def shared_path(*parts: str) -> Path:
    p = SHARED.joinpath(*parts)
    if not p.exists():
        pytest.skip(f"{p} is absent (the ../shared folder ships with CI, not with user clones)")
    return p


class BallsField(Field):
    """A batch field with an exact SDF (``Field.select`` is the base class's default): prompt b
    is a ball of radius ``radii[b]`` at ``centres[b]``; colour = 0.5 + position (clamped), so a
    texture or axis mix-up changes the colours an asset shows. ``empty`` prompts have no surface."""

    def __init__(self, radii, centres=None, empty=()):
        self.radii = torch.tensor(radii, dtype=torch.float32)
        self.centres = torch.zeros(len(radii), 3) if centres is None else torch.tensor(centres, dtype=torch.float32)
        self.empty = torch.tensor([i in empty for i in range(len(radii))])
        self.n_prompts = len(radii)

    def sdf(self, points):
        d = (points - self.centres[:, None]).norm(dim=-1) - self.radii[:, None]
        return torch.where(self.empty[:, None], torch.ones_like(d), d)

    def query(self, points):
        rgb = (0.5 + points).clamp(0, 1).expand(self.n_prompts, -1, -1)
        return self.sdf(points), rgb


def run_cli(*args, cwd=None, env=None) -> subprocess.CompletedProcess:
    """``scalegen ARGS`` in this process (no fresh interpreter and torch import per call): its exit code
    and what it printed, as ``subprocess.run(..., capture_output=True, text=True)`` gives them. As in a
    process, argparse's exits keep their code and an uncaught exception is exit code 1 with its traceback
    on stderr. ``cwd``, ``env`` and torch's thread count are restored afterwards. Tests of the process
    boundary itself (signals, launchers, a per-process state) start a real process instead."""
    from scalegen.cli import main

    out, err = io.StringIO(), io.StringIO()
    old_cwd, old_env, threads = os.getcwd(), dict(os.environ), torch.get_num_threads()
    try:
        if cwd is not None:
            os.chdir(cwd)
        os.environ.update({k: str(v) for k, v in (env or {}).items()})
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            try:
                code = main([str(a) for a in args])
            except SystemExit as e:  # argparse: usage errors (2) and --help (0)
                code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
            except Exception:  # noqa: BLE001 - reported as the process would: traceback, exit code 1
                traceback.print_exc()
                code = 1
    finally:
        os.chdir(old_cwd)
        os.environ.clear()
        os.environ.update(old_env)
        torch.set_num_threads(threads)
    return subprocess.CompletedProcess(list(args), code, out.getvalue(), err.getvalue())
