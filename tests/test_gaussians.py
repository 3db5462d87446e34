"""3D Gaussian splatting: the torch rasterizer against analytic images and finite differences, the
density field, densification keeping the optimizer aligned, and the 3DGS PLY layout."""
import math

import numpy as np
import pytest
import torch

from scalegen.data.cameras import camera_rays, make_cameras, orbit_cameras
from scalegen.export.gaussian_ply import gaussian_ply_names, read_gaussian_ply, write_gaussian_ply
from scalegen.generators.gaussians import GaussianScene
from scalegen.render.gaussians import (GaussianField, GaussianRasterizer, gsplat_available, matrix_to_quaternion,
                                       quaternion_to_matrix, rgb_to_sh, sh_to_rgb)
from scalegen.text.base import TextCond


def _field(means, scales, quats, opac, rgb, dtype=torch.float32, sh_rest=None):
    sh = rgb_to_sh(torch.as_tensor(rgb, dtype=dtype))[:, None]
    if sh_rest is not None:
        sh = torch.cat([sh, torch.as_tensor(sh_rest, dtype=dtype)], 1)
    t = lambda x: torch.as_tensor(x, dtype=dtype)  # noqa: E731
    return GaussianField(t(means), t(scales).log(), t(quats), torch.logit(t(opac)), sh)


def _black(d):
    return torch.zeros(1, *d.shape[1:])


def test_single_gaussian_is_its_2d_marginal():
    """A 3D Gaussian far from the camera images as its marginal on the image plane: covariance the
    image-plane block of Sigma, times (f / d)^2 (plus the 0.3 px^2 low-pass). Camera on +x looking at the
    origin: image right = +y world, image up = +z world (OpenGL c2w, z-up)."""
    d, res, fovy = 20.0, 48, 8.0  # far and narrow: the projection is affine over the Gaussian
    cams = orbit_cameras(1, 0.0, d, fovy, res, azimuth_offset=180.0)  # azimuth 0: camera at +x
    theta = 0.6  # rotation about the view axis (world x)
    q = [math.cos(theta / 2), math.sin(theta / 2), 0.0, 0.0]
    s = torch.tensor([0.2, 0.15, 0.05])  # local x (along the view), local y, local z
    f = _field([[0.0, 0.0, 0.0]], [s.tolist()], [q], [0.8], [[0.9, 0.3, 0.1]], dtype=torch.float64)
    out = GaussianRasterizer(alpha_min=0.0, t_min=0.0)(f, cams, background=_black)
    rot = quaternion_to_matrix(torch.tensor(q, dtype=torch.float64))
    cov = rot @ torch.diag(s.double() ** 2) @ rot.T
    focal = 0.5 * res / math.tan(math.radians(fovy) / 2)
    # image axes: u along +y world, v (down) along -z world
    cov2d = (focal / d) ** 2 * torch.tensor([[cov[1, 1], -cov[1, 2]], [-cov[1, 2], cov[2, 2]]]) + 0.3 * torch.eye(2)
    ii = torch.arange(res, dtype=torch.float64) + 0.5
    du, dv = ii[None, :] - res / 2, ii[:, None] - res / 2
    delta = torch.stack([du.expand(res, res), dv.expand(res, res)], -1)
    m = torch.einsum("hwi,ij,hwj->hw", delta, torch.linalg.inv(cov2d), delta)
    alpha = 0.8 * torch.exp(-0.5 * m)
    inside = m < 8.0  # within the rasterizer's 3-sigma box everywhere
    assert (out.opacity[0, 0] - alpha)[inside].abs().max() < 1e-3
    assert (out.rgb[0, 0] - 0.9 * alpha)[inside].abs().max() < 1e-3
    assert (out.opacity[0, 0][~inside]).max() < 0.8 * math.exp(-4.0) + 1e-3
    # the depth of a hit is the distance to the Gaussian
    assert torch.allclose(out.depth[0, 0][inside], torch.full_like(out.depth[0, 0][inside], d), atol=1e-6)


