"""Score fusion: known-answer tests on synthetic score distributions (all scores higher = ID)."""
import numpy as np
import pytest
import torch
from sklearn.metrics import roc_auc_score

from openood_diffguard.fusion import ECDF, ScoreFusion

N = 2000


def complementary(seed: int = 0):
    """ID ~ N(0, 1) in both scores; half of the OOD fools the baseline, the other half the diffusion score."""
    rng = np.random.default_rng(seed)

    def ood(n):
        fools_baseline = rng.random(n) < 0.5
        b = np.where(fools_baseline, rng.normal(0, 1, n), rng.normal(-4, 1, n))
        d = np.where(fools_baseline, rng.normal(-4, 1, n), rng.normal(0, 1, n))
        return {"baseline": b, "diffusion": d}

    def idd(n):
        return {"baseline": rng.normal(0, 1, n), "diffusion": rng.normal(0, 1, n)}

    return idd(N), idd(N), ood(N)


def auroc(id_conf, ood_conf):
    return roc_auc_score(np.r_[np.ones(len(id_conf)), np.zeros(len(ood_conf))], np.r_[id_conf, ood_conf])


@pytest.mark.parametrize("rule,params", [("rank", {}), ("zscore", {}), ("product", {}), ("min", {}),
                                         ("cascade", {"alpha_out": 0.02, "alpha_in": 0.0})])
def test_fusion_beats_both_inputs(rule, params):
    val, test, ood = complementary()
    single = {c: auroc(test[c], ood[c]) for c in test}
    assert max(single.values()) < 0.8  # each detector alone misses half of the OOD
    fusion = ScoreFusion(rule, **params).fit(val)
    fused = auroc(fusion(test), fusion(ood))
    assert fused > max(single.values()) + 0.05, (rule, fused, single)


def test_logistic_uses_ood_val_and_beats_inputs():
    val, test, ood = complementary(1)
    _, _, ood_val = complementary(2)
    with pytest.raises(ValueError, match="OOD-val"):
        ScoreFusion("logistic").fit(val)
    fusion = ScoreFusion("logistic").fit(val, ood_val_scores=ood_val)
    assert fusion.uses_ood_val
    assert auroc(fusion(test), fusion(ood)) > max(auroc(test[c], ood[c]) for c in test) + 0.1


@pytest.mark.parametrize("rule", ["rank", "zscore", "cascade", "product", "min"])
def test_no_ood_leakage(rule):
    """Fitted state comes from ID data alone; ID confidences do not depend on which OOD set is scored."""
    val, test, ood_a = complementary(3)
    ood_b = {c: v * 3.0 - 7.0 for c, v in ood_a.items()}
    with pytest.raises(ValueError, match="leak"):
        ScoreFusion(rule).fit(val, ood_val_scores=ood_a)
    fusion = ScoreFusion(rule).fit(val)
    state = repr(fusion.state())
    batch_a = fusion({c: np.r_[test[c], ood_a[c]] for c in test})[:N]
    batch_b = fusion({c: np.r_[test[c], ood_b[c]] for c in test})[:N]
    alone = np.array([fusion({c: test[c][i:i + 1] for c in test})[0] for i in range(0, N, 97)])
    assert repr(fusion.state()) == state                      # scoring never refits
    np.testing.assert_array_equal(batch_a, batch_b)           # no batch-level (test-set) normalisation
    np.testing.assert_allclose(alone, batch_a[::97])
    # refitting on the same ID data gives the same state: nothing else enters the fit
    assert repr(ScoreFusion(rule).fit(val).state()) == state


