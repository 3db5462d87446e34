"""Generators: per-prompt independence at batch 4 (all three), gradients to every parameter group,
feature sampling against hand-built fields, paper-size parameter counts."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from scalegen.config import load_config
from scalegen.generators import Conv3DNet, HyperINGP, TriplaneTransformer, build_generator
from scalegen.generators.fields import FeatureField, decoder, run_decoder, sample_planes, sample_voxels, shared_interp
from scalegen.text import TextCond

TEXT_DIM = 24
CONFIGS = Path(__file__).resolve().parents[1] / "configs"


def _cond(b: int, seed: int = 0) -> TextCond:
    g = torch.Generator().manual_seed(seed)
    mask = torch.ones(b, 6, dtype=torch.bool)
    mask[:, 4:] = False  # padding tokens must not matter
    return TextCond(torch.randn(b, TEXT_DIM, generator=g), torch.randn(b, 6, TEXT_DIM, generator=g), mask)


def _generators():
    torch.manual_seed(0)
    conv = Conv3DNet(TEXT_DIM, "small").eval()
    tri = TriplaneTransformer(TEXT_DIM, "small").eval()
    hyper = HyperINGP(TEXT_DIM, hash_levels=4, hash_log2_size=12, hash_max_resolution=64, mlp_hidden=16,
                      hyper_hidden=16).eval()
    with torch.no_grad():
        hyper.grid.table.normal_()  # trained-like features (the init is ~1e-4, which hides the prompt)
    # the committed oracle defaults (text_norm, conv3d without sampled noise), built as `scalegen train` builds them
    oracle = {f"{n}_oracle": build_generator(load_config(str(CONFIGS / "oracle" / f"{n}.yaml"), []), TEXT_DIM).eval()
              for n in ("conv3d", "triplane")}
    return {"conv3d": conv, "triplane": tri, "hyper_ingp": hyper, **oracle}


@pytest.mark.parametrize("name", ["conv3d", "triplane", "hyper_ingp", "conv3d_oracle", "triplane_oracle"])
def test_batch4_prompts_are_independent_and_permutation_equivariant(name):
    """The reference flattens sampled features [B, C, N] as [C, B*N], which mixes prompts at B > 1:
    here prompt i's field must equal its field alone, follow a permutation, and ignore the others."""
    gen = _generators()[name]
    cond, b = _cond(4), 4
    z = torch.randn(b, gen.z_dim) if name.startswith("conv3d") else None  # Hyper-iNGP: shared points take the fused MLP
    zi = (lambda i: None) if z is None else (lambda i: z[i])
    shared = (torch.rand(1, 500, 3) * 2 - 1) * gen.bound * 1.05  # some points outside the box
    own = (torch.rand(b, 500, 3) * 2 - 1) * gen.bound
    perm = torch.tensor([2, 0, 3, 1])
    mixed = TextCond.cat([cond.index([0, 1]), _cond(4, seed=1).index([2, 3])])  # prompts 2 and 3 changed
    with torch.no_grad():
        field, field_p, field_m = gen(cond, z), gen(cond.index(perm), zi(perm)), gen(mixed, z)
        alone = [gen(cond.index([i]), zi([i])) for i in range(b)]
        for pts in (shared, own):
            sdf, rgb = field.query(pts)
            assert sdf.shape == (b, 500) and rgb.shape == (b, 500, 3)
            for i in range(b):  # alone == in the batch
                s1, c1 = alone[i].query(pts if pts.shape[0] == 1 else pts[i:i + 1])
                torch.testing.assert_close(s1[0], sdf[i], atol=1e-5, rtol=1e-4)
                torch.testing.assert_close(c1[0], rgb[i], atol=1e-5, rtol=1e-4)
            sp, cp = field_p.query(pts if pts.shape[0] == 1 else pts[perm])
            torch.testing.assert_close(sp, sdf[perm], atol=1e-5, rtol=1e-4)
            torch.testing.assert_close(cp, rgb[perm], atol=1e-5, rtol=1e-4)
            sm, cm = field_m.query(pts)
            torch.testing.assert_close(sm[:2], sdf[:2], atol=1e-5, rtol=1e-4)
            torch.testing.assert_close(cm[:2], rgb[:2], atol=1e-5, rtol=1e-4)
            assert not torch.allclose(sm[2:], sdf[2:], atol=1e-4) and not torch.allclose(cm[2:], rgb[2:], atol=1e-4)