def test_projection_lands_where_camera_rays_look():
    """A small Gaussian anywhere in view peaks at the pixel whose ray (data.cameras.camera_rays) passes
    closest to it: the rasterizer and the VolSDF renderer share one camera convention."""
    cams = make_cameras(torch.tensor([[25.0]]), torch.tensor([[40.0]]), torch.tensor([[1.4]]),
                        torch.tensor([[50.0]]), 40, 40)
    origins, dirs = camera_rays(cams)
    for p in ([0.1, -0.2, 0.15], [-0.25, 0.1, -0.1], [0.0, 0.3, 0.2]):
        f = _field([p], [[0.004] * 3], [[1.0, 0, 0, 0]], [0.9], [[1.0, 1.0, 1.0]])
        out = GaussianRasterizer()(f, cams, background=_black)
        peak = int(out.opacity[0, 0].flatten().argmax())
        pt = torch.tensor(p)
        to_p = pt - origins[0, 0]
        dist = (to_p - (to_p * dirs[0, 0]).sum(-1, keepdim=True) * dirs[0, 0]).norm(dim=-1)
        assert peak == int(dist.argmin())


def test_depth_order_and_compositing():
    """Two overlapping Gaussians: the nearer one is composited first whatever their storage order:
    C = c1 a1 + c2 a2 (1 - a1) + bg (1 - a1)(1 - a2) at the centre pixel."""
    cams = orbit_cameras(1, 0.0, 3.0, 30.0, 17, azimuth_offset=180.0)  # camera at +x
    bg = torch.tensor([0.2, 0.4, 0.6])
    near, far = ([0.3, 0, 0], [1.0, 0, 0], 0.7), ([-0.3, 0, 0], [0, 0, 1.0], 0.6)
    for first, second in ((near, far), (far, near)):
        f = _field([first[0], second[0]], [[0.1] * 3] * 2, [[1.0, 0, 0, 0]] * 2, [first[2], second[2]],
                   [first[1], second[1]])
        out = GaussianRasterizer()(f, cams, background=lambda d: bg.expand(1, *d.shape[1:3], 3))
        c = out.rgb[0, :, 8, 8]
        a1, a2 = 0.7, 0.6
        want = torch.tensor(near[1]) * a1 + torch.tensor(far[1]) * a2 * (1 - a1) + bg * (1 - a1) * (1 - a2)
        assert torch.allclose(c, want, atol=1e-4), (c, want)
        assert abs(float(out.opacity[0, 0, 8, 8]) - (1 - (1 - a1) * (1 - a2))) < 1e-4


def test_gradients_match_finite_differences():
    """Every input's gradient (means, log scales, quaternions, opacity logits, SH of degree 1, and so the
    projection, sorting, transmittance and view-dependent colour) against central differences, in
    float64, for colour, opacity and depth of two views."""
    torch.manual_seed(0)
    g = 5
    cams = orbit_cameras(2, 20.0, 1.6, 45.0, 12)
    means = (torch.rand(g, 3, dtype=torch.float64) - 0.5) * 0.4
    log_scales = torch.log(0.06 + 0.06 * torch.rand(g, 3, dtype=torch.float64))
    quats = torch.randn(g, 4, dtype=torch.float64)
    opac = torch.logit(0.3 + 0.5 * torch.rand(g, dtype=torch.float64))
    sh = torch.randn(g, 4, 3, dtype=torch.float64) * 0.3
    ren = GaussianRasterizer(alpha_min=0.0, t_min=0.0)
    bg = torch.rand(3, dtype=torch.float64)

    def render(m, ls, q, o, c):
        out = ren(GaussianField(m, ls, q, o, c), cams, background=lambda d: bg.expand(1, *d.shape[1:3], 3),
                  with_normals=True)
        return torch.cat([out.rgb.flatten(), out.opacity.flatten(), 0.1 * out.depth.flatten()])

    inputs = tuple(x.clone().requires_grad_(True) for x in (means, log_scales, quats, opac, sh))
    assert torch.autograd.gradcheck(render, inputs, eps=1e-6, atol=1e-5, rtol=1e-4, fast_mode=True)


