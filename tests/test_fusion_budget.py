"""Budgeted fusion: ``budget = rho`` routes a share rho of ID samples (the baseline's least certain band) to the
diffusion detector; every other sample is ranked by the baseline alone and never reaches the detector."""
import numpy as np
import pytest
import torch
from sklearn.metrics import roc_auc_score

from openood_diffguard.fusion import ScoreFusion

N = 4000
RULES = ["rank", "zscore", "cascade", "product", "min", "logistic"]


def near_ood(seed: int, n: int = N):
    """ID: baseline ~ N(0, 1); OOD: baseline ~ N(-1.5, 1) (a weak baseline), diffusion separates better."""
    rng = np.random.default_rng(seed)

    def idd():
        return {"baseline": rng.normal(0, 1, n), "diffusion": rng.normal(0, 1, n)}

    def ood():
        return {"baseline": rng.normal(-1.5, 1, n), "diffusion": rng.normal(-2.5, 1, n)}

    return idd(), idd(), ood(), ood()  # ID val, ID test, OOD val, OOD test


def auroc(id_conf, ood_conf):
    return roc_auc_score(np.r_[np.ones(len(id_conf)), np.zeros(len(ood_conf))], np.r_[id_conf, ood_conf])


def fitted(rule, seed=0, **params):
    val, test, ood_val, ood = near_ood(seed)
    fusion = ScoreFusion(rule, **params).fit(val, ood_val_scores=ood_val if rule == "logistic" else None)
    return fusion, val, test, ood


@pytest.mark.parametrize("rule", RULES)
@pytest.mark.parametrize("rho", [0.05, 0.2, 0.5])
def test_realised_share_equals_budget_on_held_out_id(rule, rho):
    fusion, val, test, _ = fitted(rule, budget=rho)
    assert fusion.expected_routed_fraction == pytest.approx(rho)
    assert fusion.route(val["baseline"]).mean() == pytest.approx(rho, abs=2 / N)  # the fit sample itself
    share = fusion.route(test["baseline"]).mean()                                   # fresh ID sample
    assert abs(share - rho) < 4 * np.sqrt(rho * (1 - rho) / N), (share, rho)     # binomial bound
    assert fusion.last_routed_fraction == share


@pytest.mark.parametrize("rule", RULES)
def test_outside_the_band_never_calls_the_detector(rule):
    """fuse_batch runs the detector on routed samples only, and its fused scores equal the unrouted path's."""
    fusion, _, test, ood = fitted(rule, budget=0.2)
    b = np.r_[test["baseline"], ood["baseline"]]
    d = np.r_[test["diffusion"], ood["diffusion"]]
    images = torch.arange(b.size, dtype=torch.float64).view(-1, 1, 1, 1)  # image i "is" sample i
    calls = []

    def detector(x):
        idx = x.view(-1).long().numpy()
        calls.append(idx)
        return torch.as_tensor(d[idx])

    fused, d_routed = fusion.fuse_batch(b, detector, images)
    need = fusion.route(b)
    assert len(calls) == 1 and 0 < need.sum() < b.size
    np.testing.assert_array_equal(calls[0], np.flatnonzero(need))      # exactly the band, nothing else
    assert np.isnan(d_routed[~need]).all() and np.isfinite(d_routed[need]).all()
    np.testing.assert_array_equal(fused, fusion({"baseline": b, "diffusion": d}))  # fast path = slow path
    calls.clear()
    far = np.full(50, b.min() - 10.0)                                    # all below the band: no call at all
    fusion.fuse_batch(far, detector, torch.zeros(50, 1, 1, 1))
    assert calls == []


