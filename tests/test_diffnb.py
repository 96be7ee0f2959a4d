"""DiffNB on an analytic class-conditional Gaussian mixture with the matching (Bayes) linear classifier:
components the model knows come back close to themselves, a held-out component is pulled away."""
import warnings

import pytest
import torch
from sklearn.metrics import roc_auc_score

from digits_net import single_thread  # noqa: F401 (autouse: one CPU thread)
from openood_diffguard.diffusion.analytic import GaussianMixtureModel
from openood_diffguard.detectors.diffnb import DiffNB

SHAPE = (3, 4, 4)


class NearestMean(torch.nn.Module):
    """Bayes classifier of an isotropic mixture with equal weights: logits_k = <x, mu_k> - |mu_k|^2 / 2.
    Images arrive normalised with mean = std = 0.5, i.e. already in [-1, 1] = the model's space."""

    def __init__(self, means):
        super().__init__()
        self.register_buffer("m", means.flatten(1).float())

    def forward(self, x, return_feature=False):
        f = x.flatten(1)
        logits = f @ self.m.T - 0.5 * (self.m ** 2).sum(1)
        return (logits, f) if return_feature else logits


def _setup(linear_schedule, seed=0):
    g = torch.Generator().manual_seed(seed)
    means = (torch.rand((4, *SHAPE), generator=g) - 0.5) * 1.2  # 4 components inside [-0.6, 0.6]
    sigma = 0.12
    known = GaussianMixtureModel(means[:3], sigma, linear_schedule)  # the model never saw component 3
    full = GaussianMixtureModel(means, sigma, linear_schedule)
    x_id, _ = full.sample_data(60, torch.arange(3).repeat(20), generator=g)
    x_ood, _ = full.sample_data(30, torch.full((30,), 3), generator=g)
    return known, NearestMean(means[:3]), x_id.clamp(-1, 1), x_ood.clamp(-1, 1)


def _detector(model, **kw):
    det = DiffNB(normalization="unknown", **kw)
    det.model = model
    return det


def test_known_vs_heldout_component_separate(linear_schedule):
    model, net, x_id, x_ood = _setup(linear_schedule)
    det = _detector(model, timesteps=[300], repeats=4, cfg_scale=3.0)
    conf_id = det.predict(net, x_id)[1]
    conf_ood = det.predict(net, x_ood)[1]
    y = torch.cat([torch.ones(len(conf_id)), torch.zeros(len(conf_ood))])
    auroc = roc_auc_score(y, torch.cat([conf_id, conf_ood]))
    assert auroc > 0.9, auroc
    # score sign: ID neighbours are closer, so ID confidence (= -distance) is higher on average
    assert conf_id.mean() > conf_ood.mean()


