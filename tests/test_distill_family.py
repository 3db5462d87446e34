"""CSD, VSD and VDM(+DCA) gradients against their formulas (DESIGN.md), on small explicit cases."""
import pytest
import torch

from conftest import LinearPrior
from scalegen.data.cameras import orbit_cameras
from scalegen.distill import CSD, SDS, VDM, VSD, TimestepSchedule, dca_lambda
from scalegen.distill.nets import ResConvNet, ResidualEps, camera_vector


SCHED = TimestepSchedule([0.02, 0.98], [0.02, 0.98], 1.0, 10)
T3 = torch.tensor([100, 500, 900])
TEXT = torch.tensor([0, 1, 2])


def _eps(prior, x, t, cond):
    return 0.5 * x + 0.1 * t.view(-1, 1, 1, 1) / 1000 + (prior.off if cond else 0.0)


def _w(prior, t):
    return (1 - prior.alphas_cumprod[t]).view(-1, 1, 1, 1)


def test_csd_formula_and_identical_branches_give_zero():
    prior = LinearPrior()
    z, eps = torch.randn(3, 1, 4, 4), torch.randn(3, 1, 4, 4)
    cams = orbit_cameras(3, 0.0, 1.5, 50.0, 4)
    g = CSD(prior, SCHED).gradient(z, TEXT, cams, T3, eps)
    x = prior.add_noise(z, eps, T3)
    assert torch.allclose(g, _w(prior, T3) * (_eps(prior, x, T3, 1) - _eps(prior, x, T3, 0)), atol=1e-6)
    assert prior.calls == [6]
    same = LinearPrior(cond_offset=0.0)  # eps_c == eps_u
    assert CSD(same, SCHED).gradient(z, TEXT, cams, T3, eps).abs().max() == 0


def test_vsd_formula_phi_loss_and_gradients():
    torch.manual_seed(0)
    prior = LinearPrior()
    model = ResidualEps(1, width=8, blocks=1)
    torch.nn.init.normal_(model.delta.conv_out.weight, std=0.1)  # a non-trivial correction
    vsd = VSD(prior, SCHED, model, guidance_scale=7.5)
    z = torch.randn(3, 1, 4, 4, requires_grad=True)
    eps, eps_tr = torch.randn(3, 1, 4, 4), torch.randn(3, 1, 4, 4)
    t_tr = torch.tensor([300, 50, 700])
    keep = torch.tensor([1.0, 0.0, 1.0])
    cams = orbit_cameras(3, 0.0, 1.5, 50.0, 4)
    g, loss_phi = vsd.gradient_and_loss(z, TEXT, cams, T3, eps, t_tr, eps_tr, keep)
    assert prior.calls == [9]  # ONE prior call: [cond@t, uncond@t, cond@t' for phi's loss]
    x = prior.add_noise(z.detach(), eps, T3)
    cam = camera_vector(cams, 3)
    e_c, e_u = _eps(prior, x, T3, 1), _eps(prior, x, T3, 0)
    eps_phi = e_c + model.delta.residual(x, T3, cam).detach()
    assert torch.allclose(g, _w(prior, T3) * (e_u + 7.5 * (e_c - e_u) - eps_phi), atol=1e-5)
    x_tr = prior.add_noise(z.detach(), eps_tr, t_tr)
    pred = _eps(prior, x_tr, t_tr, 1) + model.delta.residual(x_tr, t_tr, cam * keep.view(-1, 1))
    assert torch.allclose(loss_phi, (pred - eps_tr).pow(2).mean(), atol=1e-6)
    # The returned loss: dL/dz = g / B exactly (phi's loss never reaches the renders), and phi learns.
    loss, _ = vsd(z, TEXT, cams, 0)
    loss.backward()
    assert model.delta.conv_out.weight.grad is not None and model.delta.conv_out.weight.grad.abs().sum() > 0
    z2 = z.detach().clone().requires_grad_(True)
    torch.manual_seed(1)
    loss2, _ = vsd(z2, TEXT, cams, 0)
    torch.manual_seed(1)
    t = SCHED.sample(3, 0)
    e, e2 = torch.randn_like(z2), torch.randn_like(z2)
    from scalegen.distill.nets import diffusion_timesteps

    tt = diffusion_timesteps(3)
    kk = (torch.rand(3) >= 0.1).float()
    g2, _ = vsd.gradient_and_loss(z2, TEXT, cams, t, e, tt, e2, kk)
    loss2.backward()
    assert torch.allclose(z2.grad, g2 / 3, atol=1e-6)


