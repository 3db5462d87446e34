"""Score distillers: rendered latents + frozen prior -> a loss whose gradient is the method's g.

Interface (``common.Distiller``): ``__call__(latents, text, cameras, step, pooled) -> (loss, logs)``
with ``text`` the prior's per-row conditions and ``cameras`` the cameras of the rows; stateful
distillers (VSD's eps_phi, VDM's M_psi) own their parameters and expose them as an optimizer group
(``param_groups``) and checkpoint state (``state_dict`` / ``load_state_dict``).
"""
from __future__ import annotations

from scalegen.distill.asd import ASD
from scalegen.distill.common import (Distiller, TimestepSchedule, cfg_combine, cond_uncond_eps, predict_branches,
                                     target_loss, weight)
from scalegen.distill.csd import CSD
from scalegen.distill.sds import SDS
from scalegen.distill.vdm import VDM, dca_lambda
from scalegen.distill.vsd import VSD
from scalegen.priors.base import Prior


def build_distiller(cfg, prior: Prior, cond_dim: int = 0) -> Distiller:
    """``cond_dim``: width of the pooled prompt embedding the trainer passes (conditions VDM's M_psi)."""
    d = cfg.distill
    schedule = TimestepSchedule(d.t_range_start, d.t_range_end, d.t_anneal_steps, cfg.train.max_steps)
    group = cfg.camera.views_per_group() if d.t_per == "prompt" else 1  # t per view group (MVDream's objects)
    if d.name == "sds":
        return SDS(prior, schedule, guidance_scale=d.guidance_scale, weighting=d.weighting, t_group=group,
                   x0_recon=d.sds_x0_recon, x0_rescale=d.sds_x0_rescale, views=cfg.camera.views_per_group())
    if d.name == "asd":
        return ASD(prior, schedule, guidance_scale=d.guidance_scale, eta=d.asd_eta, weighting=d.weighting,
                   t_group=group)
    if d.name == "csd":
        return CSD(prior, schedule, weighting=d.weighting, t_group=group)
    if d.name == "vsd":
        net = prior.denoiser_net()
        if net is not None:  # a UNet to put LoRA adapters on
            from scalegen.distill.nets import LoRAUNet  # noqa: PLC0415 - needs peft ([sd] extra)

            model = LoRAUNet(net, rank=d.vsd_lora_rank)
        else:
            from scalegen.distill.nets import ResidualEps  # noqa: PLC0415

            model = ResidualEps(prior.latent_channels, d.net_width, d.net_blocks, cond_dim).to(prior.device)
        return VSD(prior, schedule, model, guidance_scale=d.guidance_scale, weighting=d.weighting, t_group=group,
                   lr=d.lr, camera_dropout=d.vsd_camera_dropout)
    if d.name == "vdm":
        from scalegen.distill.nets import ResConvNet  # noqa: PLC0415

        mapper = ResConvNet(prior.latent_channels, d.net_width, d.net_blocks, cond_dim).to(prior.device)
        return VDM(prior, schedule, mapper, guidance_scale=d.guidance_scale, weighting=d.weighting, t_group=group,
                   lr=d.lr, dca_schedule=d.dca_schedule, dca_ends=tuple(d.dca_lambda))
    raise AssertionError(f"unhandled distiller {d.name}")  # config validation prevents this


__all__ = ["Distiller", "SDS", "ASD", "CSD", "VSD", "VDM", "dca_lambda", "TimestepSchedule", "build_distiller",
           "cfg_combine", "cond_uncond_eps", "predict_branches", "target_loss", "weight"]