def test_shapes_determinism_and_timestep_set(linear_schedule):
    model, net, x_id, _ = _setup(linear_schedule)
    det = _detector(model, timesteps=[120, 240, 360], repeats=2)
    s1 = det.statistics(net, x_id[:5])
    s2 = det.statistics(net, x_id[:5])
    assert set(s1) == {"pred", "dist_t120", "dist_t240", "dist_t360"}
    for k in s1:
        assert s1[k].shape == (5,)
        torch.testing.assert_close(s1[k], s2[k])  # seeded noise: identical repeats
    assert torch.all(s1["dist_t360"] >= 0)
    chunked = _detector(model, timesteps=[120, 240, 360], repeats=2, max_model_batch=7).statistics(net, x_id[:5])
    for k in s1:
        torch.testing.assert_close(chunked[k], s1[k])  # chunking the model batch changes nothing
    # all timesteps run in one batch with per-sample starts: each equals a run with that timestep alone
    for t in (120, 360):
        alone = _detector(model, timesteps=[t], repeats=2).statistics(net, x_id[:5])
        torch.testing.assert_close(alone[f"dist_t{t}"], s1[f"dist_t{t}"], atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(det.confidence(s1), -torch.stack([s1[f"dist_t{t}"] for t in (120, 240, 360)]).mean(0))
    # repeats use different noise: R=1 with another seed gives a different value
    other = _detector(model, timesteps=[120, 240, 360], repeats=2, seed=1).statistics(net, x_id[:5])
    assert not torch.allclose(other["dist_t120"], s1["dist_t120"])


def test_feature_space_and_errors(linear_schedule, monkeypatch):
    """Feature space: the distance written out from its definition (pooled feature clipped from above at
    feature_clip, L2-normalised, L1 to the input's, mean over repeats) on the neighbours the detector made."""
    import openood_diffguard.detectors.diffnb as diffnb

    model, net, x_id, _ = _setup(linear_schedule)
    seen, embed = [], diffnb._embed
    monkeypatch.setattr(diffnb, "_embed", lambda n, x, *a: (seen.append(x.clone()), embed(n, x, *a))[1])
    s = _detector(model, space="feature", feature_clip=0.3, repeats=2).statistics(net, x_id[:4])
    images, neighbours = seen  # the inputs, then repeats x batch reconstructions

    def rep(x):  # NearestMean's feature is the flattened image
        f = x.flatten(1).clamp(max=0.3)
        return f / f.norm(dim=1, keepdim=True)

    assert torch.equal(images, x_id[:4]) and neighbours.shape == (8, *SHAPE)
    expected = (rep(neighbours).view(2, 4, -1) - rep(images)).abs().sum(-1).mean(0)
    torch.testing.assert_close(s["dist_t300"], expected)
    assert (x_id[:4] > 0.3).any()  # the clip is active on these inputs
    with pytest.raises(ValueError, match="multiples of stride"):
        DiffNB(timesteps=[310])
    with pytest.raises(ValueError, match="model_path"):
        DiffNB().statistics(net, x_id[:2])
    with pytest.raises(ValueError, match="classes"):
        _detector(model).statistics(NearestMean(torch.zeros(5, *SHAPE)), x_id[:2])
    with pytest.raises(ValueError, match="un-normalised"):
        _detector(model).statistics(net, x_id[:2] * 10)


def test_score_does_not_depend_on_batch_composition(linear_schedule):
    """Common random numbers: a sample scores the same alone or inside any batch (cache consistency)."""
    model, net, x_id, x_ood = _setup(linear_schedule)
    det = _detector(model, timesteps=[120, 300], repeats=2)
    x = torch.cat([x_id[:2], x_ood[:2]])
    full = det.statistics(net, x)
    for idx in ([0], [3, 1], [2]):
        part = det.statistics(net, x[idx])
        for k in part:
            torch.testing.assert_close(part[k], full[k][idx])


def test_code_grid_equals_the_released_codes_sampler(linear_schedule):
    """grid 'code' (default) = DiffOOD's multi_iteration with method DDIM written out here: noise at
    alpha_bar[t], steps seq = t-1, t-1-stride, ..., 19 -> -1 with alphas[i + 1] (the model sees i = t - 1
    ...), CFG (1 + beta) eps_y - beta eps_null with beta = 2, ending at level 0; 15 steps x 2 for t = 300."""
    model, net, x_id, _ = _setup(linear_schedule)
    x = x_id[:3]
    calls = []
    counted = _detector(model, timesteps=[300], repeats=2)
    raw = model._raw
    model._raw = lambda xx, t, y: (calls.append(len(xx)), raw(xx, t, y))[1]
    try:
        got = counted.statistics(net, x)["dist_t300"]
        assert sum(calls) == 3 * 2 * 15 * 2
        calls.clear()
        _detector(model, timesteps=[300], repeats=2, grid="exact").statistics(net, x)
        assert sum(calls) == 3 * 2 * 16 * 2  # t, ..., 0, then the clean level
    finally:
        model._raw = raw
    ab = linear_schedule.alphas_cumprod.double()
    noise = torch.randn((2, 1, *x.shape[1:]), generator=torch.Generator().manual_seed(0)).double()
    y = net(x).argmax(1)
    ref = torch.nn.functional.normalize(net(x), dim=1, eps=0)
    dists = []
    for r in range(2):
        xt = ab[300].sqrt() * x.double() + (1 - ab[300]).sqrt() * noise[r]
        seq = list(range(299, -1, -20))
        for i, j in zip(seq, seq[1:] + [-1]):
            t = torch.full((3,), i)
            e = 3.0 * model.eps(xt, t, y) - 2.0 * model.eps(xt, t, torch.full((3,), 3))
            a_t, a_n = ab[i + 1], ab[j + 1]
            xt = xt + (a_n - a_t) * (xt / (a_t.sqrt() * (a_t.sqrt() + a_n.sqrt()))
                                     - e / (a_t.sqrt() * (((1 - a_n) * a_t).sqrt() + ((1 - a_t) * a_n).sqrt())))
        nb = torch.nn.functional.normalize(net(xt.float().clamp(-1, 1)), dim=1, eps=0)
        dists.append((nb - ref).abs().sum(1))
    torch.testing.assert_close(got, torch.stack(dists).mean(0), rtol=1e-4, atol=1e-4)


def test_out_of_memory_halves_the_pass_and_keeps_the_result(linear_schedule):
    model, net, x_id, _ = _setup(linear_schedule)
    ref = _detector(model, timesteps=[120, 240], repeats=2).statistics(net, x_id[:5])
    raw, rows = model._raw, []

    def small_device(x, t, y):  # a "GPU" that holds at most 8 rows (4 samples x 2 CFG branches)
        if len(x) > 8:
            raise torch.OutOfMemoryError("CUDA out of memory (simulated)")
        rows.append(len(x))
        return raw(x, t, y)

    model._raw = small_device
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            got = _detector(model, timesteps=[120, 240], repeats=2).statistics(net, x_id[:5])
    finally:
        model._raw = raw
    halvings = [str(w.message).split(" (")[0] for w in caught if issubclass(w.category, RuntimeWarning)]
    assert halvings == [f"out of memory with {a} samples per pass: retrying with {b}" for a, b in ((20, 10), (10, 5), (5, 3))]
    assert max(rows) <= 8
    for k in ref:
        torch.testing.assert_close(got[k], ref[k])


def test_map_chunks_edges():
    from openood_diffguard.batching import map_chunks

    assert map_chunks(lambda i, j: (i, j), 5, 2) == [(0, 2), (2, 4), (4, 5)]
    assert map_chunks(lambda i, j: (i, j), 0, 3) == []
    with pytest.raises(ValueError, match="chunk size"):
        map_chunks(lambda i, j: None, 3, 0)

    def never_fits(i, j):
        raise torch.OutOfMemoryError("simulated")

    with pytest.warns(RuntimeWarning), pytest.raises(torch.OutOfMemoryError):
        map_chunks(never_fits, 4, 4)  # gives up at one sample per pass
