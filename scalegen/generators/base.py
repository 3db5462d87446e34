"""The generator interface: a frozen text condition (+ optional noise) -> a batch of per-prompt
3D fields (``render.base.Field``), one forward pass, no optimisation."""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor, nn

from scalegen.render.base import Field, RenderOutput
from scalegen.text.base import TextCond


class Generator(nn.Module):
    """``forward(cond: TextCond, z=None) -> Field`` with one field per prompt of ``cond``. A prompt's
    field depends only on that prompt's condition (and its row of ``z``), never on the other prompts
    of the batch (tested for every generator). ``param_groups()`` names parameter groups for
    per-module learning rates (``optim.group_lr``); the default is one group, ``generator``."""

    def forward(self, cond: TextCond, z: Optional[Tensor] = None) -> Field:
        raise NotImplementedError

    def param_groups(self) -> dict[str, list[nn.Parameter]]:
        return {"generator": list(self.parameters())}

    def after_backward(self, out: RenderOutput) -> None:
        """Read what a step's backward pass left on its render (a Gaussian scene: the screen-space
        gradients that drive densification). Default: nothing."""

    def adapt(self, step: int, optimizer: torch.optim.Optimizer) -> bool:
        """Change the set of parameters after optimizer step ``step`` (a Gaussian scene densifies and
        prunes), keeping ``optimizer``'s state aligned with the rows; True when something changed.
        Default: never. A generator that adapts runs in one process (DDP needs fixed shapes)."""
        return False