@pytest.mark.parametrize("alpha_out,alpha_in", [(0.02, 0.0), (0.05, 0.2), (0.3, 0.1)])
def test_cascade_routed_fraction_matches_band(alpha_out, alpha_in):
    val, test, ood = complementary(4)
    fusion = ScoreFusion("cascade", alpha_out=alpha_out, alpha_in=alpha_in).fit(val)
    expected = 1 - alpha_out - alpha_in
    assert fusion.expected_routed_fraction == pytest.approx(expected)
    assert fusion.route(val["baseline"]).mean() == pytest.approx(expected, abs=2 / N)  # the fit sample itself
    routed = fusion.route(test["baseline"]).mean()                                   # fresh ID sample
    se = np.sqrt(expected * (1 - expected) / N)
    assert abs(routed - expected) < 4 * se + 1e-9, (routed, expected)
    assert fusion.last_routed_fraction == routed
    # OOD that the baseline already rejects never reaches the diffusion model
    assert fusion.route(ood["baseline"]).mean() < routed


def test_cascade_reads_diffusion_only_inside_band():
    val, test, _ = complementary(5)
    fusion = ScoreFusion("cascade", alpha_out=0.1, alpha_in=0.2).fit(val)
    mask = fusion.route(test["baseline"])
    assert 0 < mask.sum() < N
    full = fusion(test)
    sparse = fusion({"baseline": test["baseline"], "diffusion": np.where(mask, test["diffusion"], np.nan)})
    np.testing.assert_array_equal(full, sparse)
    # band order: trusted OOD < routed < trusted ID
    b = test["baseline"]
    low, high = ~mask & (b < b[mask].min()), ~mask & (b > b[mask].max())
    assert low.any() and high.any() and low.sum() + high.sum() + mask.sum() == N
    assert full[low].max() < full[mask].min() and full[mask].max() < full[high].min()
    with pytest.raises(ValueError, match="NaN"):
        fusion({"baseline": test["baseline"], "diffusion": np.where(mask, np.nan, test["diffusion"])})


def test_ecdf_is_strictly_monotone_and_bounded():
    rng = np.random.default_rng(6)
    ecdf = ECDF().fit(np.r_[rng.normal(size=500), np.zeros(20)])  # with ties
    x = np.linspace(-20, 8, 20001)
    p = ecdf(x)
    assert np.all(np.diff(p) > 0) and p.min() > 0 and p.max() < 1
    far = np.linspace(-1e4, 1e4, 20001)  # log-space forms stay ordered and finite where F saturates
    assert np.all(np.diff(ecdf.log_prob(far[far < 8])) > 0) and np.all(np.diff(ecdf.log_odds(far)) > 0)
    assert np.isfinite(ecdf.log_odds(far)).all()
    # F is the ID-probability: the share of ID scores below (mid-rank within the 20 tied zeros)
    assert ecdf(np.array([0.0]))[0] == pytest.approx(np.mean(ecdf.sorted < 0) + 10 / 521, abs=2e-3)
    single = rng.normal(size=300)
    assert roc_auc_score(single > 0, ecdf(single)) == roc_auc_score(single > 0, single)


def test_set_params_equals_fresh_fit_and_sweep():
    val, test, _ = complementary(7)
    fused = ScoreFusion("cascade").fit(val).set_params(alpha_out=0.05, alpha_in=0.1)
    fresh = ScoreFusion("cascade", alpha_out=0.05, alpha_in=0.1).fit(val)
    np.testing.assert_array_equal(fused(test), fresh(test))
    assert ScoreFusion.sweep("cascade") == {"alpha_out": [0.005, 0.01, 0.02, 0.03, 0.04],
                                            "alpha_in": [0.0, 0.05, 0.1, 0.2]}
    assert set(ScoreFusion.sweep("rank")) == {"w"}
    # w = 1 is the baseline's ranking, w = 0 the diffusion's
    r1, r0 = ScoreFusion("rank", w=1.0).fit(val), ScoreFusion("rank", w=0.0).fit(val)
    assert roc_auc_score(test["baseline"] > 0, r1(test)) == roc_auc_score(test["baseline"] > 0, test["baseline"])
    assert roc_auc_score(test["diffusion"] > 0, r0(test)) == roc_auc_score(test["diffusion"] > 0, test["diffusion"])