def test_vsd_starts_at_the_prior():
    """Delta_phi is zero at init: eps_phi = eps_c, so at CFG 1 the VSD gradient is exactly zero."""
    prior = LinearPrior()
    vsd = VSD(prior, SCHED, ResidualEps(1, width=8, blocks=1), guidance_scale=1.0)
    z, eps = torch.randn(3, 1, 4, 4), torch.randn(3, 1, 4, 4)
    cams = orbit_cameras(3, 0.0, 1.5, 50.0, 4)
    g, _ = vsd.gradient_and_loss(z, TEXT, cams, T3, eps, T3, eps, torch.ones(3))
    assert g.abs().max() == 0


def test_vdm_formula_and_dca_endpoints():
    torch.manual_seed(0)
    prior = LinearPrior()
    mapper = ResConvNet(1, width=8, blocks=1)
    torch.nn.init.normal_(mapper.conv_out.weight, std=0.1)
    vdm = VDM(prior, SCHED, mapper, guidance_scale=7.5, dca_schedule="linear", dca_ends=(0.9, 0.2))
    z, eps = torch.randn(3, 1, 4, 4), torch.randn(3, 1, 4, 4)
    cams = orbit_cameras(3, 0.0, 1.5, 50.0, 4)
    g, loss_psi = vdm.gradient_and_loss(z, TEXT, cams, T3, eps)
    assert prior.calls == [6]  # exactly SDS's one call
    ab = prior.alphas_cumprod[T3].view(-1, 1, 1, 1)
    a, s = ab.sqrt(), (1 - ab).sqrt()
    x = prior.add_noise(z, eps, T3)
    e_c, e_u = _eps(prior, x, T3, 1), _eps(prior, x, T3, 0)
    e_cfg = e_u + 7.5 * (e_c - e_u)
    x0_p = (x - s * e_cfg) / a
    x0_q = mapper(x0_p, T3, camera_vector(cams, 3))
    assert torch.allclose(loss_psi, (x0_q - z).pow(2).mean(), atol=1e-6)
    eps_q = (x - a * x0_q) / s
    lam = (0.9 + (0.2 - 0.9) * T3.float() / 1000).view(-1, 1, 1, 1)
    want = _w(prior, T3) * (e_cfg - (lam * eps_q + (1 - lam) * eps))
    assert torch.allclose(g, want.detach(), atol=1e-4)


def test_dca_lambda_zero_is_sds_exactly():
    prior = LinearPrior()
    mapper = ResConvNet(1, width=8, blocks=1)
    torch.nn.init.normal_(mapper.conv_out.weight, std=0.5)
    z, eps = torch.randn(3, 1, 4, 4), torch.randn(3, 1, 4, 4)
    cams = orbit_cameras(3, 0.0, 1.5, 50.0, 4)
    g_vdm, _ = VDM(prior, SCHED, mapper, guidance_scale=7.5, dca_schedule="constant",
                   dca_ends=(0.0, 0.0)).gradient_and_loss(z, TEXT, cams, T3, eps)
    g_sds = SDS(prior, SCHED, guidance_scale=7.5).gradient(z, TEXT, cams, T3, eps)
    assert torch.equal(g_vdm, g_sds)
    # lambda = 1 with M_psi = identity (its init): eps_q = eps_cfg, so g = 0.
    g1, _ = VDM(prior, SCHED, ResConvNet(1, width=8, blocks=1), guidance_scale=7.5, dca_schedule="constant",
                dca_ends=(1.0, 1.0)).gradient_and_loss(z, TEXT, cams, T3, eps)
    assert g1.abs().max() < 1e-4


def test_dca_schedules():
    t = torch.tensor([0, 500, 1000])
    assert torch.allclose(dca_lambda(t, "linear", (1.0, 0.0)).flatten(), torch.tensor([1.0, 0.5, 0.0]))
    assert torch.allclose(dca_lambda(t, "cosine", (1.0, 0.2)).flatten(), torch.tensor([1.0, 0.6, 0.2]))
    assert torch.allclose(dca_lambda(t, "constant", (0.3, 0.9)).flatten(), torch.full((3,), 0.3))


