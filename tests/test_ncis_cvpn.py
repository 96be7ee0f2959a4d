"""cVPN: exact inverse, unit Jacobian determinant, orthogonality; K from PCA on synthetic manifolds; the fit."""
import numpy as np
import pytest
import torch

from openood_diffguard.ncis import CVPN, ClassGaussians, fit_cvpn, invariant_mse, num_invariants


@pytest.fixture(autouse=True)
def _threads(single_thread):
    yield


@pytest.mark.parametrize("dim", [5, 6])
def test_cvpn_is_an_exact_bijection_in_both_directions(dim):
    torch.manual_seed(0)
    net = CVPN(dim, num_classes=3, num_layers=3).double()
    x = torch.randn(40, dim, dtype=torch.float64) * 3
    y = torch.randint(0, 3, (40,))
    v = net(x, y)
    assert not torch.allclose(v, x)
    torch.testing.assert_close(net.reverse(v, y), x, atol=1e-10, rtol=0)
    torch.testing.assert_close(net(net.reverse(x, y), y), x, atol=1e-10, rtol=0)
    # the class condition matters: another label gives another map
    assert (net(x, (y + 1) % 3) - v).abs().max() > 1e-3


def test_cvpn_jacobian_determinant_is_one_and_rotations_orthogonal():
    torch.manual_seed(1)
    net = CVPN(5, num_classes=2, num_layers=2).double()
    for layer in net.layers[::2]:
        q = layer.q
        torch.testing.assert_close(q @ q.T, torch.eye(5, dtype=torch.float64), atol=1e-12, rtol=0)
    for label in (0, 1):
        for seed in range(3):
            x0 = torch.randn(5, dtype=torch.float64, generator=torch.Generator().manual_seed(seed))
            jac = torch.autograd.functional.jacobian(lambda x: net(x[None], torch.tensor([label]))[0], x0)
            assert abs(float(torch.linalg.det(jac)) - 1.0) < 1e-10
            assert float((jac - torch.eye(5, dtype=torch.float64)).abs().max()) > 0.1  # not trivially identity


def test_cvpn_rejects_bad_inputs():
    net = CVPN(4, num_classes=2)
    with pytest.raises(ValueError, match=r"\[B, 4\]"):
        net(torch.zeros(3, 5), torch.zeros(3, dtype=torch.long))
    with pytest.raises(ValueError, match="labels must lie in"):
        net(torch.zeros(3, 4), torch.tensor([0, 1, 2]))
    with pytest.raises(ValueError, match="dim must be"):
        CVPN(1, 2)


def _subspace_class(rng, n, dim, d, noise=1e-4):
    basis = np.linalg.qr(rng.normal(size=(dim, dim)))[0][:, :d]
    return rng.normal(size=(n, d)) * 3 @ basis.T + rng.normal(size=dim) + noise * rng.normal(size=(n, dim))


def test_num_invariants_known_answers_on_linear_and_curved_manifolds():
    rng = np.random.default_rng(0)
    D = 10
    # class 0: 3-d linear subspace, class 1: a circle (curved; spans 2 linear directions), tiny noise elsewhere
    x0 = _subspace_class(rng, 200, D, 3)
    th = rng.uniform(0, 2 * np.pi, 200)
    rot = np.linalg.qr(rng.normal(size=(D, D)))[0]
    x1 = (np.c_[np.cos(th), np.sin(th), np.zeros((200, D - 2))] * 5 + 1e-4 * rng.normal(size=(200, D))) @ rot
    x = np.r_[x0, x1]
    y = np.r_[np.zeros(200), np.ones(200)].astype(int)
    assert num_invariants(x0, np.zeros(200, int), p=2) == D - 3
    assert num_invariants(x1, np.zeros(200, int), p=2) == D - 2
    assert num_invariants(x, y, p=2) == int((7 + 8) / 2)  # floor of the class mean
    # the released code's rule counts one direction more
    assert num_invariants(x0, np.zeros(200, int), p=2, convention="code") == D - 3 + 1
    # fewer samples than dimensions: the zero-variance directions are invariants too
    basis = np.linalg.qr(rng.normal(size=(D, D)))[0][:, :3]
    small = np.r_[np.eye(3), -np.eye(3)] * 3 @ basis.T  # 6 points, equal variance in 3 directions
    assert num_invariants(small, np.zeros(6, int), p=2) == D - 3


