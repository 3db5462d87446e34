import math

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
