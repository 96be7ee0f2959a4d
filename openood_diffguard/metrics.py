"""OOD metrics identical to OpenOOD v1.5's ``compute_all_metrics``, without importing OpenOOD.

Importing ``openood.evaluators.metrics`` pulls in every OpenOOD postprocessor (faiss, libmr, ...), so the
same scikit-learn calls are made here: ``roc_curve`` (with its default ``drop_intermediate=True``, which
removes collinear ROC points and so decides which threshold FPR@95 lands on when scores tie),
``precision_recall_curve`` and ``auc``. Results are bit-identical to OpenOOD's on every input (ties
included; tested against OpenOOD's own function).

Conventions (``conf`` higher = more ID; label -1 = OOD, any other label = ID, as in OpenOOD):

- ``fpr95_ood_positive`` is OpenOOD's ``FPR@95``: OOD is the positive class, the threshold is set where
  95 % of the OOD samples are caught, and the value is the share of **ID samples flagged OOD**.
- ``fpr95_id_positive`` is the number the papers report: ID is positive, 95 % of ID samples are accepted,
  and the value is the share of **OOD samples accepted**. It is computed exactly as DiffGuard's released
  code (``ood_tester/metrics.py: fpr_recall``), OpenOOD's own ``fpr_recall`` and OpenOOD before 2023-08 do:
  ``roc_curve(is_id, conf)`` and the FPR of the first curve point with TPR >= 0.95. (DLSR's scripts use
  ``np.percentile`` of the ID scores as threshold instead; that interpolated threshold can differ by one
  sample on small sets.)
- ``aupr_in``: ID positive, scored by ``conf``; ``aupr_out``: OOD positive, scored by ``-conf``; both are
  ``auc(recall, precision)`` over ``precision_recall_curve`` (trapezoids, as OpenOOD integrates them).
- ``acc``: accuracy of ``pred`` on the samples with ``label != -1``.

Scores of any real dtype are accepted (torch bf16/fp16, numpy float16, ...; converted exactly to float64);
NaN and +-inf are rejected with their counts (an infinite score has no rank-consistent ROC in
scikit-learn: all +inf scores gave AUROC 0.0).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Iterable, Mapping, Optional

import numpy as np
from sklearn import metrics as skm

#: OpenOOD's column order (``compute_all_metrics`` list, Evaluator DataFrame columns)
OPENOOD_COLUMNS = ("FPR@95", "AUROC", "AUPR_IN", "AUPR_OUT", "ACC")


@dataclass(frozen=True)
class OODMetrics:
    """All values are fractions in [0, 1] (OpenOOD's DataFrame shows them x100)."""

    fpr95_ood_positive: float  # OpenOOD's FPR@95: ID flagged OOD at 95 % OOD recall
    auroc: float
    aupr_in: float
    aupr_out: float
    acc: float
    fpr95_id_positive: float  # papers' FPR@95: OOD accepted at 95 % ID recall

    def as_openood(self) -> list[float]:
        """``[fpr, auroc, aupr_in, aupr_out, acc]`` as OpenOOD's ``compute_all_metrics`` returns it."""
        return [self.fpr95_ood_positive, self.auroc, self.aupr_in, self.aupr_out, self.acc]


def _as_1d(x: Any, name: str) -> np.ndarray:
    if hasattr(x, "detach"):  # torch tensor: bf16 has no numpy dtype, float64 holds every float dtype exactly
        x = x.detach().cpu()
        x = (x.double() if x.is_floating_point() else x).numpy()
    arr = np.asarray(x)
    if arr.ndim != 1:
        raise ValueError(f"{name} must be 1-D, got shape {arr.shape}")
    return arr


def _real(arr: np.ndarray, name: str) -> np.ndarray:
    """float64 copy of a real-valued array; non-numbers and non-finite values are errors naming the count."""
    if not (np.issubdtype(arr.dtype, np.floating) or np.issubdtype(arr.dtype, np.integer)
            or arr.dtype == np.bool_):
        raise TypeError(f"{name} must hold real numbers, got dtype {arr.dtype}")
    out = arr.astype(np.float64)
    bad = ~np.isfinite(out)
    if bad.any():
        n_nan, n_pos = int(np.isnan(out).sum()), int(np.isposinf(out).sum())
        n_neg = int(bad.sum()) - n_nan - n_pos
        parts = [f"{n} {what}" for n, what in ((n_nan, "NaN"), (n_pos, "+inf"), (n_neg, "-inf")) if n]
        raise ValueError(f"{name} contains {int(bad.sum())} non-finite value(s) of {out.size} ({', '.join(parts)}); "
                         f"metrics need finite scores (a failed / overflowing score must be fixed, not ranked)")
    return out


def _labels(arr: np.ndarray, name: str) -> np.ndarray:
    values = _real(arr, name)
    if (values != np.round(values)).any():
        raise ValueError(f"{name} must hold integer class labels (-1 = OOD), got non-integer values")
    return values.astype(np.int64)


def _check(conf: np.ndarray, label: np.ndarray) -> None:
    if conf.shape != label.shape:
        raise ValueError(f"conf and label lengths differ: {conf.shape} vs {label.shape}")
    n_ood = int((label == -1).sum())
    if n_ood == 0 or n_ood == label.size:
        raise ValueError(f"need both ID (label >= 0) and OOD (label == -1) samples, got {label.size - n_ood} ID "
                         f"and {n_ood} OOD")


def _fpr_at_tpr(positive: np.ndarray, score: np.ndarray, tpr_level: float) -> tuple[float, float]:
    """(FPR at the first ROC point with TPR >= tpr_level, AUROC), on scikit-learn's default curve."""
    fpr, tpr, _ = skm.roc_curve(positive, score)  # drop_intermediate=True, as OpenOOD and DiffGuard call it
    return float(fpr[np.argmax(tpr >= tpr_level)]), float(skm.auc(fpr, tpr))


def _aupr(positive: np.ndarray, score: np.ndarray) -> float:
    precision, recall, _ = skm.precision_recall_curve(positive, score)
    return float(skm.auc(recall, precision))


def ood_metrics(conf: Any, label: Any, pred: Any = None, recall: float = 0.95) -> OODMetrics:
    """Metrics of one ID-vs-OOD comparison. ``pred`` may be None (``acc`` is then NaN)."""
    if not 0.0 < float(recall) <= 1.0:
        raise ValueError(f"recall must lie in (0, 1], got {recall!r}")
    conf = _real(_as_1d(conf, "conf"), "conf")
    label = _labels(_as_1d(label, "label"), "label")
    _check(conf, label)
    ood = (label == -1).astype(np.int64)  # OpenOOD's ood_indicator
    is_ood = ood.astype(bool)
    acc = float("nan")
    if pred is not None:
        pred = _as_1d(pred, "pred")
        if pred.shape != label.shape:
            raise ValueError(f"pred and label lengths differ: {pred.shape} vs {label.shape}")
        acc = float(np.mean(pred[~is_ood] == label[~is_ood]))
    fpr95_ood, auroc = _fpr_at_tpr(ood, -conf, recall)
    return OODMetrics(
        fpr95_ood_positive=fpr95_ood,
        auroc=auroc,
        aupr_in=_aupr(1 - ood, conf),
        aupr_out=_aupr(ood, -conf),
        acc=acc,
        fpr95_id_positive=_fpr_at_tpr(1 - ood, conf, recall)[0],
    )


def compute_all_metrics(conf: Any, label: Any, pred: Any) -> list[float]:
    """Drop-in for ``openood.evaluators.metrics.compute_all_metrics``: ``[fpr, auroc, aupr_in, aupr_out, acc]``."""
    return ood_metrics(conf, label, pred).as_openood()


def benchmark_table(id_triple: tuple, ood_triples: Mapping[str, tuple],
                    groups: Optional[Mapping[str, Iterable[str]]] = None) -> dict[str, OODMetrics]:
    """Per-OOD-set metrics against the ID test set, plus **unweighted** group means like OpenOOD's Evaluator.

    ``id_triple`` / each ``ood_triples`` value: ``(pred, conf, label)`` as ``postprocessor.inference`` returns
    them (OOD labels are forced to -1). ``groups``: e.g. ``{"nearood": ["cifar100", "tin"], ...}``.
    """
    id_pred, id_conf, id_label = (_as_1d(v, n) for v, n in zip(id_triple, ("pred", "conf", "label")))
    rows: dict[str, OODMetrics] = {}
    for name, (pred, conf, _label) in ood_triples.items():
        pred, conf = _as_1d(pred, "pred"), _as_1d(conf, "conf")
        rows[name] = ood_metrics(np.r_[id_conf, conf], np.r_[id_label, -np.ones(conf.size, dtype=np.int64)],
                                 np.r_[id_pred, pred])
    for group, members in (groups or {}).items():
        members = list(members)
        missing = [m for m in members if m not in rows]
        if missing:
            raise KeyError(f"group {group!r} names OOD sets without scores: {missing}")
        vals = np.mean([[getattr(rows[m], f) for f in OODMetrics.__dataclass_fields__] for m in members], axis=0)
        rows[group] = OODMetrics(*map(float, vals))
    return rows


#: names and order of the metric columns in every table this package prints or writes (console, metrics.csv,
#: ``fuse``, README): column name -> ``OODMetrics`` field
METRIC_COLUMNS: dict[str, str] = {"AUROC": "auroc", "AUPR_IN": "aupr_in", "AUPR_OUT": "aupr_out",
                                  "FPR@95_OpenOOD": "fpr95_ood_positive", "FPR@95_IDpos": "fpr95_id_positive",
                                  "ACC": "acc"}
#: the one-line explanation printed under those tables
FPR_LEGEND = ("FPR@95_OpenOOD = ID flagged OOD at 95 % OOD recall (OpenOOD v1.5's FPR@95); FPR@95_IDpos = OOD "
              "accepted at 95 % ID recall (the papers' FPR@95); metrics in %, conf higher = ID")


def table_row(m: OODMetrics, percent: bool = True) -> list[float]:
    """``m``'s values in ``METRIC_COLUMNS`` order (x100 with ``percent``)."""
    scale = 100.0 if percent else 1.0
    return [getattr(m, f) * scale for f in METRIC_COLUMNS.values()]


def format_table(rows: Mapping[str, OODMetrics], percent: bool = True, digits: int = 2, name: str = "method") -> str:
    """Markdown table with the ``METRIC_COLUMNS`` (both FPR@95 conventions, explicitly named)."""
    head = [name, *METRIC_COLUMNS]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for key, m in rows.items():
        lines.append("| " + " | ".join([key, *(f"{v:.{digits}f}" for v in table_row(m, percent))]) + " |")
    return "\n".join(lines)