@pytest.mark.parametrize("name", ["conv3d", "triplane"])
@pytest.mark.parametrize("shared", [True, False])
def test_gradients_reach_every_parameter_group(name, shared):
    gen = _generators()[name].train()
    pts = (torch.rand(1 if shared else 3, 400, 3) * 2 - 1) * gen.bound
    sdf, rgb = gen(_cond(3)).query(pts)
    (sdf.square().mean() + rgb.mean()).backward()
    for group, params in gen.param_groups().items():
        assert params, group
        for p in params:
            assert p.grad is not None and p.grad.abs().sum() > 0, f"{name}: a parameter of group {group} got no gradient"
    assert sum(len(ps) for ps in gen.param_groups().values()) == len(list(gen.parameters()))


def _centres(r: int) -> torch.Tensor:
    return (torch.arange(r) + 0.5) / r * 2 - 1  # cell centres in [-1, 1] (align_corners=False)


def test_voxel_sampling_reads_a_hand_built_field():
    """Channels 0/1/2 hold x/y/z at the cell centres of a [C, D=z, H=y, W=x] grid: trilinear
    interpolation of a linear function is exact, so sampling must return the points themselves."""
    r = 8
    c = _centres(r)
    zz, yy, xx = torch.meshgrid(c, c, c, indexing="ij")
    grid = torch.stack([xx, yy, zz])[None].repeat(2, 1, 1, 1, 1)
    grid[1] *= -2.0  # prompt 1: a different field
    inner = (torch.rand(300, 3) * 2 - 1) * (1 - 1 / r)
    want = torch.stack([inner, -2 * inner])
    torch.testing.assert_close(sample_voxels(grid, inner.expand(2, -1, -1)), want, atol=1e-5, rtol=0)
    torch.testing.assert_close(shared_interp(grid, inner).transpose(0, 1), want, atol=1e-5, rtol=0)
    far = torch.tensor([[3.0, 0.0, 0.0]])
    assert shared_interp(grid, far).abs().max() == 0  # zero outside the box


def test_triplane_sampling_reads_hand_built_planes():
    """Planes xy, xz, zy each hold (u, v) = their two coordinates (u along W, v along H)."""
    r = 8
    c = _centres(r)
    vv, uu = torch.meshgrid(c, c, indexing="ij")
    planes = torch.stack([uu, vv])[None, None].repeat(2, 3, 1, 1, 1)  # [B, 3, 2, H, W]
    planes[1] *= 3.0
    inner = (torch.rand(300, 3) * 2 - 1) * (1 - 1 / r)
    x, y, z = inner.unbind(-1)
    want = torch.stack([x, y, x, z, z, y], -1)
    torch.testing.assert_close(sample_planes(planes, inner.expand(2, -1, -1)), torch.stack([want, 3 * want]),
                               atol=1e-5, rtol=0)
    field = FeatureField(planes, "triplane", decoder(6, 4, 1, 1), decoder(6, 4, 3, 1), bound=0.5, sdf_radius=0.3)
    feat, point_major = field.encode(inner[None] * 0.5)  # the scene box [-0.5, 0.5]^3 maps to [-1, 1]^3
    assert point_major
    torch.testing.assert_close(feat.transpose(0, 1), torch.stack([want, 3 * want]), atol=1e-5, rtol=0)


def test_chunked_decoder_matches_autograd():
    mlp = decoder(5, 7, 3, 2)
    x = torch.randn(1000, 5, requires_grad=True)
    out = run_decoder(mlp, x, chunk=64)
    torch.testing.assert_close(out, mlp(x))
    g = torch.randn_like(out)
    got = torch.autograd.grad(out, [x, *mlp.parameters()], g)
    want = torch.autograd.grad(mlp(x), [x, *mlp.parameters()], g)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)


