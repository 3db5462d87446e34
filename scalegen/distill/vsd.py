"""Variational Score Distillation (ProlificDreamer):  g = w(t) (eps_cfg(x_t, t) - eps_phi(x_t, t, y, c)).

``eps_phi`` models the distribution of the current renders: a LoRA copy of the prior's UNet with a
camera embedding (Stable Diffusion, ``nets.LoRAUNet``), or, for a prior without a UNet (the oracle),
the prior's conditional prediction plus a small zero-initialised conv correction
(``nets.ResidualEps``). Both start equal to the prior. Each step ``phi`` gets one update of the
diffusion loss on the detached renders, ``||eps_phi(a_t' sg(z) + s_t' eps', t', y, c_drop) - eps'||^2``
at a fresh ``t' ~ U[0.02, 0.98] T`` with the camera dropped (zeroed) with probability 0.1; that loss
is returned together with the target-trick loss (its gradient reaches only ``phi``, whose optimizer
group and learning rate are its own: ``param_groups``).

Prior calls: one, on [cond @ t, uncond @ t] (+ [cond @ t'] when ``eps_phi`` needs the prior's
prediction there); the LoRA copy is a second network, evaluated once without and once with grad.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from scalegen.distill.common import TimestepSchedule, cfg_combine, target_loss, weight
from scalegen.distill.nets import camera_vector, diffusion_timesteps
from scalegen.distill.sds import _rows


class VSD:
    def __init__(self, prior, schedule: TimestepSchedule, model: torch.nn.Module, guidance_scale: float = 7.5,
                 weighting: str = "sds", t_group: int = 1, lr: float = 1e-3, camera_dropout: float = 0.1):
        self.prior, self.schedule, self.model, self.scale = prior, schedule, model, guidance_scale
        self.weighting, self.t_group, self.lr, self.camera_dropout = weighting, t_group, lr, camera_dropout

    # --- the state a stateful distiller owns ----------------------------------------------------
    def parameters(self):
        return [p for p in self.model.parameters() if p.requires_grad]

    def param_groups(self):
        return [("vsd_phi", self.parameters(), self.lr)]

    def state_dict(self):
        """The trainable tensors only (a LoRA copy's frozen UNet weights are the prior's)."""
        return {k: p.detach() for k, p in self.model.named_parameters() if p.requires_grad}

    def load_state_dict(self, state):
        if state:
            missing = set(self.state_dict()) - set(state)
            if missing:
                raise KeyError(f"checkpoint lacks the VSD model's {sorted(missing)[:3]}...")
            self.model.load_state_dict(state, strict=False)

    # --- the gradient ----------------------------------------------------------------------------
    def gradient_and_loss(self, latents: Tensor, text: Tensor, cameras, t: Tensor, eps: Tensor, t_tr: Tensor,
                          eps_tr: Tensor, keep_camera: Tensor, pooled: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """(g, phi's diffusion loss) for given t, eps, t', eps' and camera-keep mask (exposed for tests)."""
        z = latents.detach()
        n = len(z)
        x_t, x_tr = self.prior.add_noise(z, eps, t), self.prior.add_noise(z, eps_tr, t_tr)
        uncond = self.prior.uncond_like(text)
        if self.model.needs_base:
            out = self.prior.predict_eps(torch.cat([x_t, x_t, x_tr]), torch.cat([t, t, t_tr]),
                                         torch.cat([text, uncond, text]), _rows(cameras, 3))
            eps_c, eps_u, base_tr = out[:n], out[n:2 * n], out[2 * n:]
        else:
            out = self.prior.predict_eps(torch.cat([x_t, x_t]), torch.cat([t, t]), torch.cat([text, uncond]),
                                         _rows(cameras, 2))
            eps_c, eps_u, base_tr = out[:n], out[n:], None
        eps_cfg = cfg_combine(eps_u, eps_c, self.scale)
        cam = camera_vector(cameras, n).to(z)
        with torch.no_grad():
            eps_phi = self.model(x_t, t, cam, base_eps=eps_c, text=text, pooled=pooled, cameras=cameras)
        g = weight(self.prior.alphas_cumprod, t, self.weighting).to(z) * (eps_cfg - eps_phi.to(z))
        cam_tr = cam * keep_camera.to(cam).view(-1, 1)
        pred = self.model(x_tr, t_tr, cam_tr, base_eps=base_tr, text=text, pooled=pooled, cameras=cameras)
        return g, F.mse_loss(pred.float(), eps_tr.float())

    def __call__(self, latents: Tensor, text: Tensor, cameras, step: int, pooled=None) -> tuple[Tensor, dict]:
        n = len(latents)
        t = self.schedule.sample(n, step, self.t_group)
        eps, eps_tr = torch.randn_like(latents), torch.randn_like(latents)
        t_tr = diffusion_timesteps(n)
        keep = (torch.rand(n) >= self.camera_dropout).float()
        g, loss_phi = self.gradient_and_loss(latents, text, cameras, t, eps, t_tr, eps_tr, keep, pooled)
        return target_loss(latents, g) + loss_phi.to(latents.dtype), {
            "t": t.float().mean().item(), "grad_norm": g.norm().item(), "loss_phi": loss_phi.item()}
