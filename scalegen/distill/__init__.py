"""Score distillers: rendered latents + frozen prior -> a loss whose gradient is the method's g.

Interface: ``__call__(latents, text, cameras, step) -> (loss, logs)`` with ``text`` the prior's
per-row conditions and ``cameras`` the [P, V] cameras of the rows; ``parameters()`` lists the
trainable parameters a stateful distiller owns (VSD's LoRA, VDM's M_psi), as an optimizer group.
"""
from __future__ import annotations

from scalegen.distill.asd import ASD
from scalegen.distill.common import TimestepSchedule, cfg_combine, target_loss, weight
from scalegen.distill.csd import CSD
from scalegen.distill.sds import SDS
from scalegen.distill.vdm import VDM, dca_lambda
from scalegen.distill.vsd import VSD


def build_distiller(cfg, prior, cond_dim: int = 0):
    """``cond_dim``: width of the pooled prompt embedding the trainer passes (conditions VDM's M_psi)."""
    d = cfg.distill
    schedule = TimestepSchedule(d.t_range_start, d.t_range_end, d.t_anneal_steps, cfg.train.max_steps)
    group = cfg.camera.views_per_prompt if d.t_per == "prompt" else 1
    if d.name == "sds":
        return SDS(prior, schedule, guidance_scale=d.guidance_scale, weighting=d.weighting, t_group=group)
    if d.name == "asd":
        return ASD(prior, schedule, guidance_scale=d.guidance_scale, eta=d.asd_eta, weighting=d.weighting,
                   t_group=group)
    if d.name == "csd":
        return CSD(prior, schedule, weighting=d.weighting, t_group=group)
    device = getattr(prior, "device", "cpu")
    if d.name == "vsd":
        if hasattr(prior, "unet"):
            from scalegen.distill.nets import LoRAUNet  # noqa: PLC0415 - needs peft ([sd] extra)

            model = LoRAUNet(prior, rank=d.vsd_lora_rank)
        else:
            from scalegen.distill.nets import ResidualEps  # noqa: PLC0415

            model = ResidualEps(prior.latent_channels, d.net_width, d.net_blocks, cond_dim).to(device)
        return VSD(prior, schedule, model, guidance_scale=d.guidance_scale, weighting=d.weighting, t_group=group,
                   lr=d.lr, camera_dropout=d.vsd_camera_dropout)
    if d.name == "vdm":
        from scalegen.distill.nets import ResConvNet  # noqa: PLC0415

        mapper = ResConvNet(prior.latent_channels, d.net_width, d.net_blocks, cond_dim).to(device)
        return VDM(prior, schedule, mapper, guidance_scale=d.guidance_scale, weighting=d.weighting, t_group=group,
                   lr=d.lr, dca_schedule=d.dca_schedule, dca_ends=tuple(d.dca_lambda))
    raise AssertionError(f"unhandled distiller {d.name}")  # config validation prevents this


__all__ = ["SDS", "ASD", "CSD", "VSD", "VDM", "dca_lambda", "TimestepSchedule", "build_distiller", "cfg_combine", "target_loss", "weight"]
