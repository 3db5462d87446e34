import torch

from scalegen.generators.hash_grid import HashGrid


def test_exact_at_grid_vertices_dense_and_hashed():
    g = HashGrid(n_levels=3, n_features=2, log2_size=10, base_resolution=4, max_resolution=32)
    assert g.dense.tolist()[0] and not g.dense.tolist()[-1]  # both kinds of level present
    with torch.no_grad():
        g.table.normal_()
    for level in range(3):
        res = int(g.resolution[level])
        ijk = torch.randint(0, res + 1, (50, 3))
        x = ijk.float() / res
        feat = g(x).view(50, 3, 2)[:, level]
        idx, w = g.corner_indices(x)
        # At a vertex exactly one corner has weight 1 and the feature is that table row.
        assert torch.allclose(w[:, :, level].max(0).values, torch.ones(50))
        row = idx[w[:, :, level].argmax(0), torch.arange(50), level]
        assert torch.allclose(feat, g.table[row])


def test_trilinear_between_vertices():
    g = HashGrid(n_levels=1, n_features=1, log2_size=12, base_resolution=4, max_resolution=4)
    with torch.no_grad():
        g.table.normal_()
    a, b = torch.tensor([[0.25, 0.5, 0.5]]), torch.tensor([[0.5, 0.5, 0.5]])
    mid = g(0.5 * (a + b))
    assert torch.allclose(mid, 0.5 * (g(a) + g(b)), atol=1e-6)


def test_gradients_match_autograd_reference():
    torch.manual_seed(0)
    g = HashGrid(n_levels=4, n_features=2, log2_size=8, base_resolution=4, max_resolution=64)
    with torch.no_grad():
        g.table.normal_()
    x = torch.rand(500, 3)
    out = g(x)
    weights = torch.randn_like(out)
    (out * weights).sum().backward()
    # Reference: the same interpolation with plain advanced indexing.
    table = g.table.detach().clone().requires_grad_()
    idx, w = g.corner_indices(x)
    ref = (table[idx] * w[..., None]).sum(0).reshape(500, -1)
    (ref * weights).sum().backward()
    assert torch.allclose(out, ref, atol=1e-6)
    assert torch.allclose(g.table.grad, table.grad, atol=1e-5)
    assert g.table.grad.abs().sum() > 0


def test_gradcheck_float64_two_chunks():
    """The hand-written backward (kept corner rows, complex-view scatter) against finite differences, in
    float64, over more points than one chunk."""
    from scalegen.generators.hash_grid import _HashEncode

    torch.manual_seed(0)
    g = HashGrid(n_levels=3, n_features=2, log2_size=6, base_resolution=2, max_resolution=16).double()
    x = torch.rand(40, 3, dtype=torch.float64)
    table = torch.randn_like(g.table).requires_grad_()
    assert torch.autograd.gradcheck(lambda t: _HashEncode.apply(t, x, g, 16, True), (table,))


def test_no_grad_encodings_are_reused_only_for_the_same_points_and_table():
    torch.manual_seed(0)
    g = HashGrid(n_levels=3, n_features=2, log2_size=8, base_resolution=4, max_resolution=32)
    x, y = torch.rand(100, 3), torch.rand(100, 3)
    with torch.no_grad():
        a = g(x)
        assert g(y) is not a and g(x.clone()) is a  # same points (another tensor): the kept features
        g.table.add_(1.0)  # the optimizer's in-place update
        b = g(x)
        g.table.data.mul_(2.0)  # a write the version counter does not see
        c = g(x)
    assert b is not a and not torch.equal(a, b)
    assert c is not b and not torch.equal(b, c)
    assert torch.equal(c, g(x).detach())  # with grad: computed, the same values