def test_early_stop_and_alpha_floor_change_little():
    """3DGS's shortcuts (alpha < 1/255 dropped, a pixel stops once T < 1e-4) against exact compositing."""
    torch.manual_seed(1)
    g = 300
    pts = torch.nn.functional.normalize(torch.randn(g, 3), dim=-1) * 0.3
    f = GaussianField(pts, torch.full((g, 3), math.log(0.05)), torch.randn(g, 4), torch.full((g,), 2.0),
                      torch.rand(g, 1, 3))
    cams = orbit_cameras(2, 15.0, 1.3, 50.0, 32)
    fast = GaussianRasterizer()(f, cams)
    exact = GaussianRasterizer(alpha_min=0.0, t_min=0.0)(f, cams)
    # each dropped contribution is below 1/255: a few per pixel at most, ~nothing on average
    assert (fast.rgb - exact.rgb).abs().max() < 0.03 and (fast.rgb - exact.rgb).abs().mean() < 5e-3
    assert (fast.opacity - exact.opacity).abs().max() < 0.05 and (fast.opacity - exact.opacity).abs().mean() < 5e-3


def test_sh_degree_three_and_quaternion_round_trip():
    torch.manual_seed(2)
    rot = quaternion_to_matrix(torch.randn(50, 4))
    assert torch.allclose(quaternion_to_matrix(matrix_to_quaternion(rot)), rot, atol=1e-5)
    # degree 0 is the colour itself; higher bands vanish on average over the sphere (orthogonality)
    sh = torch.zeros(1, 16, 3)
    sh[0, 0] = rgb_to_sh(torch.tensor([0.2, 0.5, 0.7]))
    dirs = torch.nn.functional.normalize(torch.randn(20000, 3), dim=-1)
    assert torch.allclose(sh_to_rgb(sh.expand(20000, -1, -1), dirs)[0], torch.tensor([0.2, 0.5, 0.7]), atol=1e-6)
    sh[0, 5:] = 0.05 * torch.randn(11, 3)
    mean = sh_to_rgb(sh.expand(20000, -1, -1), dirs).mean(0)
    assert torch.allclose(mean, torch.tensor([0.2, 0.5, 0.7]), atol=0.01)


def test_density_field_and_its_mesh():
    """As a Field, the Gaussians are a density level set: the summed density against a direct sum, and
    marching cubes of a ball of Gaussians gives a closed surface near the expected radius."""
    from scalegen.export.mesh import extract_mesh

    torch.manual_seed(3)
    g = 400
    pts = torch.nn.functional.normalize(torch.randn(g, 3), dim=-1) * 0.25 * torch.rand(g, 1) ** (1 / 3)
    f = GaussianField(pts, torch.full((g, 3), math.log(0.06)), torch.randn(g, 4), torch.full((g,), 1.0),
                      rgb_to_sh(torch.tensor([[[0.8, 0.1, 0.1]]]).expand(g, 1, 3)), level=0.5)
    x = (torch.rand(500, 3) - 0.5) * 1.2
    rho, rgb = f.density_colour(x, chunk=64)
    d = x[:, None] - pts[None]
    direct = (torch.sigmoid(torch.tensor(1.0)) * torch.exp(-0.5 * d.pow(2).sum(-1) / 0.06 ** 2)).sum(-1)
    assert torch.allclose(rho, direct, atol=1e-4)
    assert torch.allclose(rgb[rho > 0.01], torch.tensor([0.8, 0.1, 0.1]).expand(int((rho > 0.01).sum()), 3), atol=1e-4)
    verts, faces, colours = extract_mesh(f, 0.75, 48)
    r = np.linalg.norm(verts, axis=1)
    assert len(faces) > 100 and 0.2 < np.median(r) < 0.4
    assert np.allclose(colours, [0.8, 0.1, 0.1], atol=1e-3)


