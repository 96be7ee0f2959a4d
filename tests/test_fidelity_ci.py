"""benchmarks/fidelity.py --ci-against: the paired bootstrap interval of an AUROC difference (known answers)."""
import sys
from pathlib import Path

import numpy as np
import pytest

sys.path[:0] = [str(Path(__file__).resolve().parents[1] / "benchmarks")]
from fidelity import paired_auroc_delta  # noqa: E402


def _scores(conf, n_id):
    return {"conf": np.asarray(conf, dtype=float), "label": np.r_[np.zeros(n_id, int), -np.ones(len(conf) - n_id, int)]}


def test_paired_auroc_delta_known_answers():
    rng = np.random.default_rng(0)
    noise = rng.normal(size=400)
    weak = _scores(noise + np.r_[np.full(200, 0.3), np.zeros(200)], 200)  # ID slightly higher: AUROC ~ 0.58
    strong = _scores(noise + np.r_[np.full(200, 2.0), np.zeros(200)], 200)  # AUROC ~ 0.92
    assert paired_auroc_delta(weak, weak, n_boot=200) == (0.0, 0.0, 0.0)  # a row against itself
    d, lo, hi = paired_auroc_delta(weak, strong, n_boot=200)
    from sklearn.metrics import roc_auc_score

    y = weak["label"] >= 0
    assert d == pytest.approx(100 * (roc_auc_score(y, strong["conf"]) - roc_auc_score(y, weak["conf"])))
    assert 0 < lo < d < hi  # a large, real improvement: the interval excludes 0
    d2, lo2, hi2 = paired_auroc_delta(strong, weak, n_boot=200)
    assert d2 == pytest.approx(-d) and lo2 < d2 < hi2 < 0
    # a re-labelled copy (same AUROC in expectation): the interval covers 0
    shuffled = _scores(np.r_[rng.permutation(weak["conf"][:200]), rng.permutation(weak["conf"][200:])], 200)
    d3, lo3, hi3 = paired_auroc_delta(weak, shuffled, n_boot=200)
    assert lo3 <= 0 <= hi3 and d3 == pytest.approx(0.0)
    with pytest.raises(ValueError, match="same images"):
        paired_auroc_delta(weak, _scores(weak["conf"], 100))
