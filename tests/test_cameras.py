import math

import pytest
import torch

from scalegen.config import load_config
from scalegen.data.cameras import camera_rays, orbit_cameras, sample_train_cameras


def test_look_at_points_camera_at_origin():
    cams = orbit_cameras(4, elevation=30.0, distance=2.0, fovy=50.0, resolution=9)
    o, d = camera_rays(cams)
    centre = d[0, :, 4 * 9 + 4]  # the central pixel
    to_origin = torch.nn.functional.normalize(-o[0, :, 0], dim=-1)
    assert torch.allclose(centre, to_origin, atol=1e-5)
    # z-up: the camera's image "up" (+y) has a positive world-z component at 30 deg elevation.
    assert (cams.c2w[0, :, 2, 1] > 0).all()
    assert torch.allclose(o[0, :, 0].norm(dim=-1), torch.full((4,), 2.0))
    assert torch.allclose(d.norm(dim=-1), torch.ones(1))


def test_top_row_of_pixels_looks_up():
    cams = orbit_cameras(1, elevation=0.0, distance=2.0, fovy=60.0, resolution=8)
    _, d = camera_rays(cams)
    img = d[0, 0].view(8, 8, 3)
    assert img[0, :, 2].mean() > 0 > img[-1, :, 2].mean()  # first image row sees the sky (+z)
    half = math.radians(30.0)
    assert abs(math.atan2(img[0, 4, 2].item(), img[0, 4, 0].abs().item() + 1e-9)) < half


def test_training_distribution():
    cfg = load_config(None, ["camera.views_per_prompt=4", "camera.share_across_prompts=false"])
    torch.manual_seed(0)
    cams = [sample_train_cameras(cfg.camera, 64) for _ in range(8)]
    el = torch.cat([c.elevation.flatten() for c in cams])
    assert el.min() >= -10 - 1e-4 and el.max() <= 45 + 1e-4
    dist = torch.cat([c.distance.flatten() for c in cams])
    assert dist.min() >= 1.0 and dist.max() <= 1.5
    fov = torch.rad2deg(torch.cat([c.fovy.flatten() for c in cams]))
    assert fov.min() >= 40 - 1e-4 and fov.max() <= 70 + 1e-4
    az = cams[0].azimuth  # stratified: view k of every prompt lies in its own quarter
    for k in range(4):
        lo = -180 + 90 * k
        assert ((az[:, k] >= lo) & (az[:, k] <= lo + 90)).all()
    assert cams[0].shape == (64, 4)
    shared = sample_train_cameras(load_config(None, []).camera, 8)
    assert shared.shape == (1, 4) and shared.expand(8).shape == (8, 4)


def test_mvdream_sampler():
    """MVDream's cameras: the views of an object 90 degrees apart from a random start, one elevation in
    [0, 30], one fovy in [15, 60] and one distance d / tan(fovy / 2), d in [0.8, 1.0], per object."""
    cfg = load_config(None, ["camera.sampler=mvdream", "camera.views_per_prompt=4", "camera.share_across_prompts=false",
                             "camera.elevation_range=[0, 30]", "camera.fovy_range=[15, 60]",
                             "camera.distance_range=[0.8, 1.0]"])
    torch.manual_seed(0)
    cams = sample_train_cameras(cfg.camera, 512)
    assert cams.shape == (512, 4)
    for x in (cams.elevation, cams.fovy, cams.distance):
        assert (x == x[:, :1]).all()  # shared by the object's views
    gaps = (cams.azimuth[:, 1:] - cams.azimuth[:, :-1])
    assert torch.allclose(gaps, torch.full_like(gaps, 90.0), atol=1e-4)
    start = cams.azimuth[:, 0]
    assert start.min() >= -180 and start.max() < -90 and start.std() > 20  # a random start, uniform over a quarter
    el, fov = cams.elevation[:, 0], torch.rad2deg(cams.fovy[:, 0])
    assert el.min() >= -1e-4 and el.max() <= 30 + 1e-4 and el.std() > 5
    assert fov.min() >= 15 - 1e-4 and fov.max() <= 60 + 1e-4
    rel = cams.distance[:, 0] * torch.tan(cams.fovy[:, 0] / 2)
    assert rel.min() >= 0.8 - 1e-5 and rel.max() <= 1.0 + 1e-5
    assert cams.distance.max() > 5.0  # small fovs put the camera far out (d / tan(7.5 deg) ~ 7.6)
    # the camera positions really are at those angles and distances
    pos = cams.c2w[..., :3, 3]
    assert torch.allclose(pos.norm(dim=-1), cams.distance, rtol=1e-5)
    assert torch.allclose(torch.rad2deg(torch.asin(pos[..., 2] / cams.distance)), cams.elevation, atol=1e-3)
    shared = sample_train_cameras(load_config(None, ["camera.sampler=mvdream"]).camera, 8)
    assert shared.shape == (1, 4)


