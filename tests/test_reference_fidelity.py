"""Reference-exact details (docs/reference-fidelity.md): the priors' precision as the paper configs state it
and as the references ran it."""
import json
import math
from pathlib import Path

import pytest
import torch

from scalegen.config import load_config

ROOT = Path(__file__).resolve().parents[1]
PAPER_CONFIGS = sorted((ROOT / "configs" / "sd").glob("*.yaml")) + sorted((ROOT / "configs" / "mvdream").glob("*.yaml"))


@pytest.mark.parametrize("path", PAPER_CONFIGS, ids=lambda p: p.stem)
def test_paper_configs_state_the_priors_precision_and_the_references(path):
    """Each paper config sets prior.dtype itself (no silent default) with a comment naming the reference's."""
    text = path.read_text()
    prior = text[text.index("\nprior:"):]
    head = prior[:prior.index("\n  dtype:")]
    assert "# prior precision:" in head and "reference" in head.lower() and "prior.dtype=fp32" in head
    cfg = load_config(path, [])
    assert cfg.prior.dtype in ("fp16", "bf16", "fp32")
    assert load_config(path, ["prior.dtype=fp32"]).prior.dtype == "fp32"


def test_weights_dtype_follows_prior_dtype_off_the_cpu():
    from scalegen.priors.latent import weights_dtype

    assert weights_dtype("fp32", torch.device("cuda")) == torch.float32
    assert weights_dtype("fp16", torch.device("cuda")) == torch.float16
    assert weights_dtype("bf16", "cuda:1") == torch.bfloat16
    assert weights_dtype("fp16", "cpu") == torch.float32  # CPU: always fp32


@pytest.fixture(scope="module")
def tiny_priors(tmp_path_factory):
    """A tiny random SD and a tiny MVDream converted from the official layout, by the commands users run."""
    pytest.importorskip("diffusers")
    from scalegen.cli import main

    tmp_path = tmp_path_factory.mktemp("priors")
    sd, mv = tmp_path / "tiny-sd", tmp_path / "tiny-mv"
    assert main(["prior", "make-tiny", "--out", str(sd)]) == 0
    assert main(["prior", "make-tiny-mvdream", "--out", str(tmp_path / "mv.safetensors")]) == 0
    assert main(["prior", "convert-mvdream", str(tmp_path / "mv.safetensors"), str(mv), "--text-from", str(sd)]) == 0
    return {"sd/hyper_ingp_asd_mg15.yaml": sd, "mvdream/triplane_asd_dl17k.yaml": mv}


@pytest.mark.slow  # making the tiny SD alone takes ~20 s on 2 cores
@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(
    not torch.cuda.is_available(), reason="half precision weights load on a GPU only"))])
def test_prior_dtype_fp32_loads_both_priors_in_fp32(tiny_priors, device):
    """``prior.dtype=fp32`` on the paper configs (tiny random weights in the real layouts) loads the UNet and the
    VAE in fp32; on a GPU the configs' own fp16 loads fp16 weights."""
    from scalegen.priors import build_prior

    for config, model in tiny_priors.items():
        over = [f"prior.model={model}", "prior.encode_resolution=64", "prior.latent_resolution=8"]
        for dtype, want in [("fp32", torch.float32)] + ([("fp16", torch.float16)] if device == "cuda" else []):
            cfg = load_config(ROOT / "configs" / config, [*over, f"prior.dtype={dtype}"])
            prior = build_prior(cfg, device=device)
            weights = [*prior.unet.parameters(), *prior.vae.parameters()]
            assert prior.dtype == want and {p.dtype for p in weights} == {want}, (config, dtype)


@pytest.mark.slow  # the tiny priors (~20 s) and a 3-step refinement
def test_mvdream_sds_preset_refines_across_its_milestone(tiny_priors, tmp_path, monkeypatch, capsys):
    """`scalegen refine` with configs/refine/mvdream_sds.yaml on a tiny MVDream (sizes scaled down, the recipe
    kept): two 4-view groups per step at the first size, one group at the milestone's, through MVDream's
    multi-view UNet, the x0-reconstruction SDS with its per-group rescale and one t per group."""
    import scalegen.train.loop as loop
    from scalegen.cli import main

    seen, real = [], loop.sample_train_cameras

    def spy(cam_cfg, n, *a, **k):
        c = real(cam_cfg, n, *a, **k)
        seen.append((c.height, c.shape[1], cam_cfg.views_per_group()))
        return c

    monkeypatch.setattr(loop, "sample_train_cameras", spy)
    mv = tiny_priors["mvdream/triplane_asd_dl17k.yaml"]
    out = tmp_path / "refined"
    assert main(["refine", "--representation", "ingp", "--distill", "sds", "--config",
                 str(ROOT / "configs" / "refine" / "mvdream_sds.yaml"), "--prompt", "a red cube", "--out", str(out),
                 "--mesh-resolution", "32", f"prior.model={mv}", "prior.encode_resolution=64",
                 "prior.latent_resolution=8", "camera.resolution=16", "camera.resolution_milestones=[[2, 24, 4]]",
                 "camera.eval_resolution=16", "train.max_steps=3", "train.log_every=1", "train.logger=none",
                 "train.progress=false", "train.threads=1", "generator.hash_levels=4", "generator.hash_log2_size=12",
                 "generator.hash_max_resolution=64", "render.samples=12", "render.importance_samples=8",
                 "eval.samples=12", "eval.importance_samples=8"]) == 0
    assert seen == [(16, 8, 4), (16, 8, 4), (24, 4, 4)]
    metrics = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics] == [1, 2, 3] and all(math.isfinite(m["loss"]) for m in metrics)
    capsys.readouterr()