def _cond(n=1):
    return TextCond(torch.zeros(n, 4), torch.zeros(n, 2, 4), torch.ones(n, 2, dtype=torch.bool))


def test_densify_and_prune_keep_the_optimizer_aligned():
    """Clones, splits and prunes change the rows of every parameter; each kept row keeps its Adam moments,
    new rows start at zero, the optimizer holds the new tensors, and training goes on while the last
    step's graph is still alive (a leaf resized in place would break autograd there)."""
    torch.manual_seed(4)
    scene = GaussianScene(n=8, radius=0.3, densify_grad=1e-3, percent_dense=0.2, extent=0.75, min_opacity=0.05,
                          max_scale=1.0)
    with torch.no_grad():
        scene.log_scales[:4] = math.log(0.01)  # small: cloned
        scene.log_scales[4:] = math.log(0.3)  # large: split
        scene.opacity_logits[7] = -6.0  # transparent: pruned
    groups = [{"params": ps, "lr": 1e-2, "name": n} for n, ps in scene.param_groups().items()]
    opt = torch.optim.Adam(groups)
    cams = orbit_cameras(2, 10.0, 1.5, 50.0, 16)
    ren = GaussianRasterizer()
    out = ren(scene(_cond()), cams)
    out.rgb.mean().backward()
    opt.step()
    before = {n: (getattr(scene, n).detach().clone(), opt.state[getattr(scene, n)]["exp_avg"].clone())
              for n in ("means", "opacity_logits")}
    big_before = scene.log_scales.detach().exp()[[4, 6]]
    scene.grad_accum = torch.tensor([1.0, 0.0, 1.0, 0.0, 1.0, 0.0, 1.0, 1.0])  # want: 0, 2 (clone) 4, 6, 7 (split)
    scene.grad_count = torch.ones(8)
    stale = out  # the last step's graph stays referenced, as the trainer's variables keep it
    scene.densify_and_prune(opt)
    # kept: 0 1 2 3 5 (4 and 6 were split, 7 split but its halves and itself are transparent: pruned)
    # appended: clones of 0 and 2, then two halves each of 4 and 6
    assert scene.n_gaussians == 5 + 2 + 4
    for name in ("means", "opacity_logits"):
        p = getattr(scene, name)
        assert any(p is q for grp in opt.param_groups for q in grp["params"])
        value, moment = before[name]
        kept = torch.tensor([0, 1, 2, 3, 5])
        assert torch.equal(p.detach()[:5], value[kept])
        assert torch.equal(opt.state[p]["exp_avg"][:5], moment[kept])
        assert torch.equal(opt.state[p]["exp_avg"][5:], torch.zeros_like(opt.state[p]["exp_avg"][5:]))
    assert torch.equal(scene.means.detach()[5:7], before["means"][0][[0, 2]])  # clones sit on their originals
    halves = torch.cat([big_before, big_before]) / 1.6  # split: two draws from each, scales / 1.6
    assert torch.allclose(scene.log_scales.detach()[7:].exp(), halves)
    out = ren(scene(_cond()), cams)
    out.rgb.mean().backward()
    opt.step()
    assert scene.means.grad.shape == (11, 3) and stale is not None


def test_densification_statistics_come_from_the_screen_gradient():
    torch.manual_seed(5)
    scene = GaussianScene(n=30, radius=0.3)
    cams = orbit_cameras(3, 10.0, 1.5, 50.0, 16)
    out = GaussianRasterizer()(scene(_cond()), cams)
    (out.rgb * torch.rand_like(out.rgb)).sum().backward()
    scene.after_backward(out)
    g = out.means2d.grad * torch.tensor([8.0, 8.0])  # pixels -> NDC: x (W / 2)
    want = (g.norm(dim=-1) * out.visible).sum(0)
    assert torch.allclose(scene.grad_accum, want) and torch.equal(scene.grad_count, out.visible.float().sum(0))


