"""DiffNB on an analytic class-conditional Gaussian mixture with the matching (Bayes) linear classifier:
components the model knows come back close to themselves, a held-out component is pulled away. Every
variant is checked against its pipeline written out here (the released code's loops, the paper's Alg. 2-3)."""
import warnings

import numpy as np
import pytest
import torch
from sklearn.metrics import roc_auc_score

from digits_net import single_thread  # noqa: F401 (autouse: one CPU thread)
from openood_diffguard.runtime.cache import ScoreCache, cached_statistics
from openood_diffguard.detectors.base import ParameterError
from openood_diffguard.detectors.diffnb import VARIANTS, DiffNB
from analytic import GaussianMixtureModel
from openood_diffguard.diffusion.noise import content_key, keyed_normal

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


# ---------------------------------------------------------------------------- the pipelines written out
def _code_step(model, xt, i, j, y, scale=3.0):
    """One step of DiffOOD's multi_iteration with method DDIM (runner/schedule.py:169-201, method.py tran_ddim):
    the model sees i, the levels are alphas[i + 1] -> alphas[j + 1]; CFG (1 + beta) eps_y - beta eps_null."""
    ab = model.schedule.alphas_cumprod.double()
    t = torch.full((len(xt),), i)
    beta = scale - 1
    e = (1 + beta) * model.eps(xt, t, y) - beta * model.eps(xt, t, torch.full_like(y, model.null_class))
    a_t, a_n = ab[i + 1], ab[j + 1]
    return xt + (a_n - a_t) * (xt / (a_t.sqrt() * (a_t.sqrt() + a_n.sqrt()))
                               - e / (a_t.sqrt() * (((1 - a_n) * a_t).sqrt() + ((1 - a_t) * a_n).sqrt())))


def _code_denoise(model, img_n, t, y):
    """multi_iteration(img_n, t - 1, -1): seq t-1, t-21, ..., 19 -> -1; t = 0 returns its input unchanged."""
    seq = list(range(t - 1, -1, -20))
    for i, j in zip(seq, seq[1:] + [-1]):
        img_n = _code_step(model, img_n, i, j, y)
    return img_n


def _released_code_scores(model, net, x, noise, timesteps=(0, 120, 240, 360)):
    """runner/ood_detect.py diff_detect (lines 162-208) + detect/ood_detect.py (lines 23, 42-52) for one batch:
    noise[r] is repeat r's randn_like; the logits of every t are L2-normalised and compared with t = 0."""
    ab = model.schedule.alphas_cumprod.double()
    y = net(x).argmax(1)
    u = {t: [] for t in timesteps}
    for k in range(noise.shape[0]):
        for t in timesteps:
            img_n = x.double() * ab[t].sqrt() + noise[k].double() * (1 - ab[t]).sqrt()
            img_r = _code_denoise(model, img_n, t, y).float().clamp(-1, 1)  # normaliser 0.5 / 0.5: clamp(x/2+.5)
            logit = net(img_r)
            u[t].append(logit / (logit.norm(dim=-1, keepdim=True) + 1e-10))
    return {t: torch.stack([(a - b).abs().sum(-1) for a, b in zip(u[0], u[t])]).mean(0) for t in timesteps[1:]}


