"""Adan (Xie et al. 2022, "Adan: Adaptive Nesterov Momentum Algorithm"), the optimizer of
ScaleDreamer's 300k-step CP100k run. With decay rates ``betas = (b1, b2, b3)`` (0.98, 0.92, 0.99)
and ``d_k = g_k - g_{k-1}`` (0 at the first step):

    m_k = b1 m + (1 - b1) g_k
    v_k = b2 v + (1 - b2) d_k
    n_k = b3 n + (1 - b3) (g_k + b2 d_k)^2
    theta <- (theta - lr (m_k / c1 + b2 v_k / c2) / (sqrt(n_k / c3) + eps)) / (1 + lr wd)

with bias corrections ``c_i = 1 - b_i^k``. Written from the paper's algorithm; plain PyTorch.
"""
from __future__ import annotations

import torch


class Adan(torch.optim.Optimizer):
    def __init__(self, params, lr: float = 1e-3, betas=(0.98, 0.92, 0.99), eps: float = 1e-8,
                 weight_decay: float = 0.0):
        if len(betas) != 3:
            raise ValueError("Adan needs three betas (b1, b2, b3)")
        super().__init__(params, dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay))

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            b1, b2, b3 = group["betas"]
            lr, eps, wd = group["lr"], group["eps"], group["weight_decay"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                g = p.grad
                st = self.state[p]
                if not st:
                    st["step"] = 0
                    st["m"], st["v"], st["n"] = (torch.zeros_like(p) for _ in range(3))
                    st["prev_grad"] = g.clone()
                st["step"] += 1
                k = st["step"]
                d = g - st["prev_grad"]
                st["m"].mul_(b1).add_(g, alpha=1 - b1)
                st["v"].mul_(b2).add_(d, alpha=1 - b2)
                st["n"].mul_(b3).addcmul_(g + b2 * d, g + b2 * d, value=1 - b3)
                c1, c2, c3 = 1 - b1**k, 1 - b2**k, 1 - b3**k
                denom = (st["n"] / c3).sqrt_().add_(eps)
                update = (st["m"] / c1 + b2 * st["v"] / c2) / denom
                p.sub_(update, alpha=lr)
                if wd:
                    p.div_(1 + lr * wd)
                st["prev_grad"].copy_(g)
        return loss
