"""Generators: text condition (+ noise) -> a batch of per-prompt 3D fields (amortized: Hyper-iNGP,
3DConv-Net, Triplane-Transformer), or one prompt's own scene for per-prompt refinement (3D Gaussians,
single-prompt iNGP).

Interface (``base.Generator``): ``forward(cond: TextCond, z=None) -> Field`` where
``Field.query(points [P, N, 3])`` (``render.base.Field``) returns ``sdf [B, N]`` and ``rgb [B, N, 3]``
(P == 1 broadcasts shared points to every prompt), ``Field.sdf(points)`` returns the SDF alone,
``Field.select(prompts)`` the fields of a subset of the prompts (inference on uneven point sets, e.g.
mesh export), and ``param_groups()`` names parameter groups for per-module learning rates
(``optim.group_lr``).
"""
from __future__ import annotations

from scalegen.generators.base import Generator
from scalegen.generators.conv3d import Conv3DNet
from scalegen.generators.fields import FeatureField
from scalegen.generators.gaussians import GaussianScene, build_gaussian_scene
from scalegen.generators.hyper_ingp import HyperINGP, HyperINGPField
from scalegen.generators.ingp import SingleINGP, build_single_ingp
from scalegen.generators.triplane_transformer import TriplaneTransformer


def build_generator(cfg, text_dim: int) -> Generator:
    """``cfg`` is the whole ``Config``; ``generator.name`` picks the class."""
    g = cfg.generator
    if g.name == "hyper_ingp":
        return HyperINGP(
            text_dim=text_dim, bound=cfg.render.bound, hash_levels=g.hash_levels, hash_features=g.hash_features,
            hash_log2_size=g.hash_log2_size, hash_base_resolution=g.hash_base_resolution,
            hash_max_resolution=g.hash_max_resolution, mlp_hidden=g.mlp_hidden, hyper_hidden=g.hyper_hidden,
            hyper_out_gain=g.hyper_out_gain, sdf_radius=g.sdf_radius, backend=g.backend,
        )
    if g.name == "conv3d":
        return Conv3DNet(text_dim=text_dim, preset=g.preset, channel_multiplier=g.channel_multiplier, z_dim=g.z_dim,
                         bound=cfg.render.bound, sdf_radius=g.sdf_radius, checkpointing=g.checkpointing, bf16=g.bf16,
                         sample_noise=g.sample_noise, feature_init_scale=g.feature_init_scale, text_norm=g.text_norm)
    if g.name == "triplane_transformer":
        return TriplaneTransformer(text_dim=text_dim, preset=g.preset, bound=cfg.render.bound, sdf_radius=g.sdf_radius,
                                   checkpointing=g.checkpointing, bf16=g.bf16,
                                   feature_init_scale=g.feature_init_scale, text_norm=g.text_norm)
    if g.name == "gaussians":  # per-prompt: one prompt's scene, the text is not read
        return build_gaussian_scene(cfg)
    if g.name == "ingp":
        return build_single_ingp(cfg)
    raise AssertionError(f"unhandled generator {g.name}")  # config validation prevents this


__all__ = ["Generator", "Conv3DNet", "FeatureField", "GaussianScene", "HyperINGP", "HyperINGPField", "SingleINGP",
           "TriplaneTransformer", "build_generator"]