def test_paper_parameter_counts_match_the_reference():
    """ScaleDreamer's counts (text width 1024): 3DConv-Net 88.7M (x1) / 144.8M (x2), Triplane 120.5M."""
    with torch.device("meta"):
        counts = {"x1": Conv3DNet(1024, "paper", 1), "x2": Conv3DNet(1024, "paper", 2),
                  "tri": TriplaneTransformer(1024, "paper")}
    n = {k: sum(p.numel() for p in g.parameters()) for k, g in counts.items()}
    for k, ref in (("x1", 88.7e6), ("x2", 144.8e6), ("tri", 120.5e6)):
        assert abs(n[k] - ref) / ref < 0.02, (k, n[k])


def test_info_prints_paper_counts_without_allocating(tmp_path, capsys):
    from scalegen.cli import main

    out = tmp_path / "info.json"
    assert main(["info", "--config", "configs/oracle/triplane.yaml", "--json", str(out), "generator.preset=paper",
                 "text.dim=1024"]) == 0
    params = json.loads(out.read_text())["params"]
    assert abs(params["generator"] - 120.5e6) / 120.5e6 < 0.02
    assert "generator.transformer" in params and "generator.transformer" in capsys.readouterr().out


def test_channel_multiplier_is_validated():
    from scalegen.config import load_config
    from scalegen.errors import ConfigError

    with pytest.raises(ConfigError, match="channel_multiplier"):
        load_config("configs/oracle/conv3d.yaml", ["generator.channel_multiplier=3"])


@pytest.mark.parametrize("name", ["conv3d", "triplane"])
def test_checkpointing_and_bf16_keep_the_field(name):
    torch.manual_seed(0)
    cls = Conv3DNet if name == "conv3d" else TriplaneTransformer
    base = cls(TEXT_DIM, "small").eval()
    ckpt = cls(TEXT_DIM, "small", checkpointing=True).eval()
    half = cls(TEXT_DIM, "small", bf16=True).eval()
    ckpt.load_state_dict(base.state_dict())
    half.load_state_dict(base.state_dict())
    pts = (torch.rand(1, 300, 3) * 2 - 1) * base.bound
    cond = _cond(2)
    s0 = base(cond).sdf(pts)
    s1 = ckpt(cond).sdf(pts)
    s1.sum().backward()  # recomputation path runs under autograd
    torch.testing.assert_close(s1, s0, atol=1e-5, rtol=1e-4)
    s2 = half(cond).sdf(pts)
    assert s2.dtype == torch.float32 and (s2 - s0).abs().max() < 0.05 * s0.abs().max()


@pytest.mark.parametrize("cls", [Conv3DNet, TriplaneTransformer])
def test_checkpointing_gives_the_same_training_step_bit_for_bit(cls):
    """Training mode, conv3d's z and synthesis noise drawn: checkpointing recomputes each block from the same
    inputs and RNG state, so the loss and every gradient are bitwise those of the plain step (what lets
    `bench paper-step` turn it on where memory requires without changing a result)."""
    def step(checkpointing: bool):
        torch.manual_seed(0)
        gen = cls(TEXT_DIM, "small", checkpointing=checkpointing).train()
        pts = (torch.rand(2, 300, 3) * 2 - 1) * gen.bound
        loss = gen(_cond(2)).sdf(pts).square().sum()
        loss.backward()
        return loss.detach(), {n: p.grad for n, p in gen.named_parameters() if p.grad is not None}

    (loss0, grads0), (loss1, grads1) = step(False), step(True)
    assert torch.equal(loss0, loss1) and grads0.keys() == grads1.keys() and grads0
    assert all(torch.equal(grads0[k], grads1[k]) for k in grads0)


def _residual(gen, cond, pts):
    """The field's SDF minus the start sphere: what the generator adds."""
    with torch.no_grad():
        return gen(cond).sdf(pts) - (pts.norm(dim=-1) - gen.sdf_radius)


@pytest.mark.parametrize("cls", [Conv3DNet, TriplaneTransformer])
def test_feature_init_scale_shrinks_the_first_residual_and_keeps_every_gradient(cls):
    """The decoders are bias-free ReLU MLPs (1-homogeneous), so scaling the feature-writing layers'
    initial weights by s scales what the first field adds to the start sphere by exactly s; unlike a
    zero init, every parameter group still gets a gradient at the first step."""
    pts = (torch.rand(1, 300, 3) * 2 - 1) * 0.75
    cond = _cond(3)
    torch.manual_seed(0)
    plain = cls(TEXT_DIM, "small").eval()
    torch.manual_seed(0)
    small = cls(TEXT_DIM, "small", feature_init_scale=1e-3).eval()
    r1, r2 = _residual(plain, cond, pts), _residual(small, cond, pts)
    assert r1.abs().max() > 1e-3
    torch.testing.assert_close(r2, 1e-3 * r1, atol=1e-7, rtol=1e-3)
    small.train()
    sdf, rgb = small(cond).query(pts)
    (sdf.square().mean() + rgb.mean()).backward()
    for group, params in small.param_groups().items():
        for p in params:
            assert p.grad is not None and p.grad.abs().sum() > 0, f"a parameter of group {group} got no gradient"