@pytest.mark.parametrize("rule", RULES)
def test_auroc_gain_is_exactly_the_in_band_gain(rule):
    """Pairs in different segments keep the baseline's order, so AUROC(fused) - AUROC(baseline) =
    P_ID(band) P_OOD(band) (AUROC_band(fused) - AUROC_band(baseline)), a known answer."""
    fusion, _, test, ood = fitted(rule, budget=0.3)
    conf_id, conf_ood = fusion(test), fusion(ood)
    m_id, m_ood = fusion.route(test["baseline"]), fusion.route(ood["baseline"])
    in_band = auroc(conf_id[m_id], conf_ood[m_ood]) - auroc(test["baseline"][m_id], ood["baseline"][m_ood])
    expected = m_id.mean() * m_ood.mean() * in_band
    gain = auroc(conf_id, conf_ood) - auroc(test["baseline"], ood["baseline"])
    assert gain == pytest.approx(expected, abs=1e-12)
    assert gain > 0.01  # the diffusion score is the better one here: the band must pay off
    # segment order: trusted OOD < routed < trusted ID
    b, conf = np.r_[test["baseline"], ood["baseline"]], np.r_[conf_id, conf_ood]
    mid = fusion.route(b)
    low, high = ~mid & (b < b[mid].min()), ~mid & (b > b[mid].max())
    assert low.any() and high.any() and conf[low].max() < conf[mid].min() and conf[mid].max() < conf[high].min()


@pytest.mark.parametrize("rule", RULES)
def test_full_budget_is_the_unbudgeted_rule(rule):
    from scipy.stats import rankdata

    val, test, ood_val, ood = near_ood(1)
    kw = {"ood_val_scores": ood_val} if rule == "logistic" else {}
    full = ScoreFusion(rule, **({"alpha_out": 0.0, "alpha_in": 0.0} if rule == "cascade" else {})).fit(val, **kw)
    budget_one = ScoreFusion(rule, budget=1.0).fit(val, **kw)
    assert budget_one.route(test["baseline"]).all()
    both = {c: np.r_[test[c], ood[c]] for c in test}
    np.testing.assert_array_equal(rankdata(budget_one(both)), rankdata(full(both)))


@pytest.mark.parametrize("rule", ["rank", "zscore", "product", "min", "cascade"])
def test_fit_on_routed_val_equals_fit_on_fully_scored_val(rule):
    """The diffusion calibration sees the ID samples inside the band only: computing the detector on the band
    of ID-val (what the OpenOOD postprocessor does) gives the same fusion as scoring all of ID-val."""
    val, test, _, ood = near_ood(2)
    full = ScoreFusion(rule, budget=0.25).fit(val)
    need = full.route(val["baseline"])
    routed = ScoreFusion(rule, budget=0.25).fit({"baseline": val["baseline"],
                                                 "diffusion": np.where(need, val["diffusion"], np.nan)})
    assert repr(routed.state()) == repr(full.state())
    both = {c: np.r_[test[c], ood[c]] for c in test}
    np.testing.assert_array_equal(routed(both), full(both))
    if rule != "cascade":  # the cascade ranks the band by d alone: it needs no ID diffusion scores at all
        hole = val["diffusion"].copy()
        hole[np.flatnonzero(need)[:3]] = np.nan
        with pytest.raises(ValueError, match="3 of the .* samples inside the band have no score"):
            ScoreFusion(rule, budget=0.25).fit({"baseline": val["baseline"], "diffusion": hole})


def test_moving_the_band_onto_unscored_fit_samples_refuses_to_score():
    val, test, _, _ = near_ood(3)
    fusion = ScoreFusion("rank", budget=0.1, alpha_out=0.0)
    fusion.fit({"baseline": val["baseline"], "diffusion": val["diffusion"]})
    need = fusion.route(val["baseline"])
    sparse = {"baseline": val["baseline"], "diffusion": np.where(need, val["diffusion"], np.nan)}
    fusion.fit(sparse)
    fusion.set_params(alpha_out=0.04)  # the band now covers ID-val samples whose diffusion score is unknown
    assert fusion.missing_fit > 0
    with pytest.raises(RuntimeError, match="fit again"):
        fusion(test)
    fusion.fit(val)  # with their scores: fine, and equal to a fresh fit
    np.testing.assert_array_equal(fusion(test), ScoreFusion("rank", budget=0.1, alpha_out=0.04).fit(val)(test))
    cascade = ScoreFusion("cascade", budget=0.1, alpha_out=0.0).fit(sparse)
    cascade.set_params(alpha_out=0.04)  # the cascade's ranking never needs ID diffusion scores
    assert cascade.missing_fit == 0 and np.isfinite(cascade(test)).all()


