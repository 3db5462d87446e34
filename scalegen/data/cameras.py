"""Cameras: ScaleDreamer's training distributions (Stable Diffusion's and MVDream's), evaluation
orbits, and pixel rays.

Conventions (DESIGN.md): world is z-up; ``c2w`` are camera-to-world 4x4 matrices in OpenGL
convention (the camera looks down its -z axis, +y is up in the image). Camera batches have shape
``[P, V]`` (prompts x views); ``P == 1`` means one camera set shared by every prompt of the step,
and everything downstream broadcasts it (the renderer then evaluates shared features once).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass
class Cameras:
    c2w: Tensor  # [P, V, 4, 4]
    fovy: Tensor  # [P, V] radians, vertical field of view
    elevation: Tensor  # [P, V] degrees
    azimuth: Tensor  # [P, V] degrees, 0 = +x axis, counter-clockwise seen from above
    distance: Tensor  # [P, V]
    height: int
    width: int

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.fovy.shape)  # type: ignore[return-value]

    @property
    def shared(self) -> bool:
        return self.fovy.shape[0] == 1

    def map(self, fn, height: int | None = None, width: int | None = None) -> "Cameras":
        """The same cameras with ``fn`` applied to every per-view tensor (c2w, fovy, elevation, azimuth,
        distance): slicing, reshaping, moving; ``height`` / ``width`` replace the image size when given."""
        return Cameras(fn(self.c2w), fn(self.fovy), fn(self.elevation), fn(self.azimuth), fn(self.distance),
                       self.height if height is None else height, self.width if width is None else width)

    def expand(self, n_prompts: int) -> "Cameras":
        """Materialise a shared camera set for ``n_prompts`` prompts (no copy)."""
        if self.fovy.shape[0] == n_prompts:
            return self
        assert self.shared, "only a shared camera set (P == 1) can be expanded"
        return self.map(lambda t: t.expand(n_prompts, *t.shape[1:]))

    def rows(self) -> "Cameras":
        """Flatten to one camera per image row, shape [1, P*V] (the prior's view of a batch)."""
        return self.map(lambda t: t.reshape(1, -1, *t.shape[2:]))

    def repeat_rows(self, repeats: int) -> "Cameras":
        """The per-row cameras of ``repeats`` stacked branches of this batch, [1, repeats*P*V]."""
        return self.rows().map(lambda t: torch.cat([t] * repeats, 1))

    def to(self, device) -> "Cameras":
        return self.map(lambda t: t.to(device))


def look_at(position: Tensor, target: Tensor | None = None) -> Tensor:
    """Camera-to-world matrices for cameras at ``position`` [..., 3] looking at ``target`` (z-up)."""
    if target is None:
        target = torch.zeros_like(position)
    z = torch.nn.functional.normalize(position - target, dim=-1)  # camera looks down -z
    up = torch.tensor([0.0, 0.0, 1.0], dtype=position.dtype, device=position.device).expand_as(z)
    x = torch.linalg.cross(up, z)
    # Straight above/below: any horizontal x works; pick +y-perpendicular one.
    degenerate = x.norm(dim=-1, keepdim=True) < 1e-6
    x = torch.where(degenerate, torch.tensor([0.0, -1.0, 0.0], dtype=x.dtype, device=x.device).expand_as(x), x)
    x = torch.nn.functional.normalize(x, dim=-1)
    y = torch.linalg.cross(z, x)
    c2w = torch.zeros(*position.shape[:-1], 4, 4, dtype=position.dtype, device=position.device)
    c2w[..., :3, 0], c2w[..., :3, 1], c2w[..., :3, 2], c2w[..., :3, 3] = x, y, z, position
    c2w[..., 3, 3] = 1.0
    return c2w


def spherical_position(elevation_deg: Tensor, azimuth_deg: Tensor, distance: Tensor) -> Tensor:
    el, az = torch.deg2rad(elevation_deg), torch.deg2rad(azimuth_deg)
    return torch.stack([distance * torch.cos(el) * torch.cos(az),
                        distance * torch.cos(el) * torch.sin(az),
                        distance * torch.sin(el)], dim=-1)


def make_cameras(elevation: Tensor, azimuth: Tensor, distance: Tensor, fovy_deg: Tensor,
                 height: int, width: int) -> Cameras:
    c2w = look_at(spherical_position(elevation, azimuth, distance))
    return Cameras(c2w, torch.deg2rad(fovy_deg), elevation, azimuth, distance, height, width)


def sphere_draw(cfg) -> str:
    """``cfg.sphere_draw``, or the sampler's reference when unset (stratified: sine, mvdream: mvdream)."""
    return cfg.sphere_draw or ("mvdream" if cfg.sampler == "mvdream" else "sine")


def _elevation(cfg, shape: tuple[int, int], generator: torch.Generator | None) -> Tensor:
    """Elevations in ``cfg.elevation_range`` [lo, hi] (degrees): a ``sphere_uniform_fraction`` of the draws
    "uniform on the sphere", the rest uniform in degrees. With u ~ U(0, 1) the sphere draw is

        sine:    el = asin(sin lo + u (sin hi - sin lo))                  uniform over the sphere's band
        mvdream: el = asin(2 (p_lo + u (p_hi - p_lo)) - 1),  p = (deg + 90) / 180

    ``mvdream`` is what MVDream-threestudio and ScaleDreamer's multi-view data module compute: it treats the
    degrees as a fraction of [-90, 90] and so covers [asin(2 p_lo - 1), asin(2 p_hi - 1)], [0, 19.47] deg for
    [0, 30], not the band the range names."""
    u = lambda: torch.rand(*shape, generator=generator)  # noqa: E731
    lo, hi = cfg.elevation_range
    el_deg = lo + (hi - lo) * u()
    if sphere_draw(cfg) == "mvdream":
        s_lo, s_hi = 2 * (lo + 90.0) / 180.0 - 1, 2 * (hi + 90.0) / 180.0 - 1
    else:
        s_lo, s_hi = math.sin(math.radians(lo)), math.sin(math.radians(hi))
    el_sph = torch.rad2deg(torch.asin(s_lo + (s_hi - s_lo) * u()))
    return torch.where(u() < cfg.sphere_uniform_fraction, el_sph, el_deg)


def sample_train_cameras(cfg, n_prompts: int, generator: torch.Generator | None = None) -> Cameras:
    """Draw ``[P, V]`` training cameras from ``cfg`` (a ``CameraConfig``) with its ``sampler``.

    ``stratified`` (ScaleDreamer's Stable Diffusion runs): every view its own elevation (``_elevation``),
    azimuth stratified over the views of each prompt, distance and fovy uniform in their ranges.
    ``mvdream``: ``sample_mvdream_cameras``, V / ``cfg.views_per_group()`` groups per prompt (MVDream-threestudio's
    batch of several n_view groups). With ``cfg.share_across_prompts`` one set of V cameras (P = 1) serves all
    prompts. ``cfg`` is one step's cameras (``CameraConfig.at_step``) where resolution milestones apply.
    """
    p = 1 if cfg.share_across_prompts else n_prompts
    if cfg.sampler == "mvdream":
        k = cfg.views_per_prompt // cfg.views_per_group()
        c = sample_mvdream_cameras(cfg, p * k, generator)  # [P * K, group]
        if k == 1:
            return c
        return c.map(lambda t: t.reshape(p, cfg.views_per_prompt, *t.shape[2:]))
    v = cfg.views_per_prompt
    u = lambda: torch.rand(p, v, generator=generator)  # noqa: E731
    elevation = _elevation(cfg, (p, v), generator)
    azimuth = (torch.arange(v).view(1, v) + u()) / v * 360.0 - 180.0
    d_lo, d_hi = cfg.distance_range
    distance = d_lo + (d_hi - d_lo) * u()
    f_lo, f_hi = cfg.fovy_range
    fovy = f_lo + (f_hi - f_lo) * u()
    return make_cameras(elevation, azimuth, distance, fovy, cfg.resolution, cfg.resolution)


def sample_mvdream_cameras(cfg, n_groups: int, generator: torch.Generator | None = None) -> Cameras:
    """MVDream's training cameras (its threestudio data module), ``[n_groups, V]`` with V = ``cfg.views_per_group()``:
    the V views of a group are 360/V degrees apart from a random start, and share one elevation (``_elevation``),
    one fovy in ``fovy_range`` and one distance ``d / tan(fovy / 2)`` with ``d`` uniform in ``distance_range``, so the
    object fills the same share of the image at every fov. Near/far come from the renderer's scene box,
    so the far cameras of a small fov (d / tan(7.5 deg) ~ 7.6 at 15 deg) still see the object (the
    reference's fixed far plane of 4 loses them)."""
    v = cfg.views_per_group()
    u = lambda: torch.rand(n_groups, 1, generator=generator)  # noqa: E731
    elevation = _elevation(cfg, (n_groups, 1), generator).expand(n_groups, v)
    azimuth = (u() + torch.arange(v).view(1, v)) / v * 360.0 - 180.0
    f_lo, f_hi = cfg.fovy_range
    fovy = (f_lo + (f_hi - f_lo) * u()).expand(n_groups, v)
    d_lo, d_hi = cfg.distance_range
    distance = (d_lo + (d_hi - d_lo) * u()).expand(n_groups, v) / torch.tan(torch.deg2rad(fovy) / 2)
    return make_cameras(elevation.contiguous(), azimuth, distance.contiguous(), fovy.contiguous(), cfg.resolution,
                        cfg.resolution)


def orbit_cameras(n_views: int, elevation: float, distance: float, fovy: float, resolution: int,
                  azimuth_offset: float | None = None) -> Cameras:
    """A shared [1, V] orbit at fixed elevation. The default azimuth offset (half a step) keeps
    evaluation views away from the 0/90/180/270 degree views a grid of training draws favours."""
    if azimuth_offset is None:
        azimuth_offset = 180.0 / n_views
    az = torch.arange(n_views, dtype=torch.float32) * 360.0 / n_views + azimuth_offset - 180.0
    full = lambda x: torch.full((1, n_views), float(x))  # noqa: E731
    return make_cameras(full(elevation), az.view(1, -1), full(distance), full(fovy), resolution, resolution)


def camera_rays(cams: Cameras) -> tuple[Tensor, Tensor]:
    """World-space rays through pixel centres: origins and unit directions, [P, V, H*W, 3]."""
    h, w = cams.height, cams.width
    dev, dt = cams.c2w.device, cams.c2w.dtype
    j, i = torch.meshgrid(torch.arange(h, device=dev, dtype=dt) + 0.5,
                          torch.arange(w, device=dev, dtype=dt) + 0.5, indexing="ij")
    focal = 0.5 * h / torch.tan(0.5 * cams.fovy)  # [P, V] pixels
    x = (i.reshape(1, 1, -1) - 0.5 * w) / focal[..., None]
    y = -(j.reshape(1, 1, -1) - 0.5 * h) / focal[..., None]
    d_cam = torch.stack([x, y, -torch.ones_like(x)], dim=-1)  # [P, V, HW, 3]
    rot = cams.c2w[..., :3, :3]
    dirs = torch.nn.functional.normalize(torch.einsum("pvij,pvnj->pvni", rot, d_cam), dim=-1)
    origins = cams.c2w[..., None, :3, 3].expand_as(dirs)
    return origins, dirs
