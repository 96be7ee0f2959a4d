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


def _tied_cases(n_cases, seed=0):
    """Random small inputs with heavy ties, both classes present. Half are tie groups of a few compositions
    ((1 ID, 1 OOD), (2, 0), ...): runs of equal compositions put ROC points on one line, which is where
    scikit-learn's roc_curve (drop_intermediate) and a unique-threshold curve disagree about FPR@95."""
    rng = np.random.default_rng(seed)
    for case in range(n_cases):
        if case % 2:
            n = int(rng.integers(2, 80))
            is_ood = rng.random(n) < rng.uniform(0.1, 0.9)
            conf = rng.integers(0, int(rng.integers(1, 12)), n).astype(float)
        else:
            kinds = [(1, 1), (1, 0), (0, 1), (2, 0), (0, 2), (2, 1), (1, 2)]
            comp = [kinds[i] for i in rng.integers(0, int(rng.integers(2, 8)), int(rng.integers(2, 40)))]
            is_ood = np.concatenate([[False] * a + [True] * b for a, b in comp])
            conf = np.concatenate([[float(g)] * (a + b) for g, (a, b) in enumerate(comp)])
            if is_ood.all() or not is_ood.any():
                is_ood[0] = not is_ood[0]
        n = is_ood.size
        perm = rng.permutation(n)
        conf, is_ood = conf[perm] * rng.choice([1.0, 0.1, -3.7]), is_ood[perm]
        if is_ood.all() or not is_ood.any():
            is_ood[0] = not is_ood[0]
        label = np.where(is_ood, -1, rng.integers(0, 5, n))
        if rng.random() < 0.3:
            conf = conf.astype(np.float32)  # OpenOOD's conf arrays are float32 when postprocessors return it
        pred = np.where(rng.random(n) < 0.6, label, rng.integers(0, 5, n))
        yield conf, label, pred


def test_property_identical_to_openood_formula_with_ties():
    """200 random heavy-tie cases: every value bit-identical to OpenOOD's compute_all_metrics as written
    (scikit-learn calls of openood/evaluators/metrics.py), and the ID-positive FPR to DiffGuard's fpr_recall."""
    for conf, label, pred in _tied_cases(200):
        m = ood_metrics(conf, label, pred)
        ref = _sklearn_openood(conf, label, pred)
        assert m.as_openood() == [float(v) for v in ref[:5]], (conf, label)
        assert m.fpr95_id_positive == float(ref[5])


def test_tie_known_answer_collinear_roc_points():
    # every threshold holds one ID and one OOD sample: all ROC points lie on the diagonal, scikit-learn's
    # roc_curve keeps only (0,0) and (1,1), so the first point with TPR >= 0.95 is (1,1): FPR@95 = 1.0 in
    # OpenOOD (the unique-threshold curve would give 19/20 = 0.95)
    conf = np.repeat(np.arange(20), 2).astype(float)
    label = np.tile([0, -1], 20)
    m = ood_metrics(conf, label, np.zeros(40, int))
    assert m.fpr95_ood_positive == 1.0 and m.fpr95_id_positive == 1.0
    assert m.auroc == pytest.approx(0.5)


@pytest.mark.filterwarnings("ignore:AUTC is undefined")
def test_pytorch_ood_agrees_and_ties_only_move_fpr_later():
    """pytorch-ood (independent code, unique-threshold curve): AUROC/AUPR equal on every case; FPR@95 equal
    without ties, and with ties never smaller (dropping collinear points can only skip to a later point)."""
    from pytorch_ood.metrics import OODMetrics as PODMetrics

    differ = 0
    issue_case = (np.repeat(np.arange(20), 2).astype(float), np.tile([0, -1], 20), np.zeros(40, int))
    for i, (conf, label, pred) in enumerate([issue_case, *_tied_cases(99, seed=1)]):
        if i % 2:
            conf = conf + np.random.default_rng(i).random(conf.size) * 1e-3  # break ties
        m = ood_metrics(conf, label, pred)
        ref = PODMetrics().update(torch.as_tensor(-conf.astype(float)), torch.as_tensor(label)).compute()
        assert m.auroc == pytest.approx(ref["AUROC"], abs=1e-10)
        assert m.aupr_in == pytest.approx(ref["AUPR-IN"], abs=1e-10)
        assert m.aupr_out == pytest.approx(ref["AUPR-OUT"], abs=1e-10)
        if i % 2:
            assert m.fpr95_ood_positive == pytest.approx(ref["FPR95TPR"], abs=1e-12)
        else:
            assert m.fpr95_ood_positive >= ref["FPR95TPR"] - 1e-12
            differ += m.fpr95_ood_positive != pytest.approx(ref["FPR95TPR"], abs=1e-12)
    assert differ > 0  # the tie cases do exercise the difference


def test_non_finite_scores_rejected_with_counts():
    label = np.r_[np.zeros(3, int), -np.ones(3, int)]
    with pytest.raises(ValueError, match=r"6 non-finite value\(s\) of 6 \(6 \+inf\)"):
        ood_metrics(np.full(6, np.inf), label)  # used to give AUROC 0.0
    with pytest.raises(ValueError, match=r"3 non-finite .*1 NaN, 1 \+inf, 1 -inf"):
        ood_metrics(np.array([1.0, np.nan, np.inf, -np.inf, 0.0, 2.0]), label)
    with pytest.raises(ValueError, match="label"):
        ood_metrics(np.arange(6.0), label + 0.5)
    with pytest.raises(TypeError, match="conf must hold real numbers"):
        ood_metrics(np.array(list("abcdef")), label)
    with pytest.raises(ValueError, match="recall"):
        ood_metrics(np.arange(6.0), label, recall=95)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32, "np16"])
def test_any_float_dtype(dtype):
    conf, label, pred = _data(7, ties=True)
    if dtype == "np16":
        low = conf.astype(np.float16)
        m = ood_metrics(low, torch.as_tensor(label), torch.as_tensor(pred))
    else:
        low = torch.as_tensor(conf).to(dtype)
        m = ood_metrics(low, torch.as_tensor(label), torch.as_tensor(pred))
        low = low.double().numpy()
    assert m == ood_metrics(np.asarray(low, dtype=np.float64), label, pred)  # exact: the values as stored


@pytest.mark.openood
def test_property_identical_to_openood_itself():
    """OpenOOD's own compute_all_metrics on 450 random heavy-tie cases + the Gaussian ones: bit-identical."""
    mod = pytest.importorskip("openood.evaluators.metrics")
    cases = [_data(seed, ties=ties) for seed, ties in [(5, False), (6, True)]] + list(_tied_cases(450, seed=2))
    for conf, label, pred in cases:
        ours = compute_all_metrics(conf, label, pred)
        theirs = [float(v) for v in mod.compute_all_metrics(conf, label, pred)]
        assert ours == theirs, (conf.tolist(), label.tolist(), ours, theirs)
    conf = np.repeat(np.arange(20), 2).astype(float)  # the issue's smallest tie case
    label = np.tile([0, -1], 20)
    assert mod.compute_all_metrics(conf, label, np.zeros(40, int))[0] == 1.0
    assert compute_all_metrics(conf, label, np.zeros(40, int))[0] == 1.0
