"""Reference-exact details (docs/reference-fidelity.md): the priors' precision as the paper configs state it
and as the references ran it."""
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


def _tiny_priors(tmp_path):
    from scalegen.cli import main

    sd, mv = tmp_path / "tiny-sd", tmp_path / "tiny-mv"
    assert main(["prior", "make-tiny", "--out", str(sd)]) == 0
    assert main(["prior", "make-tiny-mvdream", "--out", str(tmp_path / "mv.safetensors")]) == 0
    assert main(["prior", "convert-mvdream", str(tmp_path / "mv.safetensors"), str(mv), "--text-from", str(sd)]) == 0
    return {"sd/hyper_ingp_asd_mg15.yaml": sd, "mvdream/triplane_asd_dl17k.yaml": mv}


@pytest.mark.slow  # making the tiny SD alone takes ~20 s on 2 cores
@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(
    not torch.cuda.is_available(), reason="half precision weights load on a GPU only"))])
def test_prior_dtype_fp32_loads_both_priors_in_fp32(tmp_path, device):
    """``prior.dtype=fp32`` on the paper configs (tiny random weights in the real layouts) loads the UNet and the
    VAE in fp32; on a GPU the configs' own fp16 loads fp16 weights."""
    pytest.importorskip("diffusers")
    from scalegen.priors import build_prior

    for config, model in _tiny_priors(tmp_path).items():
        over = [f"prior.model={model}", "prior.encode_resolution=64", "prior.latent_resolution=8"]
        for dtype, want in [("fp32", torch.float32)] + ([("fp16", torch.float16)] if device == "cuda" else []):
            cfg = load_config(ROOT / "configs" / config, [*over, f"prior.dtype={dtype}"])
            prior = build_prior(cfg, device=device)
            weights = [*prior.unet.parameters(), *prior.vae.parameters()]
            assert prior.dtype == want and {p.dtype for p in weights} == {want}, (config, dtype)