def test_a_vanished_scene_stops_training_with_a_clear_error():
    """Every Gaussian transparent (below the 1/255 alpha floor): nothing reaches a pixel, no gradient can bring
    it back, so the step raises a TrainingError that says so instead of a TypeError from deep inside."""
    from scalegen.errors import TrainingError

    scene = GaussianScene(n=30, radius=0.3, init_opacity=1e-4)
    out = GaussianRasterizer()(scene(_cond()), orbit_cameras(3, 10.0, 1.5, 50.0, 16))
    (out.rgb.sum() + out.opacity.sum() + scene.means.sum() * 0).backward()
    with pytest.raises(TrainingError, match="vanished: none of its 30 Gaussians covers a pixel"):
        scene.after_backward(out)


def test_scene_state_loads_any_number_of_gaussians():
    a, b = GaussianScene(n=20), GaussianScene(n=7)
    b.load_state_dict(a.state_dict())
    assert b.n_gaussians == 20 and torch.equal(b.means, a.means)
    with pytest.raises(Exception, match="one prompt"):
        a(_cond(2))


def test_ply_round_trip_with_the_standard_field_names(tmp_path):
    """The 3DGS layout: x y z nx ny nz f_dc_0..2 f_rest_* (channel-major) opacity scale_0..2 rot_0..3,
    binary little-endian float32, read back exactly."""
    from plyfile import PlyData

    torch.manual_seed(6)
    g, k = 37, 9  # degree 2
    t = {"means": torch.randn(g, 3), "log_scales": torch.randn(g, 3), "quats": torch.randn(g, 4),
         "opacity_logits": torch.randn(g), "sh": torch.randn(g, k, 3)}
    path = write_gaussian_ply(tmp_path / "s.ply", **t)
    ply = PlyData.read(str(path))
    names = [p.name for p in ply["vertex"].properties]
    assert names == (["x", "y", "z", "nx", "ny", "nz", "f_dc_0", "f_dc_1", "f_dc_2"]
                     + [f"f_rest_{i}" for i in range(24)] + ["opacity", "scale_0", "scale_1", "scale_2",
                                                              "rot_0", "rot_1", "rot_2", "rot_3"])
    assert names == gaussian_ply_names(2)
    assert ply.byte_order == "<" and not ply.text
    assert all(p.val_dtype in ("f4", "float32") for p in ply["vertex"].properties)
    v = ply["vertex"]
    # channel-major f_rest: red's 8 higher coefficients first, then green's, then blue's
    assert np.allclose(v["f_rest_0"], t["sh"][:, 1, 0].numpy()) and np.allclose(v["f_rest_8"], t["sh"][:, 1, 1].numpy())
    assert np.allclose(v["f_rest_9"], t["sh"][:, 2, 1].numpy()) and np.allclose(v["f_rest_23"], t["sh"][:, 8, 2].numpy())
    assert np.allclose(v["rot_0"], t["quats"][:, 0].numpy()) and np.allclose(v["opacity"], t["opacity_logits"].numpy())
    back = read_gaussian_ply(path)
    for name, x in t.items():
        assert torch.equal(back[name], x), name


@pytest.mark.skipif(not gsplat_available(), reason="gsplat's rasterizer needs the gsplat package and a CUDA device")
def test_gsplat_matches_the_torch_rasterizer():
    torch.manual_seed(7)
    g = 200
    f = GaussianField(torch.randn(g, 3).cuda() * 0.2, torch.full((g, 3), math.log(0.04)).cuda(), torch.randn(g, 4).cuda(),
                      torch.randn(g).cuda(), torch.rand(g, 4, 3).cuda() * 0.5)
    cams = orbit_cameras(3, 15.0, 1.4, 50.0, 48).to("cuda")
    a = GaussianRasterizer(backend="torch")(f, cams)
    b = GaussianRasterizer(backend="gsplat")(f, cams)
    assert (a.rgb - b.rgb).abs().mean() < 2e-3 and (a.opacity - b.opacity).abs().mean() < 2e-3


