"""The VolSDF renderer against an analytic sphere."""
import pytest
import torch

from scalegen.data.cameras import camera_rays, orbit_cameras
from scalegen.render.base import Field
from scalegen.render.volsdf import VolSDFRenderer, laplace_density


class SphereField(Field):
    """Exact sphere SDFs (radius per prompt) with constant colours: the Field interface."""

    def __init__(self, radii, colours):
        self.r = torch.tensor(radii)
        self.c = torch.tensor(colours)
        self.n_prompts = len(radii)

    def sdf(self, pts):
        return pts.norm(dim=-1).expand(self.n_prompts, -1) - self.r[:, None]

    def query(self, pts):
        s = self.sdf(pts)
        return s, self.c[:, None, :].expand(-1, s.shape[1], -1)


def ray_distance_to_centre(cams):
    o, d = camera_rays(cams)
    proj = (-o * d).sum(-1, keepdim=True)
    return (o + proj * d).norm(dim=-1)  # [P, V, R]


def reference_integral(cams, radius, beta, n=6000):
    """Opacity and expected depth of every ray by dense quadrature of the exact integrals
    T(s) = exp(-int_0^s sigma), opacity = int T sigma ds, depth = int s T sigma ds / opacity."""
    o, d = camera_rays(cams)
    s = torch.linspace(0.0, 3.0, n)
    pts = o[..., None, :] + d[..., None, :] * s[:, None]
    sigma = laplace_density(pts.norm(dim=-1) - radius, beta)
    ds = s[1] - s[0]
    tau = torch.cumsum(sigma, -1) * ds
    w = torch.exp(-tau) * sigma * ds
    op = w.sum(-1)
    return op[0], ((w * s).sum(-1) / op.clamp(min=1e-9))[0]


@pytest.mark.parametrize("composite", ["all", "fine"])
def test_sphere_against_exact_volume_rendering_integral(composite):
    beta, r = 1 / 30, 0.4
    ren = VolSDFRenderer(bound=0.75, samples=64, importance_samples=32, beta=beta, composite=composite).eval()
    cams = orbit_cameras(2, elevation=20.0, distance=1.5, fovy=40.0, resolution=32)
    field = SphereField([r], [[0.9, 0.2, 0.1]])
    out = ren(field, cams, background=lambda d: torch.zeros(1, *d.shape[1:]), with_normals=True)
    ref_op, ref_depth = reference_integral(cams, r, beta)
    op = out.opacity.view(2, -1)
    assert (op - ref_op).abs().max() < 0.02
    dist = ray_distance_to_centre(cams)[0]
    assert op[dist < r - 3 * beta].min() > 0.99 and op[dist > r + 8 * beta].max() < 0.01
    # Depth: against the exact expected termination, and near the analytic surface distance.
    depth = out.depth.view(2, -1)
    core = dist < 0.8 * r
    assert (depth[core] - ref_depth[core]).abs().max() < 0.005
    o, d = camera_rays(cams)
    surface = ((-o * d).sum(-1)[0] - (r**2 - dist.clamp(max=r) ** 2).sqrt())
    assert (depth[core] - surface[core]).abs().max() < beta
    # Colour over a black background is opacity * albedo.
    rgb = out.rgb.view(2, 3, -1)
    assert torch.allclose(rgb[:, 0], 0.9 * op, atol=1e-5)
    # Normals at the image centre point back to the camera.
    n = out.normals.view(2, 3, -1)
    centre = 16 * 32 + 16
    cam_dir = torch.nn.functional.normalize(cams.c2w[0, :, :3, 3], dim=-1)
    assert (n[:, :, centre] * cam_dir).sum(-1).min() > 0.95


def test_shared_and_per_prompt_cameras_agree():
    ren = VolSDFRenderer(bound=0.75, samples=48, importance_samples=0).eval()
    cams = orbit_cameras(2, elevation=10.0, distance=1.3, fovy=50.0, resolution=12)
    field = SphereField([0.3, 0.45], [[1.0, 0.0, 0.0], [0.0, 0.0, 1.0]])
    shared = ren(field, cams)
    per_prompt = ren(field, cams.expand(2))
    assert torch.allclose(shared.rgb, per_prompt.rgb, atol=1e-5)
    assert shared.rgb.shape == (4, 3, 12, 12) and shared.opacity.shape == (4, 1, 12, 12)


def test_near_far_come_from_the_box():
    # A camera far away with a small box: every sample lies inside the box, so a sphere larger than
    # the old fixed far plane of reference renders is still rendered fully.
    ren = VolSDFRenderer(bound=0.5, samples=32, importance_samples=16).eval()
    cams = orbit_cameras(1, elevation=0.0, distance=6.0, fovy=8.0, resolution=16)
    out = ren(SphereField([0.3], [[1, 1, 1]]), cams)
    assert out.opacity.max() > 0.99


def test_eikonal_of_exact_sdf_is_zero():
    ren = VolSDFRenderer(bound=0.75, samples=16, importance_samples=8, eikonal_points=512).train()
    cams = orbit_cameras(1, elevation=0.0, distance=1.5, fovy=40.0, resolution=8)
    out = ren(SphereField([0.4], [[1, 1, 1]]), cams, with_eikonal=True)
    assert out.eikonal.item() < 1e-4


def test_laplace_density_values():
    beta = 0.1
    s = torch.tensor([-10.0, 0.0, 10.0])
    dens = laplace_density(s, beta)
    assert torch.allclose(dens, torch.tensor([1 / beta, 0.5 / beta, 0.0]), atol=1e-3)