def _paper_scores(model, net, x, noise, t=300, stride=20, scale=3.0):
    """Alg. 2-3 read literally: x_t = sqrt(abar_t) x + sqrt(1 - abar_t) eps, DDIM (eta = 0) to x_0 conditioned
    on y with CFG (Eq. 4), score = sum |f(x) - f(x_rec)| on raw logits, mean over the repeats."""
    ab = torch.cat([torch.ones(1, dtype=torch.float64), model.schedule.alphas_cumprod.double()])  # ab[s + 1]
    y, fea = net(x).argmax(1), net(x)
    path = list(range(t, -1, -stride)) + [-1]  # t, ..., stride, 0, clean
    scores = []
    for r in range(noise.shape[0]):
        xt = ab[t + 1].sqrt() * x.double() + (1 - ab[t + 1]).sqrt() * noise[r].double()
        for s, s_next in zip(path, path[1:]):
            tt = torch.full((len(x),), s)
            e_u = model.eps(xt, tt, torch.full_like(y, model.null_class))
            e = e_u + scale * (model.eps(xt, tt, y) - e_u)
            x0 = (xt - (1 - ab[s + 1]).sqrt() * e) / ab[s + 1].sqrt()
            xt = ab[s_next + 1].sqrt() * x0 + (1 - ab[s_next + 1]).sqrt() * e
        scores.append((fea - net(xt.float().clamp(-1, 1))).abs().sum(1))
    return torch.stack(scores).mean(0)


def _per_sample_noise(x, repeats, seed=0):
    """The per-sample noise the detector draws ([R, B, ...]), from each image's content (normalisation 0.5/0.5)."""
    return keyed_normal(content_key(x * 0.5 + 0.5), (repeats, *x.shape[1:]), seed).transpose(0, 1)


# ---------------------------------------------------------------------------- behaviour
@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_known_vs_heldout_component_separate(linear_schedule, variant):
    model, net, x_id, x_ood = _setup(linear_schedule)
    det = _detector(model, variant=variant, repeats=4, cfg_scale=3.0)
    conf_id = det.predict(net, x_id)[1]
    conf_ood = det.predict(net, x_ood)[1]
    y = torch.cat([torch.ones(len(conf_id)), torch.zeros(len(conf_ood))])
    auroc = roc_auc_score(y, torch.cat([conf_id, conf_ood]))
    assert auroc > 0.9, auroc
    # score sign: ID neighbours are closer, so ID confidence (= -distance) is higher on average
    assert conf_id.mean() > conf_ood.mean()


def test_variants_resolve_their_aspects_and_explicit_values_win():
    assert DiffNB().settings() == {"timesteps": [120, 240, 360], "reference": "noised", "noise": "per_sample",
                                   "l2_normalize": True, "grid": "code"}
    assert DiffNB(variant="paper").settings() == {"timesteps": [300], "reference": "clean", "noise": "per_sample",
                                                  "l2_normalize": False, "grid": "exact"}
    assert DiffNB(variant="hybrid").settings() == {"timesteps": [300], "reference": "clean", "noise": "shared",
                                                   "l2_normalize": True, "grid": "code"}
    det = DiffNB(variant="code", timesteps=300, reference="clean")
    assert det.settings()["timesteps"] == [300] and det.settings()["reference"] == "clean"
    assert det.settings()["noise"] == "per_sample"
    assert len({DiffNB(variant=v).cache_key() for v in VARIANTS}) == 3  # each variant its own statistics


def test_feature_space_and_errors(linear_schedule, monkeypatch):
    """Feature space: the distance written out from its definition (pooled feature clipped from above at
    feature_clip, L2-normalised, L1 to the input's, mean over repeats) on the neighbours the detector made (hybrid: clean reference, t = 300)."""
    import openood_diffguard.detectors.diffnb as diffnb

    model, net, x_id, _ = _setup(linear_schedule)
    seen, embed = [], diffnb._embed
    monkeypatch.setattr(diffnb, "_embed", lambda n, x, *a: (seen.append(x.clone()), embed(n, x, *a))[1])
    s = _detector(model, variant="hybrid", space="feature", feature_clip=0.3, repeats=2).statistics(net, x_id[:4])
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