def test_without_gsplat_the_torch_rasterizer_runs(monkeypatch):
    """gsplat is optional: with the package missing (even on a CUDA machine) ``auto`` renders with torch,
    and asking for gsplat outright is a one-line ConfigError, not an ImportError."""
    import sys

    from scalegen.errors import ConfigError

    monkeypatch.setitem(sys.modules, "gsplat", None)  # `import gsplat` raises ImportError
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert not gsplat_available()
    torch.manual_seed(8)
    g = 50
    f = GaussianField(torch.randn(g, 3) * 0.2, torch.full((g, 3), math.log(0.05)), torch.randn(g, 4),
                      torch.randn(g), torch.rand(g, 1, 3))
    cams = orbit_cameras(2, 15.0, 1.4, 50.0, 16)
    a = GaussianRasterizer(backend="auto")(f, cams)
    b = GaussianRasterizer(backend="torch")(f, cams)
    assert torch.equal(a.rgb, b.rgb) and a.opacity.mean() > 0.01
    with pytest.raises(ConfigError, match="splat_backend=torch"):
        GaussianRasterizer(backend="gsplat")(f, cams)


@pytest.mark.parametrize("radii_dims", [2, 3])
def test_gsplat_radii_of_either_version_feed_densification(monkeypatch, radii_dims):
    """gsplat < 1.5 gives ``meta["radii"]`` as [V, G], gsplat >= 1.5 as [V, G, 2]. A fake ``gsplat`` module
    answers ``rasterization`` in each layout (images and means from the torch path); the renderer's gsplat
    branch, and densification after it, must see the same [V, G] visibility and statistics as the torch path."""
    import sys
    import types

    from scalegen.render.gaussians import project, rasterize

    torch.manual_seed(5)
    scene = GaussianScene(n=30, radius=0.3)
    cams = orbit_cameras(3, 10.0, 1.5, 50.0, 16)
    field = scene(_cond())
    c2w, fovy = cams.c2w[0], cams.fovy[0]

    def rasterization(means, quats, scales, opacities, colours, viewmats, ks, w, h, **kw):
        proj = project(field, c2w, fovy, h, w, 0.05, 0.3)
        rgb, op, depth, _ = rasterize(proj, h, w)
        radii = torch.where(proj.valid, proj.radii, 0.0).int()
        if radii_dims == 3:  # gsplat >= 1.5: x and y radii, both 0 where culled
            radii = torch.stack([radii, torch.where(radii > 0, (radii // 2).clamp(min=1), 0)], -1)
        return (torch.cat([rgb, depth], 1).permute(0, 2, 3, 1), op.permute(0, 2, 3, 1),
                {"means2d": proj.means2d, "radii": radii})

    monkeypatch.setitem(sys.modules, "gsplat", types.SimpleNamespace(rasterization=rasterization))
    monkeypatch.setattr(GaussianRasterizer, "use_gsplat", lambda self, f: True)
    out = GaussianRasterizer(backend="gsplat")(field, cams)
    ref = GaussianRasterizer(backend="torch")(scene(_cond()), cams)
    assert out.visible.shape == (3, 30) and out.visible.dtype == torch.bool
    assert torch.equal(out.visible, ref.visible) and out.visible.any()
    weights = torch.rand_like(out.rgb)
    (out.rgb * weights).sum().backward()
    scene.after_backward(out)
    g = out.means2d.grad * torch.tensor([8.0, 8.0])
    assert torch.equal(scene.grad_count, ref.visible.float().sum(0))
    assert torch.allclose(scene.grad_accum, (g.norm(dim=-1) * ref.visible).sum(0))