def test_torch_in_torch_out_and_bad_input():
    val, test, _ = complementary(8)
    fusion = ScoreFusion("rank").fit({c: torch.as_tensor(v) for c, v in val.items()})
    out = fusion({c: torch.as_tensor(v, dtype=torch.float32) for c, v in test.items()})
    assert isinstance(out, torch.Tensor) and out.shape == (N,)
    np.testing.assert_allclose(out.numpy(), fusion(test), rtol=1e-6)
    with pytest.raises(ValueError, match="unknown fusion rule"):
        ScoreFusion("average")
    with pytest.raises(TypeError, match="unknown parameter"):
        ScoreFusion("rank", alpha_in=0.1)
    with pytest.raises(ValueError, match="alpha_out"):
        ScoreFusion("cascade", alpha_out=0.7, alpha_in=0.5)
    with pytest.raises(ValueError, match="NaN"):
        ScoreFusion("rank").fit({"baseline": np.r_[val["baseline"][:-1], np.nan], "diffusion": val["diffusion"]})
    with pytest.raises(ValueError, match="different lengths"):
        fusion({"baseline": test["baseline"][:10], "diffusion": test["diffusion"]})
    with pytest.raises(KeyError, match="fitted components"):
        fusion({"baseline": test["baseline"], "knn": test["diffusion"]})
    with pytest.raises(RuntimeError, match="before fit"):
        ScoreFusion("cascade").route(test["baseline"])


@pytest.mark.parametrize("rule", ["cascade", "logistic"])
def test_pickle_roundtrip(rule):
    """OpenOOD pickles postprocessors: a fitted fusion must survive it unchanged."""
    import pickle

    val, test, ood = complementary(9)
    fusion = ScoreFusion(rule).fit(val, ood_val_scores=ood if rule == "logistic" else None)
    again = pickle.loads(pickle.dumps(fusion))
    np.testing.assert_array_equal(again(test), fusion(test))


def test_cascade_fits_without_id_diffusion_scores():
    """The band needs only baseline ID scores; the ranking is the same with or without ID diffusion scores."""
    from scipy.stats import rankdata

    val, test, ood = complementary(10)
    full = ScoreFusion("cascade", alpha_out=0.05, alpha_in=0.1).fit(val)
    base_only = ScoreFusion("cascade", alpha_out=0.05, alpha_in=0.1).fit({"baseline": val["baseline"]})
    mask = full.route(val["baseline"])
    band_only = ScoreFusion("cascade", alpha_out=0.05, alpha_in=0.1).fit(
        {"baseline": val["baseline"], "diffusion": np.where(mask, val["diffusion"], np.nan)})
    both = {c: np.r_[test[c], ood[c]] for c in test}
    ranks = rankdata(full(both))
    np.testing.assert_array_equal(rankdata(base_only(both)), ranks)
    np.testing.assert_array_equal(rankdata(band_only(both)), ranks)
    with pytest.raises(ValueError, match="ID fit needs 'baseline'"):
        ScoreFusion("cascade").fit({"diffusion": val["diffusion"]})


def test_three_components_weights():
    """w weights the baseline, the rest share 1 - w equally: with w = 0 the baseline cannot matter."""
    val, test, _ = complementary(11)
    rng = np.random.default_rng(12)
    val3 = {**val, "knn": rng.normal(size=N)}
    test3 = {**test, "knn": rng.normal(size=N)}
    fusion = ScoreFusion("rank", w=0.0).fit(val3)
    shifted = {**test3, "baseline": test3["baseline"] + 10.0}
    np.testing.assert_array_equal(fusion(test3), fusion(shifted))
    expected = 0.5 * fusion.calibrators["diffusion"](test3["diffusion"]) + 0.5 * fusion.calibrators["knn"](test3["knn"])
    np.testing.assert_allclose(fusion(test3), expected)