def test_code_variant_equals_the_released_pipeline_written_out(linear_schedule):
    """variant 'code' = diff_detect + detect/ood_detect.py: t in {120, 240, 360} against the t = 0 entry
    (x noised to alpha_bar[0] with the same repeat's noise), per-sample noise, L2-normalised logits."""
    model, net, x_id, x_ood = _setup(linear_schedule)
    x = torch.cat([x_id[:3], x_ood[:2]])
    calls = []
    raw = model._raw
    model._raw = lambda xx, t, y: (calls.append(len(xx)), raw(xx, t, y))[1]
    try:
        got = _detector(model, variant="code", repeats=2).statistics(net, x)
    finally:
        model._raw = raw
    assert sum(calls) == 5 * 2 * (6 + 12 + 18) * 2  # the t = 0 entry costs no model call
    want = _released_code_scores(model, net, x, _per_sample_noise(x, 2))
    for t, v in want.items():
        torch.testing.assert_close(got[f"dist_t{t}"], v.float(), rtol=1e-4, atol=1e-5)
    # the clean-image reference (what the package did before) is measurably different at small t
    clean = _detector(model, variant="code", repeats=2, reference="clean").statistics(net, x)
    assert not torch.allclose(clean["dist_t120"], got["dist_t120"], rtol=1e-3, atol=1e-4)


def test_paper_variant_equals_algorithms_2_and_3_written_out(linear_schedule):
    model, net, x_id, x_ood = _setup(linear_schedule)
    x = torch.cat([x_id[:3], x_ood[:2]])
    got = _detector(model, variant="paper", repeats=2).statistics(net, x)
    assert set(got) == {"pred", "dist_t300"}
    want = _paper_scores(model, net, x, _per_sample_noise(x, 2))
    torch.testing.assert_close(got["dist_t300"], want.float(), rtol=1e-4, atol=1e-4)