def test_far_mvdream_cameras_still_see_the_object():
    """The smallest fov puts the camera ~7.6 from the centre, past the reference's fixed far plane of 4:
    near/far come from the scene box, so the object is rendered."""
    from scalegen.data.cameras import make_cameras
    from scalegen.render.base import Field
    from scalegen.render.volsdf import VolSDFRenderer

    class Ball(Field):
        n_prompts = 1

        def query(self, pts):
            s = pts.norm(dim=-1) - 0.6
            return s, torch.ones(*s.shape, 3)

    fovy = torch.full((1, 4), 15.0)
    dist = 1.0 / torch.tan(torch.deg2rad(fovy) / 2)
    cams = make_cameras(torch.full((1, 4), 15.0), torch.tensor([[0.0, 90, 180, 270]]), dist, fovy, 16, 16)
    out = VolSDFRenderer(bound=2.0, samples=32, importance_samples=16).eval()(Ball(), cams)
    centre = out.opacity[:, 0, 6:10, 6:10]
    assert dist[0, 0] > 7.5 and centre.min() > 0.99


def _ks(samples: torch.Tensor, cdf) -> float:
    """Kolmogorov-Smirnov statistic sup |F_n - F| of ``samples`` against the exact ``cdf``."""
    x = samples.double().sort().values
    n = len(x)
    f = cdf(x)
    i = torch.arange(1, n + 1, dtype=torch.float64)
    return float(torch.maximum(i / n - f, f - (i - 1) / n).max())


def _mixture_cdf(draw: str):
    """Exact CDF of the elevation mixture for [0, 30] deg: half U[0, 30] deg, half the sphere draw.
    mvdream: sin(el) ~ U[0, 1/3] (asin(2 U[1/2, 2/3] - 1)); sine: sin(el) ~ U[0, 1/2]."""
    top = 1.0 / 3.0 if draw == "mvdream" else 0.5
    return lambda e: 0.5 * (e / 30.0).clamp(0, 1) + 0.5 * (torch.sin(torch.deg2rad(e)) / top).clamp(0, 1)


def test_mvdream_elevations_follow_the_references_formula():
    """The paper config's MVDream cameras draw elevation as MVDream-threestudio / ScaleDreamer's
    uncond_multiview.py do: half U[0, 30] deg, half asin(2 ((el + 90)/180) - 1) with el ~ U[0, 30], i.e. within
    [0, 19.47] deg. 40000 draws: the KS statistic against that exact CDF is at sampling level
    (1.63 / sqrt(n) is the 1% point) and far from the true-uniform draw's; the mixture's mean is the exact
    (15 + asin(1/3) + 3 (sqrt(8/9) - 1) rad) / 2 = 12.32 deg."""
    from scalegen.data.cameras import sphere_draw

    cfg = load_config("configs/mvdream/triplane_asd_dl17k.yaml", [])
    assert cfg.camera.sampler == "mvdream" and sphere_draw(cfg.camera) == "mvdream"
    n = 40000
    gen = torch.Generator().manual_seed(0)
    el = sample_train_cameras(cfg.camera, n, generator=gen).elevation[:, 0]
    assert _ks(el, _mixture_cdf("mvdream")) < 1.63 / math.sqrt(n)
    assert _ks(el, _mixture_cdf("sine")) > 0.05
    sphere_mean = math.degrees(math.asin(1 / 3) + 3 * (math.sqrt(8 / 9) - 1))
    exact_mean = 0.5 * (15.0 + sphere_mean)
    assert abs(exact_mean - 12.32) < 0.01
    assert abs(float(el.double().mean()) - exact_mean) < 0.15  # sd of the mean ~ 0.04 deg
    assert float((el > 19.48).float().mean()) == pytest.approx(0.5 * (30 - 19.47) / 30, abs=0.01)
    # the corrected draw stays one key away, and the SD sampler keeps uncond.py's sine draw by default
    true = load_config("configs/mvdream/triplane_asd_dl17k.yaml", ["camera.sphere_draw=sine"])
    el_true = sample_train_cameras(true.camera, n, generator=torch.Generator().manual_seed(0)).elevation[:, 0]
    assert _ks(el_true, _mixture_cdf("sine")) < 1.63 / math.sqrt(n)
    assert sphere_draw(load_config(None, []).camera) == "sine"
    assert sphere_draw(load_config(None, ["camera.sampler=mvdream"]).camera) == "mvdream"


def test_cameras_map_applies_to_every_per_view_tensor_and_keeps_the_size_unless_given():
    cams = orbit_cameras(6, elevation=15.0, distance=1.5, fovy=60.0, resolution=16)
    half = cams.map(lambda t: t[:, ::2])
    for name in ("c2w", "fovy", "elevation", "azimuth", "distance"):
        assert torch.equal(getattr(half, name), getattr(cams, name)[:, ::2])
    assert (half.height, half.width) == (16, 16) and half.shape == (1, 3)
    assert (cams.map(lambda t: t, 8, 12).height, cams.map(lambda t: t, 8, 12).width) == (8, 12)
    assert torch.equal(cams.expand(3).rows().fovy, cams.fovy.repeat(1, 3))