def test_num_invariants_bad_arguments():
    x, y = np.zeros((5, 3)), np.zeros(5, int)
    with pytest.raises(ValueError, match=r"\(0, 100\)"):
        num_invariants(x, y, p=0)
    with pytest.raises(ValueError, match="convention"):
        num_invariants(x, y, p=2, convention="x")
    with pytest.raises(ValueError, match="at least 2"):
        num_invariants(x[:1], y[:1], p=2)


def _parabolas(n=256, seed=0):
    """Two classes on curved 1-d manifolds in R^2: no linear invariant exists, a non-linear one does."""
    g = torch.Generator().manual_seed(seed)
    s = torch.rand(n, generator=g) * 4 - 2
    y = torch.arange(n) % 2
    x = torch.stack([s, torch.where(y == 0, s ** 2, -0.5 * s ** 2 + 1)], 1)
    return x + 0.01 * torch.randn(n, 2, generator=g), y


def test_fit_cvpn_finds_nonlinear_invariants_and_resumes_exactly():
    x, y = _parabolas()
    cfg = {"epochs": 40, "batch_size": 64, "lr": 1e-2, "num_layers": 2, "hidden_mult": 32, "seed": 0}
    model, info = fit_cvpn(x, y, k=1, config=cfg, progress=False)
    linear = min(float(torch.linalg.svdvals(x[y == c] - x[y == c].mean(0))[-1] ** 2 / (y == c).sum()) for c in (0, 1))
    assert info["best_mse"] == pytest.approx(invariant_mse(model, x, y, 1), rel=1e-6)
    assert info["history"][0]["eval_mse"] > linear  # a random cVPN is worse than the best linear invariant ...
    assert info["best_mse"] < 0.2 * linear  # ... the fitted one far better: the invariant is non-linear
    torch.testing.assert_close(model.reverse(model(x, y), y), x, atol=1e-4, rtol=0)
    # resume: a 6-epoch run killed after epoch 3, continued from its saved state == 6 epochs in one go
    states = []

    def kill_after_3(payload):
        states.append(payload)
        if payload["epoch"] == 3:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        fit_cvpn(x, y, 1, {**cfg, "epochs": 6}, progress=False, on_epoch=kill_after_3)
    resumed, _ = fit_cvpn(x, y, 1, {**cfg, "epochs": 6}, state=states[-1], progress=False)
    direct, _ = fit_cvpn(x, y, 1, {**cfg, "epochs": 6}, progress=False)
    for a, b in zip(resumed.state_dict().values(), direct.state_dict().values()):
        torch.testing.assert_close(a, b, atol=0, rtol=0)


def test_fit_cvpn_bad_arguments():
    x, y = _parabolas(16)
    with pytest.raises(ValueError, match=r"k \(number of invariants\)"):
        fit_cvpn(x, y, k=2, progress=False)
    with pytest.raises(TypeError, match="unknown cVPN fit option"):
        fit_cvpn(x, y, k=1, config={"epoch": 3}, progress=False)
    with pytest.raises(ValueError, match="NaN"):
        fit_cvpn(torch.full((4, 2), float("nan")), torch.zeros(4, dtype=torch.long), k=1, progress=False)


# ------------------------------------------------------------------------------------------ sampler
def _blobs(seed=0, D=4):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(300, D, generator=g, dtype=torch.float64) * torch.tensor([3.0, 1.0, 0.5, 0.0][:D], dtype=torch.float64)
    y = torch.arange(300) % 3
    return x + y[:, None].double() * 10, y