def test_hybrid_variant_equals_the_code_grid_with_shared_noise(linear_schedule):
    """variant 'hybrid' (the earlier default): the code's sampler for t = 300 (15 steps x 2), the clean
    input as reference, and R noise images drawn from the seed and shared by every sample."""
    model, net, x_id, _ = _setup(linear_schedule)
    x = x_id[:3]
    calls = []
    raw = model._raw
    model._raw = lambda xx, t, y: (calls.append(len(xx)), raw(xx, t, y))[1]
    try:
        got = _detector(model, variant="hybrid", repeats=2).statistics(net, x)["dist_t300"]
        assert sum(calls) == 3 * 2 * 15 * 2
        calls.clear()
        _detector(model, variant="hybrid", repeats=2, grid="exact").statistics(net, x)
        assert sum(calls) == 3 * 2 * 16 * 2  # t, ..., 0, then the clean level
    finally:
        model._raw = raw
    ab = linear_schedule.alphas_cumprod.double()
    noise = torch.randn((2, 1, *x.shape[1:]), generator=torch.Generator().manual_seed(0)).double()
    y = net(x).argmax(1)
    ref = torch.nn.functional.normalize(net(x), dim=1, eps=0)
    dists = []
    for r in range(2):
        xt = _code_denoise(model, ab[300].sqrt() * x.double() + (1 - ab[300]).sqrt() * noise[r], 300, y)
        nb = torch.nn.functional.normalize(net(xt.float().clamp(-1, 1)), dim=1, eps=0)
        dists.append((nb - ref).abs().sum(1))
    torch.testing.assert_close(got, torch.stack(dists).mean(0), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_score_does_not_depend_on_the_batch(linear_schedule, variant):
    """A sample scores the same alone, at another position, in a bigger batch or split into passes
    (cache resume, torchrun shards, cascade routing rely on it) - for every variant's noise."""
    model, net, x_id, x_ood = _setup(linear_schedule)
    det = _detector(model, variant=variant, timesteps=[120, 300], repeats=2)
    x = torch.cat([x_id[:3], x_ood[:3]])
    full = det.statistics(net, x)
    split = _detector(model, variant=variant, timesteps=[120, 300], repeats=2, max_model_batch=5).statistics(net, x)
    for idx in ([0], [5, 1], [2, 4, 3]):
        part = det.statistics(net, x[idx])
        for k in part:
            torch.testing.assert_close(part[k], full[k][idx], rtol=1e-5, atol=1e-6)
            torch.testing.assert_close(split[k], full[k], rtol=1e-5, atol=1e-6)


def test_per_sample_noise_is_per_sample_and_shared_noise_is_shared(linear_schedule):
    model, net, x_id, _ = _setup(linear_schedule)
    x = torch.cat([x_id[:2], x_id[:1]])  # sample 2 repeats sample 0
    own = _detector(model, variant="code", repeats=3).noise(x, SHAPE)
    assert own.shape == (3, 3, *SHAPE)
    torch.testing.assert_close(own[:, 2], own[:, 0])  # the same image gets the same noise
    assert (own[:, 0] - own[:, 1]).abs().mean() > 0.5  # other images other noise
    assert (own[0] - own[1]).abs().mean() > 0.5  # and the repeats differ
    assert not torch.equal(_detector(model, variant="code", repeats=3, seed=1).noise(x, SHAPE), own)
    shared = _detector(model, variant="hybrid", repeats=3).noise(x, SHAPE)
    torch.testing.assert_close(shared[:, 1], shared[:, 0])
    # an image differing by one 8-bit level in one pixel gets independent noise
    y = x[:1].clone()
    y[0, 0, 0, 0] += 2 / 255
    other = _detector(model, variant="code", repeats=3).noise(y, SHAPE)
    assert abs(float(torch.corrcoef(torch.stack([other[:, 0].flatten(), own[:, 0].flatten()]))[0, 1])) < 0.3


def test_shapes_determinism_chunking_and_timestep_set(linear_schedule):
    model, net, x_id, _ = _setup(linear_schedule)
    det = _detector(model, variant="code", repeats=2)
    s1 = det.statistics(net, x_id[:5])
    s2 = det.statistics(net, x_id[:5])
    assert set(s1) == {"pred", "dist_t120", "dist_t240", "dist_t360"}
    for k in s1:
        assert s1[k].shape == (5,)
        torch.testing.assert_close(s1[k], s2[k])  # seeded noise: identical repeats
    assert torch.all(s1["dist_t360"] >= 0)
    # all timesteps run in one batch with per-sample starts: each equals a run with that timestep alone
    for t in (120, 360):
        alone = _detector(model, variant="code", timesteps=[t], repeats=2).statistics(net, x_id[:5])
        torch.testing.assert_close(alone[f"dist_t{t}"], s1[f"dist_t{t}"], atol=1e-5, rtol=1e-4)
    other = _detector(model, variant="code", repeats=2, seed=1).statistics(net, x_id[:5])
    assert not torch.allclose(other["dist_t120"], s1["dist_t120"])


def test_aggregate_and_per_timestep_confidences(linear_schedule):
    """The code reports one score per t: every S_t is a statistic, ``confidences`` gives all of them, and
    ``aggregate`` (cheap: same cache entry) selects mean, max or one t."""
    model, net, x_id, _ = _setup(linear_schedule)
    det = _detector(model, variant="code", repeats=1)
    s = det.statistics(net, x_id[:4])
    d = torch.stack([s[f"dist_t{t}"] for t in (120, 240, 360)])
    torch.testing.assert_close(det.confidence(s), -d.mean(0))
    per_t = det.confidences(s)
    assert list(per_t) == [120, 240, 360]
    key = det.cache_key()
    for sel, want in ((120, -d[0]), ("t240", -d[1]), ("360", -d[2]), ("max", -d.max(0).values)):
        det.set_params(aggregate=sel)
        torch.testing.assert_close(det.confidence(s), want)
        assert det.cache_key() == key
    torch.testing.assert_close(per_t[240], -d[1])
    with pytest.raises(ParameterError, match="'aggregate' selects t = 300"):
        det.set_params(aggregate=300)
    with pytest.raises(ParameterError, match="aggregate"):
        det.set_params(aggregate="median")
    assert det.params["aggregate"] == "max"  # a rejected change leaves the detector as it was


def test_cached_scoring_per_timestep_rows_reuse_the_statistics(linear_schedule):
    """Per-t metric rows through the cached scoring path: the second and third t re-score, no model call."""
    model, net, x_id, x_ood = _setup(linear_schedule)
    det = _detector(model, variant="code", repeats=1)
    x = torch.cat([x_id[:4], x_ood[:4]])
    loader = [{"data": x[:5], "label": torch.zeros(5), "index": torch.arange(5)},
              {"data": x[5:], "label": torch.zeros(3), "index": torch.arange(5, 8)}]
    store = ScoreCache(None)
    first = cached_statistics(det, net, loader, store, progress=False, device="cpu")
    calls = []
    raw = model._raw
    model._raw = lambda xx, t, y: (calls.append(len(xx)), raw(xx, t, y))[1]
    try:
        for t in (120, 240, 360):
            det.set_params(aggregate=t)
            again = cached_statistics(det, net, loader, store, progress=False, device="cpu")
            conf = det.confidence({k: torch.from_numpy(v) for k, v in again.stats.items()})
            np.testing.assert_allclose(conf.numpy(), -first.stats[f"dist_t{t}"])
    finally:
        model._raw = raw
    assert calls == []


def test_feature_space_and_raw_representation(linear_schedule):
    model, net, x_id, _ = _setup(linear_schedule)
    s = _detector(model, variant="hybrid", space="feature", feature_clip=0.3, repeats=1).statistics(net, x_id[:4])
    assert s["dist_t300"].shape == (4,) and torch.isfinite(s["dist_t300"]).all()
    normed = _detector(model, variant="hybrid", repeats=1).statistics(net, x_id[:4])["dist_t300"]
    raw = _detector(model, variant="hybrid", repeats=1, l2_normalize=False).statistics(net, x_id[:4])["dist_t300"]
    assert torch.all(normed <= 2 + 1e-5) and raw.max() > 2 * normed.max()  # unit vectors: l1 of the difference <= 2


# ---------------------------------------------------------------------------- validation (issue #14)
@pytest.mark.parametrize("kw, match", [
    ({"stride": 0}, "'stride' must be >= 1"),
    ({"stride": -20}, "'stride' must be >= 1"),
    ({"repeats": "four"}, "'repeats' must be an integer"),
    ({"repeats": 2.7}, "'repeats' must be an integer"),
    ({"repeats": 0}, "'repeats' must be >= 1"),
    ({"seed": "zero"}, "'seed' must be an integer"),
    ({"seed": -1}, "'seed' must be >= 0"),
    ({"cfg_scale": "3.0"}, "'cfg_scale' must be a number"),
    ({"cfg_scale": -1.0}, "'cfg_scale' must be >= 0"),
    ({"cfg_scale": float("nan")}, "'cfg_scale' must be finite"),
    ({"timesteps": [310]}, "'timesteps' must be positive multiples of stride=20"),
    ({"timesteps": [0]}, "'timesteps' must be positive multiples"),
    ({"timesteps": []}, "'timesteps' must be a non-empty list"),
    ({"timesteps": [120.0]}, "'timesteps' must be a non-empty list of integers"),
    ({"timesteps": [120, 120]}, "'timesteps' has duplicates"),
    ({"timesteps": "300"}, "'timesteps' must be a list"),
    ({"variant": "official"}, "'variant' must be one of"),
    ({"reference": "input"}, "'reference' must be one of"),
    ({"noise": "fresh"}, "'noise' must be one of"),
    ({"grid": "ddim"}, "'grid' must be one of"),
    ({"space": "pixels"}, "'space' must be one of"),
    ({"l2_normalize": "yes"}, "'l2_normalize' must be true/false"),
    ({"aggregate": "median"}, "'aggregate' must be one of"),
    ({"aggregate": 300}, "'aggregate' selects t = 300"),
    ({"feature_clip": 0.0}, "'feature_clip' must be > 0"),
    ({"max_model_batch": 0}, "'max_model_batch' must be >= 1"),
    ({"diffusion_size": 0}, "'diffusion_size' must be >= 1"),
    ({"dtype": "int8"}, "'dtype' must be one of"),
])
def test_every_parameter_is_checked_at_construction(kw, match):
    with pytest.raises(ParameterError, match=match):
        DiffNB(**kw)


@pytest.mark.parametrize("bad, match", [
    (torch.empty(0, *SHAPE), "empty batch"),
    (torch.full((2, *SHAPE), float("nan")), "NaN/inf at batch positions"),
    (torch.rand(2, *SHAPE) * 255, "un-normalised pixels"),
    (torch.zeros(2, 4, 4), r"expected a batch of images \[B, C, H, W\]"),
])
def test_bad_input_fails_clearly_before_any_model_or_cache_work(linear_schedule, bad, match):
    model, net, x_id, _ = _setup(linear_schedule)
    with pytest.raises(ValueError, match=match):
        DiffNB(normalization="unknown").statistics(net, bad)  # no model_path: the input check comes first
    if len(bad) == 0:
        return  # the cached path never asks a detector for an empty batch
    det = _detector(model, variant="code", repeats=1)
    store = ScoreCache(None)
    batches = [{"data": bad, "label": torch.zeros(len(bad)), "index": torch.arange(len(bad))}]
    with pytest.raises(ValueError, match=match):
        cached_statistics(det, net, batches, store, progress=False, device="cpu")
    assert len(store) == 0


def test_model_dependent_errors(linear_schedule):
    model, net, x_id, _ = _setup(linear_schedule)
    with pytest.raises(ValueError, match="model_path"):
        DiffNB(normalization="unknown").statistics(net, x_id[:2])
    with pytest.raises(ValueError, match="classes"):
        _detector(model).statistics(NearestMean(torch.zeros(5, *SHAPE)), x_id[:2])
    with pytest.raises(ValueError, match="'timesteps' reaches 1000, beyond the model's schedule"):
        _detector(model, timesteps=[1000]).statistics(net, x_id[:2])


# ---------------------------------------------------------------------------- memory
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
    from openood_diffguard.runtime.batching import map_chunks

    assert map_chunks(lambda i, j: (i, j), 5, 2) == [(0, 2), (2, 4), (4, 5)]
    assert map_chunks(lambda i, j: (i, j), 0, 3) == []
    with pytest.raises(ValueError, match="chunk size"):
        map_chunks(lambda i, j: None, 3, 0)

    def never_fits(i, j):
        raise torch.OutOfMemoryError("simulated")

    with pytest.warns(RuntimeWarning), pytest.raises(torch.OutOfMemoryError):
        map_chunks(never_fits, 4, 4)  # gives up at one sample per pass


def test_keep_images_returns_the_pictures_behind_the_score_and_the_same_statistics(linear_schedule):
    """The report's gallery hook: ``keep_images`` changes no statistic, and the returned neighbour is the image
    whose logits give the distance (one timestep, one draw, clean reference: dist = |logits(nb) - logits(x)|_1)."""
    model, net, x_id, x_ood = _setup(linear_schedule)
    x = torch.cat([x_id[:2], x_ood[:2]])
    for kw in ({"variant": "code", "repeats": 2}, {"variant": "paper", "timesteps": [120], "repeats": 1,
                                                   "reference": "clean", "l2_normalize": False}):
        det = _detector(model, **kw)
        plain = det.statistics(net, x)
        stats, pics = det.statistics(net, x, keep_images=True)
        assert stats.keys() == plain.keys()
        for k in plain:
            torch.testing.assert_close(stats[k], plain[k], rtol=0, atol=0)
        assert set(pics) == {"noised", "neighbour"} and all(p.shape == x.shape for p in pics.values())
    want = (net(pics["neighbour"].clamp(-1, 1)) - net(x)).abs().sum(1)
    torch.testing.assert_close(stats["dist_t120"], want, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(pics["noised"], x, atol=1e-2)  # noised at t = 120, not the input