def test_conv3d_without_noise_trains_the_field_it_evaluates():
    """sample_noise=False: z = 0 and no synthesis noise in training too, so the trained field is the
    evaluated one (with noise the two differ)."""
    torch.manual_seed(0)
    gen = Conv3DNet(TEXT_DIM, "small", sample_noise=False)
    with torch.no_grad():
        for block in gen.blocks:  # trained-like noise strengths, so synthesis noise would show
            for conv in (block.conv0, block.conv1):
                if conv is not None:
                    conv.noise_strength.fill_(0.5)
    pts = (torch.rand(1, 300, 3) * 2 - 1) * 0.75
    cond = _cond(2)
    with torch.no_grad():
        train_sdf = gen.train()(cond).sdf(pts)
        eval_sdf = gen.eval()(cond).sdf(pts)
        gen.sample_noise = True
        noisy = gen.train()(cond).sdf(pts)
    torch.testing.assert_close(train_sdf, eval_sdf)
    assert (noisy - eval_sdf).abs().max() > 1e-3


@pytest.mark.parametrize("cls", [Conv3DNet, TriplaneTransformer])
def test_text_norm_makes_the_field_independent_of_the_text_scale(cls):
    """text_norm: a prompt's condition enters at unit second moment, so scaling the text embeddings
    changes nothing (without it, it changes the field); per prompt, so batches stay independent."""
    torch.manual_seed(0)
    gen = cls(TEXT_DIM, "small", text_norm=True).eval()
    torch.manual_seed(0)
    plain = cls(TEXT_DIM, "small").eval()
    cond = _cond(3)
    loud = TextCond(cond.pooled * 10, cond.tokens * 10, cond.mask)
    pts = (torch.rand(1, 300, 3) * 2 - 1) * 0.75
    with torch.no_grad():
        torch.testing.assert_close(gen(loud).sdf(pts), gen(cond).sdf(pts), atol=1e-5, rtol=1e-4)
        assert (plain(loud).sdf(pts) - plain(cond).sdf(pts)).abs().max() > 1e-3
        alone = gen(cond.index([1])).sdf(pts)
        torch.testing.assert_close(alone[0], gen(cond).sdf(pts)[1], atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("path, params, lr", [("sd/conv3d_asd_at2520.yaml", 88.7e6, 0.004),
                                              ("sd/conv3d_asd_df415.yaml", 88.7e6, 0.004),
                                              ("sd/conv3d_asd_cp100k.yaml", 144.8e6, 0.004),
                                              ("sd/conv3d_asd_cp100k_shards.yaml", 144.8e6, 0.004),
                                              ("mvdream/triplane_asd_dl17k.yaml", 120.5e6, 0.0002)])
def test_paper_configs_keep_the_papers_sizes_learning_rates_and_the_oracle_init(path, params, lr):
    """The SD / MVDream configs build ScaleDreamer's sizes with its published learning rates, and take the
    oracle configs' initialisation (feature_init_scale) while keeping the reference's sampled noise and
    raw CLIP condition (text_norm is for the bag-of-words encoder)."""
    cfg = load_config(str(CONFIGS / path), [])
    oracle = load_config(str(CONFIGS / "oracle" / ("conv3d.yaml" if "conv3d" in path else "triplane.yaml")), [])
    with torch.device("meta"):
        n = sum(p.numel() for p in build_generator(cfg, 1024).parameters())
    assert abs(n - params) / params < 0.02, n
    assert cfg.optim.lr == lr and cfg.optim.group_lr == {}
    assert cfg.generator.feature_init_scale == oracle.generator.feature_init_scale
    assert cfg.generator.sample_noise and not cfg.generator.text_norm
