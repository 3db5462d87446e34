"""Score distillers: rendered latents + frozen prior -> a loss whose gradient is the method's g.

Interface: ``__call__(latents, text, cameras, step) -> (loss, logs)`` with ``text`` the prior's
per-row conditions and ``cameras`` the [P, V] cameras of the rows; ``parameters()`` lists the
trainable parameters a stateful distiller owns (VSD's LoRA, VDM's M_psi), as an optimizer group.
"""
from __future__ import annotations

from scalegen.distill.asd import ASD
from scalegen.distill.common import TimestepSchedule, cfg_combine, target_loss, weight
from scalegen.distill.sds import SDS


def build_distiller(cfg, prior):
    d = cfg.distill
    schedule = TimestepSchedule(d.t_range_start, d.t_range_end, d.t_anneal_steps, cfg.train.max_steps)
    group = cfg.camera.views_per_prompt if d.t_per == "prompt" else 1
    if d.name == "sds":
        return SDS(prior, schedule, guidance_scale=d.guidance_scale, weighting=d.weighting, t_group=group)
    if d.name == "asd":
        return ASD(prior, schedule, guidance_scale=d.guidance_scale, eta=d.asd_eta, weighting=d.weighting,
                   t_group=group)
    raise AssertionError(f"unhandled distiller {d.name}")  # config validation prevents this


__all__ = ["SDS", "ASD", "TimestepSchedule", "build_distiller", "cfg_combine", "target_loss", "weight"]
