"""benchmarks/fidelity.py --ci-against: the paired bootstrap interval of an AUROC difference (known answers)."""
import sys
from pathlib import Path

import numpy as np
import torch
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


def test_subsets_of_a_larger_n_contain_those_of_a_smaller_n():
    from fidelity import subset_indices

    def draw(n):  # as the CIFAR setup draws them: ID test first, then OOD test, from one generator
        rng = np.random.default_rng(0)
        return subset_indices(1800, n, rng), subset_indices(1200, n, rng)

    small, large = draw(150), draw(300)
    for s, l, size in zip(small, large, (1800, 1200)):
        assert len(s) == 150 and len(l) == 300 and len(np.unique(l)) == 300 and np.all(np.diff(s) > 0)
        assert set(s) <= set(l)  # the larger --n re-scores only the new images
        assert np.array_equal(subset_indices(size, None, np.random.default_rng(0)), np.arange(size))
    assert not np.array_equal(small[0][:150], small[1][:150])  # ID and OOD subsets are drawn independently


def test_subset_cache_keys_follow_the_image_not_its_position():
    """--n subsets: a score cache key must name the same image whatever n is (it used to be the position in the
    subset, so a run with another n read cached statistics of other images)."""
    from fidelity import _test_loader

    from openood_diffguard.runtime.cache import loader_source, sample_keys
    from openood_diffguard.space import ImageSpace

    space = ImageSpace.for_dataset("cifar10")
    rng0 = np.random.default_rng(1)
    x, y = rng0.integers(0, 256, (40, 4, 4, 3), dtype=np.uint8), rng0.integers(0, 6, 40)
    seen, sources = {}, {}
    for n in (None, 5, 12, 30):
        loader = _test_loader(x, y, "test", n, np.random.default_rng(0), space)
        sources[n] = loader_source(loader)
        for batch in loader:
            for key, img in zip(sample_keys(batch, sources[n]), batch["data"]):
                key = key.split("::")[1]
                assert torch.equal(seen.setdefault(key, img), img), f"n={n}: key {key} names another image"
    assert len(seen) == 40
    assert sources[5] == sources[12] == sources[30] != sources[None]  # subsets never read pre-fix full-split keys
    ood = _test_loader(x, y, "ood", 5, np.random.default_rng(0), space)
    assert all((b["label"] == -1).all() for b in ood)