def test_budget_parameters_and_sweep_grid():
    for bad in (0, 0.0, 1.5, -0.1, True, "0.2"):
        with pytest.raises(ValueError, match="budget"):
            ScoreFusion("rank", budget=bad)
    with pytest.raises(ValueError, match="either budget or alpha_in"):
        ScoreFusion("cascade", budget=0.2, alpha_in=0.1)
    with pytest.raises(ValueError, match="alpha_out places the band of a budget"):
        ScoreFusion("rank", alpha_out=0.1)
    with pytest.raises(ValueError, match="alpha_out"):
        ScoreFusion("rank", budget=0.2, alpha_out=1.2)
    assert ScoreFusion("rank", budget=0.2, alpha_out=0.9).rule.band_levels() == pytest.approx((0.8, 1.0))
    assert ScoreFusion.sweep("cascade", budget=0.2) == {"alpha_out": [0.005, 0.01, 0.02, 0.03, 0.04]}
    assert set(ScoreFusion.sweep("rank", budget=0.2)) == {"w", "alpha_out"}
    assert ScoreFusion.sweep("rank") == {"w": [0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9]}
    # the cascade without budget keeps its band (alpha_out, 1 - alpha_in); with one, (alpha_out, alpha_out + rho)
    assert ScoreFusion("cascade", alpha_out=0.02, alpha_in=0.1).expected_routed_fraction == pytest.approx(0.88)
    assert ScoreFusion("cascade", budget=0.3).rule.band_levels() == pytest.approx((0.02, 0.32))
    assert ScoreFusion("rank").expected_routed_fraction == 1.0


def test_logistic_budget_fits_on_band_rows_only():
    val, test, ood_val, ood = near_ood(4)
    fusion = ScoreFusion("logistic", budget=0.2).fit(val, ood_val_scores=ood_val)
    need_id, need_ood = fusion.route(val["baseline"]), fusion.route(ood_val["baseline"])
    sparse = lambda s, m: {"baseline": s["baseline"], "diffusion": np.where(m, s["diffusion"], np.nan)}  # noqa: E731
    again = ScoreFusion("logistic", budget=0.2).fit(sparse(val, need_id), ood_val_scores=sparse(ood_val, need_ood))
    np.testing.assert_array_equal(again(test), fusion(test))
    hole = sparse(ood_val, need_ood)
    hole["diffusion"][np.flatnonzero(need_ood)[0]] = np.nan
    with pytest.raises(ValueError, match="OOD-val scores 'diffusion'"):
        ScoreFusion("logistic", budget=0.2).fit(val, ood_val_scores=hole)


def test_fit_band_routes_before_the_diffusion_scores_exist():
    """Routed calibration in two steps: the band from baseline ID-val scores, then the fit with in-band scores."""
    val, test, _, _ = near_ood(5)
    two_step = ScoreFusion("zscore", budget=0.3).fit_band(val["baseline"])
    need = two_step.route(val["baseline"])
    assert need.mean() == pytest.approx(0.3, abs=2 / N)
    with pytest.raises(RuntimeError, match="before fit"):
        two_step(test)
    two_step.fit({"baseline": val["baseline"], "diffusion": np.where(need, val["diffusion"], np.nan)})
    np.testing.assert_array_equal(two_step(test), ScoreFusion("zscore", budget=0.3).fit(val)(test))
    with pytest.raises(RuntimeError, match="fit_band"):
        ScoreFusion("rank", budget=0.3).route(test["baseline"])