def test_boundary_samples_equal_the_released_procedure():
    """Reference: MultivariateNormal(mu, cov + lambda I), log_prob of each candidate, top-k of -log p."""
    x, y = _blobs()
    gauss = ClassGaussians(reg=1e-3).fit(x, y)
    got, labels = gauss.sample_boundary(per_class=20, candidates=50, keep=5, seed=7, dtype=torch.float64)
    assert labels.tolist() == sum(([c] * 20 for c in range(3)), [])
    for c in range(3):
        xc = x[y == c]
        dist = torch.distributions.MultivariateNormal(xc.mean(0), torch.cov(xc.T) + 1e-3 * torch.eye(4, dtype=torch.float64))
        g = torch.Generator().manual_seed(7 * 1_000_003 + c)
        z = torch.randn(4, 50, 4, generator=g, dtype=torch.float64)
        cand = xc.mean(0) + z @ torch.linalg.cholesky(dist.covariance_matrix).T
        ref = torch.cat([r[torch.topk(-dist.log_prob(r), 5).indices] for r in cand])
        torch.testing.assert_close(got[labels == c], ref, atol=1e-9, rtol=0)
        torch.testing.assert_close(gauss.log_prob(ref, torch.full((20,), c)), dist.log_prob(ref), atol=1e-9, rtol=0)


def test_sampler_is_deterministic_and_class_independent():
    x, y = _blobs()
    gauss = ClassGaussians(reg=1e-4).fit(x, y)
    a, _ = gauss.sample_boundary(per_class=12, candidates=40, keep=4, seed=3)
    b, _ = gauss.sample_boundary(per_class=12, candidates=40, keep=4, seed=3)
    c, _ = gauss.sample_boundary(per_class=12, candidates=40, keep=4, seed=4)
    only2, _ = gauss.sample_boundary(per_class=12, candidates=40, keep=4, seed=3, classes=[2])
    torch.testing.assert_close(a, b, atol=0, rtol=0)
    assert not torch.allclose(a, c)
    torch.testing.assert_close(only2, a[24:], atol=0, rtol=0)
    # every class has its own stream: the whitened draws differ between classes
    z = [torch.linalg.solve_triangular(gauss.chol[c], (a[12 * c:12 * (c + 1)].double() - gauss.means[c]).T, upper=False).T
         for c in range(2)]
    assert (z[0] - z[1]).abs().max() > 0.1


def test_lambda_sets_the_spread_along_degenerate_directions_and_transform_maps_back():
    x, y = _blobs()  # coordinate 3 has zero variance: lambda alone sets the samples' spread there
    spread = {}
    for reg in (1e-4, 1e-2):
        s, _ = ClassGaussians(reg).fit(x, y).sample_boundary(per_class=200, candidates=20, keep=20, seed=0,
                                                             dtype=torch.float64)
        spread[reg] = float(torch.stack([s[:200 * (c + 1)][-200:, 3].std() for c in range(3)]).mean())
    assert spread[1e-2] / spread[1e-4] == pytest.approx(10.0, rel=0.15)
    torch.manual_seed(0)
    net = CVPN(4, 3, num_layers=1).double()
    gauss = ClassGaussians(1e-3).fit(net(x, y).detach(), y)
    v, lab = gauss.sample_boundary(per_class=5, candidates=30, keep=5, seed=1, dtype=torch.float64)
    e, _ = gauss.sample_boundary(per_class=5, candidates=30, keep=5, seed=1, transform=net.reverse, dtype=torch.float64)
    torch.testing.assert_close(e, net.reverse(v, lab), atol=1e-12, rtol=0)
    with pytest.raises(ValueError, match="not positive definite"):
        ClassGaussians(0.0).fit(x, y)
    with pytest.raises(ValueError, match="keep"):
        gauss.sample_boundary(keep=40, candidates=30)
