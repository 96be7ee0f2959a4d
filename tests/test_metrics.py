import numpy as np
import pytest
import torch
from sklearn import metrics as skm

from openood_diffguard.metrics import (OODMetrics, benchmark_table, compute_all_metrics, format_table,
                                       ood_metrics)


def _data(seed, n_id=300, n_ood=200, ties=False):
    rng = np.random.default_rng(seed)
    conf = np.r_[rng.normal(1.0, 1.0, n_id), rng.normal(0.0, 2.0, n_ood)]  # unequal spreads: FPR conventions differ
    if ties:
        conf = np.round(conf, 1)
    label = np.r_[rng.integers(0, 10, n_id), -np.ones(n_ood, dtype=int)]
    pred = np.where(rng.random(label.size) < 0.7, label, (label + 1) % 10)
    return conf, label, pred


def _sklearn_openood(conf, label, pred):
    """OpenOOD's compute_all_metrics, spelled with scikit-learn as in openood/evaluators/metrics.py."""
    ood = (label == -1).astype(int)
    fpr, tpr, _ = skm.roc_curve(ood, -conf)
    p_in, r_in, _ = skm.precision_recall_curve(1 - ood, conf)
    p_out, r_out, _ = skm.precision_recall_curve(ood, -conf)
    acc = np.mean(pred[label != -1] == label[label != -1])
    fpr_id, tpr_id, _ = skm.roc_curve(1 - ood, conf)
    return [fpr[np.argmax(tpr >= 0.95)], skm.auc(fpr, tpr), skm.auc(r_in, p_in), skm.auc(r_out, p_out), acc,
            fpr_id[np.argmax(tpr_id >= 0.95)]]


@pytest.mark.parametrize("seed,ties", [(0, False), (1, True), (2, False)])
def test_matches_sklearn_spelling_of_openood(seed, ties):
    conf, label, pred = _data(seed, ties=ties)
    m = ood_metrics(conf, label, pred)
    ref = _sklearn_openood(conf, label, pred)
    np.testing.assert_allclose(m.as_openood(), ref[:5], rtol=0, atol=1e-12)
    assert m.fpr95_id_positive == pytest.approx(ref[5], abs=1e-12)
    assert compute_all_metrics(conf, label, pred) == m.as_openood()


def test_matches_pytorch_ood():
    from pytorch_ood.metrics import OODMetrics as PODMetrics

    conf, label, pred = _data(3, ties=True)
    m = ood_metrics(conf, label, pred)
    # pytorch-ood: outlier scores (higher = OOD), labels < 0 = OOD, OOD positive -> OpenOOD's convention
    ref = PODMetrics().update(torch.as_tensor(-conf), torch.as_tensor(label)).compute()
    assert m.auroc == pytest.approx(ref["AUROC"], abs=1e-10)
    assert m.aupr_in == pytest.approx(ref["AUPR-IN"], abs=1e-10)
    assert m.aupr_out == pytest.approx(ref["AUPR-OUT"], abs=1e-10)
    assert m.fpr95_ood_positive == pytest.approx(ref["FPR95TPR"], abs=1e-10)
    # papers' convention = pytorch-ood with the roles swapped: ID as "outliers" scored by conf
    swapped = PODMetrics().update(torch.as_tensor(conf), torch.as_tensor(np.where(label == -1, 0, -1))).compute()
    assert m.fpr95_id_positive == pytest.approx(swapped["FPR95TPR"], abs=1e-10)


def test_known_answer_and_conventions_differ():
    # ID conf 1..20, OOD conf 0.5 and 10.5..28.5 step 1 (19 values) -> hand-countable
    id_conf = np.arange(1, 21, dtype=float)
    ood_conf = np.r_[0.5, np.arange(10.5, 29.5)]
    conf = np.r_[id_conf, ood_conf]
    label = np.r_[np.zeros(20, int), -np.ones(20, int)]
    m = ood_metrics(conf, label, np.zeros(40, int))
    # OOD+: catch 95 % (19/20) of OOD -> threshold at the 19th lowest OOD conf = 27.5; ID below: all 20 -> 1.0
    assert m.fpr95_ood_positive == 1.0
    # ID+: accept 19/20 ID -> threshold 2; OOD with conf >= 2: 19/20 -> 0.95
    assert m.fpr95_id_positive == 0.95
    assert m.acc == 1.0
    # AUROC = P(conf_id > conf_ood): pairs counted by hand
    wins = sum((i > o) for i in id_conf for o in ood_conf)
    assert m.auroc == pytest.approx(wins / 400)


def test_bad_input_and_table():
    with pytest.raises(ValueError, match="both ID"):
        ood_metrics([1.0, 2.0], [0, 1])
    with pytest.raises(ValueError, match="NaN"):
        ood_metrics([np.nan, 2.0], [0, -1])
    with pytest.raises(ValueError, match="lengths"):
        ood_metrics([1.0, 2.0, 3.0], [0, -1])
    conf, label, pred = _data(4)
    idm = label != -1
    id_t = (pred[idm], conf[idm], label[idm])
    rows = benchmark_table(id_t, {"a": (pred[~idm][:100], conf[~idm][:100], label[~idm][:100]),
                                  "b": (pred[~idm][100:], conf[~idm][100:], label[~idm][100:])},
                           groups={"nearood": ["a", "b"]})
    assert rows["nearood"].auroc == pytest.approx((rows["a"].auroc + rows["b"].auroc) / 2)
    text = format_table(rows)
    assert text.splitlines()[0] == "| method | AUROC | AUPR_IN | AUPR_OUT | FPR@95_OpenOOD | FPR@95_IDpos | ACC |"
    assert "| nearood |" in text
    assert isinstance(rows["a"], OODMetrics)


@pytest.mark.openood
def test_matches_openood_itself():
    mod = pytest.importorskip("openood.evaluators.metrics")
    for seed, ties in [(5, False), (6, True)]:
        conf, label, pred = _data(seed, ties=ties)
        np.testing.assert_allclose(compute_all_metrics(conf, label, pred),
                                   mod.compute_all_metrics(conf, label, pred), rtol=0, atol=1e-12)