def _tiny_unet_prior():
    pytest.importorskip("diffusers")
    from diffusers import UNet2DConditionModel

    from scalegen.priors.fakes import ReducedUNetPrior

    torch.manual_seed(0)
    unet = UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(32, 64),
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=16, attention_head_dim=(2, 4), use_linear_projection=True, norm_num_groups=32)
    return ReducedUNetPrior(unet, n_prompts=3, tokens=4)


def _graph_leaves(t):
    """Every parameter (leaf tensor) reachable from ``t``'s autograd graph."""
    seen, leaves, stack = set(), set(), [t.grad_fn]
    while stack:
        fn = stack.pop()
        if fn is None or fn in seen:
            continue
        seen.add(fn)
        if hasattr(fn, "variable"):
            leaves.add(id(fn.variable))
        stack.extend(f for f, _ in fn.next_functions)
    return leaves


def test_vdm_psi_update_never_touches_the_unet():
    prior = _tiny_unet_prior()
    prior.unet.requires_grad_(True)  # so any path through the UNet would show up as a gradient
    mapper = ResConvNet(4, width=8, blocks=1)
    vdm = VDM(prior, SCHED, mapper, guidance_scale=7.5)
    z = torch.randn(2, 4, 8, 8, requires_grad=True)
    cams = orbit_cameras(2, 0.0, 1.5, 50.0, 8)
    g, loss_psi = vdm.gradient_and_loss(z, torch.tensor([0, 1]), cams, torch.tensor([200, 700]), torch.randn_like(z))
    leaves = _graph_leaves(loss_psi)
    assert leaves == {id(p) for p in mapper.parameters()}  # psi's loss depends on psi only
    assert not leaves & {id(p) for p in prior.unet.parameters()}
    loss_psi.backward()
    assert all(p.grad is None for p in prior.unet.parameters())
    assert z.grad is None  # sg(z) and sg(x0_p): nothing flows back to the renders either


def test_vsd_lora_starts_as_the_unet_trains_only_lora_and_leaves_the_prior_frozen():
    """VSD's LoRA lives on the prior's own UNet (no copy): it starts as the frozen UNet, only its
    adapters and camera embedding train, and after an update the prior's own predictions are still
    exactly the frozen UNet's (the adapters are on only inside phi's calls)."""
    pytest.importorskip("peft")
    from scalegen.distill.nets import LoRAUNet

    prior = _tiny_unet_prior()
    x, t, text = torch.randn(2, 4, 8, 8), torch.tensor([100, 600]), torch.tensor([0, 2])
    cams = orbit_cameras(2, 0.0, 1.5, 50.0, 8)
    with torch.no_grad():
        frozen = prior.predict_eps(x, t, text, cams)
    n_unet = sum(p.numel() for p in prior.unet.parameters())
    model = LoRAUNet(prior.denoiser_net(), rank=2)
    cam = camera_vector(cams, 2)
    with torch.no_grad():
        assert torch.allclose(model(x, t, cam, text), frozen, atol=1e-5)
    vsd = VSD(prior, SCHED, model, guidance_scale=7.5)
    trainable = vsd.parameters()
    lora = [n for n in model.trainable() if n.startswith("lora.")]
    assert lora and all("lora_" in n for n in lora) and set(vsd.state_dict()) == set(model.trainable())
    # no second UNet: what VSD adds is the adapters and the camera MLP, far below the UNet's size
    assert sum(p.numel() for p in trainable) < 0.5 * n_unet
    opt = torch.optim.Adam(trainable, lr=1e-2)
    z = torch.randn(2, 4, 8, 8, requires_grad=True)
    loss, logs = vsd(z, text, cams, 0)
    loss.backward()
    frozen_params = [p for n, p in prior.unet.named_parameters() if ".lora_" not in n]
    assert all(p.grad is None for p in frozen_params)  # the frozen prior stays frozen
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in trainable)
    assert torch.isfinite(z.grad).all() and logs["loss_phi"] > 0
    opt.step()
    with torch.no_grad():
        assert not torch.allclose(model(x, t, cam, text), frozen, atol=1e-4)  # phi moved ...
        assert torch.equal(prior.predict_eps(x, t, text, cams), frozen)  # ... the prior did not
