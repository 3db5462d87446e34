"""Renderers: a batch of fields + cameras -> images (VolSDF; 3D Gaussian splatting for a Gaussian
scene), and backgrounds."""
from __future__ import annotations

from scalegen.render.background import EnvironmentBackground, SolidBackground
from scalegen.render.base import Background, BackgroundFn, Field, Renderer, RenderOutput
from scalegen.render.gaussians import GaussianField, GaussianRasterizer
from scalegen.render.volsdf import VolSDFRenderer


def build_renderer(cfg) -> Renderer:
    """The renderer of the config's representation: the Gaussian rasterizer for a Gaussian scene, else
    VolSDF (every other generator's field is an SDF)."""
    r = cfg.render
    if cfg.generator.name == "gaussians":
        return GaussianRasterizer(near=r.near_min, blur=r.splat_blur, backend=r.splat_backend)
    return VolSDFRenderer(bound=r.bound, samples=r.samples, importance_samples=r.importance_samples,
                          beta=r.beta, near_min=r.near_min, normal_eps=r.normal_eps,
                          eikonal_points=r.eikonal_points, composite=r.composite,
                          uniform_mix=r.uniform_mix)


def build_background(cfg, text_dim: int) -> Background:
    r = cfg.render
    if r.background == "env":
        return EnvironmentBackground(text_dim, random_prob=r.bg_random_prob)
    return SolidBackground(text_dim, random_prob=r.bg_random_prob)


__all__ = ["Background", "BackgroundFn", "Field", "Renderer", "VolSDFRenderer", "GaussianField", "GaussianRasterizer",
           "RenderOutput", "EnvironmentBackground", "SolidBackground", "build_renderer", "build_background"]
