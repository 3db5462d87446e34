"""Variational Score Distillation (ProlificDreamer):  g = w(t) (eps_cfg(x_t, t) - eps_phi(x_t, t, y, c)).

``eps_phi`` models the distribution of the current renders: LoRA adapters on the prior's own UNet
with a camera embedding (Stable Diffusion, ``nets.LoRAUNet``), or, for a prior without a UNet (the
oracle), the prior's conditional prediction plus a small zero-initialised conv correction
(``nets.ResidualEps``). Both start equal to the prior. As in threestudio's ProlificDreamer, phi sees
the view-independent prompt, and each step it gets one update of the diffusion loss on the detached
renders, ``||eps_phi(a_t' sg(z) + s_t' eps', t', y, c_drop) - eps'||^2`` at a fresh
``t' ~ U{0, ..., 999}`` with the camera dropped (zeroed) with probability 0.1. That loss is returned
together with the target-trick loss (its gradient reaches only phi, whose optimizer group and
learning rate are its own: ``param_groups``).

Prior calls: one, on [cond @ t, uncond @ t] (+ [cond @ t'] when ``eps_phi`` needs the prior's
prediction there); phi is evaluated once without and once with grad.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from scalegen.data.cameras import Cameras
from scalegen.distill.common import Distiller, TimestepSchedule, cfg_combine, grad_logs, predict_branches, target_loss
from scalegen.distill.nets import VariationalEps, camera_vector, diffusion_timesteps
from scalegen.priors.base import Prior


class VSD(Distiller):
    def __init__(self, prior: Prior, schedule: TimestepSchedule, model: VariationalEps, guidance_scale: float = 7.5,
                 weighting: str = "sds", t_group: int = 1, lr: float = 1e-4, camera_dropout: float = 0.1):
        super().__init__(prior, schedule, weighting, t_group)
        self.model, self.scale, self.lr, self.camera_dropout = model, guidance_scale, lr, camera_dropout

    # --- the state VSD owns: phi -------------------------------------------------------------------
    def param_groups(self):
        return [("vsd_phi", list(self.model.trainable().values()), self.lr)]

    def state_dict(self) -> dict[str, Tensor]:
        return {k: p.detach() for k, p in self.model.trainable().items()}

    def load_state_dict(self, state: dict[str, Tensor]) -> None:
        own = self.model.trainable()
        missing = sorted(set(own) - set(state))
        if missing:
            from scalegen.errors import CheckpointError  # noqa: PLC0415

            raise CheckpointError(f"the checkpoint lacks VSD's {missing[:3]}...; resume with the distiller settings "
                                  "(distill.*) the run was trained with")
        with torch.no_grad():
            for k, p in own.items():
                p.copy_(state[k])

    # --- the gradient ------------------------------------------------------------------------------
    def gradient_and_loss(self, latents: Tensor, text: Tensor, cameras: Cameras, t: Tensor, eps: Tensor, t_tr: Tensor,
                          eps_tr: Tensor, keep_camera: Tensor, pooled: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """(g, phi's diffusion loss) for given t, eps, t', eps' and camera-keep mask (exposed for tests)."""
        z = latents.detach()
        n = len(z)
        x_t, x_tr = self.prior.add_noise(z, eps, t), self.prior.add_noise(z, eps_tr, t_tr)
        branches = [(x_t, t, False), (x_t, t, True)]
        if self.model.needs_prior_eps:
            branches.append((x_tr, t_tr, False))
        out = predict_branches(self.prior, text, cameras, branches, cfg_pairs=[(0, 1)])
        eps_c, eps_u = out[0], out[1]
        base_tr = out[2] if self.model.needs_prior_eps else None
        cam = camera_vector(cameras, n).to(z)
        with torch.no_grad():
            eps_phi = self.model(x_t, t, cam, text, pooled, base_eps=eps_c)
        g = self.w(t, z) * (cfg_combine(eps_u, eps_c, self.scale) - eps_phi.to(z))
        cam_tr = cam * keep_camera.to(cam).view(-1, 1)
        pred = self.model(x_tr, t_tr, cam_tr, text, pooled, base_eps=base_tr)
        return g, F.mse_loss(pred.float(), eps_tr.float())

    def __call__(self, latents: Tensor, text: Tensor, cameras: Cameras, step: int,
                 pooled: Optional[Tensor] = None) -> tuple[Tensor, dict[str, Tensor]]:
        n = len(latents)
        t = self.sample_t(n, step)
        eps, eps_tr = torch.randn_like(latents), torch.randn_like(latents)
        t_tr = diffusion_timesteps(n, self.t_group)
        keep = (torch.rand(n) >= self.camera_dropout).float()
        g, loss_phi = self.gradient_and_loss(latents, text, cameras, t, eps, t_tr, eps_tr, keep, pooled)
        return target_loss(latents, g) + loss_phi.to(latents.dtype), grad_logs(t, g, loss_phi=loss_phi)
