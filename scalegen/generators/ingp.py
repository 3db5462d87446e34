"""Single-prompt iNGP (ScaleDreamer's prompt-specific results): the Hyper-iNGP field without the
hypernetwork. The hash grid is the same module, and the bias-free field MLPs, which Hyper-iNGP
emits per prompt from the text embedding, are plain parameters here:

    sdf(x) = relu(e(x) W1_sdf) W2_sdf + (|x| - r),   rgb(x) = sigmoid(relu(e(x) W1_rgb) W2_rgb)

``from_hyper_ingp`` copies a trained Hyper-iNGP's grid and the weights its hypernetwork emits for one
prompt, so refinement starts from exactly the amortized generator's field for that prompt.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor, nn

from scalegen.errors import ConfigError
from scalegen.generators.base import Generator
from scalegen.generators.hash_grid import HashGrid
from scalegen.generators.hyper_ingp import HyperINGP, HyperINGPField
from scalegen.text.base import TextCond


class SingleINGP(Generator):
    def __init__(self, bound: float = 0.75, hash_levels: int = 16, hash_features: int = 2, hash_log2_size: int = 19,
                 hash_base_resolution: int = 16, hash_max_resolution: int = 4096, mlp_hidden: int = 64,
                 sdf_radius: float = 0.35):
        super().__init__()
        self.grid = HashGrid(hash_levels, hash_features, hash_log2_size, hash_base_resolution, hash_max_resolution)
        self.bound, self.sdf_radius = bound, sdf_radius
        d_in, hid = self.grid.out_dim, mlp_hidden
        self.shapes = {"sdf1": (d_in, hid), "sdf2": (hid, 1), "rgb1": (d_in, hid), "rgb2": (hid, 3)}
        # [1, a, b] per layer: the layout HyperINGPField takes (a batch of one prompt's weights)
        self.weights = nn.ParameterDict({k: nn.Parameter(torch.randn(1, a, b) / a ** 0.5)
                                         for k, (a, b) in self.shapes.items()})

    def forward(self, cond: TextCond, z: Optional[Tensor] = None) -> HyperINGPField:
        """The prompt's field (the text only says how many prompts are asked for: one)."""
        if len(cond) != 1:
            raise ConfigError(f"a single-prompt iNGP renders its one prompt, not {len(cond)}; per-prompt runs need "
                              "data.prompts_per_step=1")
        return HyperINGPField(self.grid, dict(self.weights), self.bound, self.sdf_radius)

    def param_groups(self) -> dict[str, list[nn.Parameter]]:
        """``grid`` and ``mlp``: the names Hyper-iNGP uses, so ``optim.group_lr`` carries over."""
        return {"grid": list(self.grid.parameters()), "mlp": list(self.weights.parameters())}

    @torch.no_grad()
    def from_hyper_ingp(self, generator: HyperINGP, cond: TextCond) -> None:
        """Become ``generator``'s field for the one prompt of ``cond`` (same grid sizes required)."""
        if generator.grid.table.shape != self.grid.table.shape or generator.shapes != self.shapes:
            raise ConfigError("the run's Hyper-iNGP has other grid or MLP sizes than this single-prompt iNGP; "
                              "start from the run's own config (scalegen refine --init-from RUN does)")
        self.grid.table.copy_(generator.grid.table)
        field = generator(cond)
        for k in self.shapes:
            self.weights[k].copy_(field.w[k])


def build_single_ingp(cfg) -> SingleINGP:
    g = cfg.generator
    if g.backend != "torch":
        raise ConfigError("generator.name=ingp has the torch hash grid only; set generator.backend=torch")
    return SingleINGP(bound=cfg.render.bound, hash_levels=g.hash_levels, hash_features=g.hash_features,
                      hash_log2_size=g.hash_log2_size, hash_base_resolution=g.hash_base_resolution,
                      hash_max_resolution=g.hash_max_resolution, mlp_hidden=g.mlp_hidden, sdf_radius=g.sdf_radius)
