"""OOD metrics identical to OpenOOD v1.5's ``compute_all_metrics``, without importing OpenOOD.

Importing ``openood.evaluators.metrics`` pulls in every OpenOOD postprocessor (faiss, libmr, ...), so the
maths is re-derived here from the same definitions, in numpy (cumulative counts over the unique
scores, exactly the points scikit-learn's ``roc_curve``/``precision_recall_curve`` produce).

Conventions (``conf`` higher = more ID; label -1 = OOD):

- ``fpr95_ood_positive`` is OpenOOD's ``FPR@95``: OOD is the positive class, the threshold is set where
  95 % of the OOD samples are caught, and the value is the share of **ID samples flagged OOD**.
- ``fpr95_id_positive`` is the number the papers report (DiffGuard/DLSR code, OpenOOD before 2023-08):
  ID is positive, 95 % of ID samples are accepted, and the value is the share of **OOD samples accepted**.
- ``aupr_in``: ID positive, scored by ``conf``; ``aupr_out``: OOD positive, scored by ``-conf``; both are
  trapezoids through every precision/recall point (OpenOOD integrates with ``sklearn.metrics.auc``).
- ``acc``: accuracy of ``pred`` on the samples with ``label != -1``.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any, Iterable, Mapping, Optional

import numpy as np

#: OpenOOD's column order (``compute_all_metrics`` list, Evaluator DataFrame columns)
OPENOOD_COLUMNS = ("FPR@95", "AUROC", "AUPR_IN", "AUPR_OUT", "ACC")
_trapezoid = getattr(np, "trapezoid", None) or np.trapz  # numpy < 2 (OpenOOD's venv) has only trapz


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

    def as_dict(self) -> dict[str, float]:
        return asdict(self)


def _as_1d(x: Any, name: str) -> np.ndarray:
    if hasattr(x, "detach"):
        x = x.detach().cpu().numpy()
    arr = np.asarray(x)
    if arr.ndim != 1:
        raise ValueError(f"{name} must be 1-D, got shape {arr.shape}")
    return arr


def _check(conf: np.ndarray, label: np.ndarray) -> None:
    if conf.shape != label.shape:
        raise ValueError(f"conf and label lengths differ: {conf.shape} vs {label.shape}")
    if np.isnan(conf).any():
        raise ValueError(f"conf contains {int(np.isnan(conf).sum())} NaN values")
    n_ood = int((label == -1).sum())
    if n_ood == 0 or n_ood == label.size:
        raise ValueError(f"need both ID (label >= 0) and OOD (label == -1) samples, got {label.size - n_ood} ID "
                         f"and {n_ood} OOD")


def _counts(score: np.ndarray, positive: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Cumulative (true, false) positives at each unique threshold, scores descending (ties together)."""
    order = np.argsort(-score, kind="mergesort")
    s, p = score[order], positive[order].astype(np.int64)
    last_of_tie = np.r_[np.nonzero(np.diff(s))[0], s.size - 1]
    tps = np.cumsum(p)[last_of_tie]
    fps = (last_of_tie + 1) - tps
    return tps, fps


def _roc(score: np.ndarray, positive: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    tps, fps = _counts(score, positive)
    fpr = np.r_[0.0, fps / fps[-1]]
    tpr = np.r_[0.0, tps / tps[-1]]
    return fpr, tpr


def _fpr_at_tpr(score: np.ndarray, positive: np.ndarray, tpr_level: float) -> float:
    fpr, tpr = _roc(score, positive)
    return float(fpr[np.argmax(tpr >= tpr_level)])


def _aupr(score: np.ndarray, positive: np.ndarray) -> float:
    tps, fps = _counts(score, positive)
    precision = np.r_[(tps / (tps + fps))[::-1], 1.0]
    recall = np.r_[(tps / tps[-1])[::-1], 0.0]
    return float(-_trapezoid(precision, recall))


def ood_metrics(conf: Any, label: Any, pred: Any = None, recall: float = 0.95) -> OODMetrics:
    """Metrics of one ID-vs-OOD comparison. ``pred`` may be None (``acc`` is then NaN)."""
    conf = _as_1d(conf, "conf").astype(np.float64)
    label = _as_1d(label, "label").astype(np.int64)
    _check(conf, label)
    is_ood = label == -1
    fpr, tpr = _roc(-conf, is_ood)
    acc = float("nan")
    if pred is not None:
        pred = _as_1d(pred, "pred")
        if pred.shape != label.shape:
            raise ValueError(f"pred and label lengths differ: {pred.shape} vs {label.shape}")
        acc = float(np.mean(pred[~is_ood] == label[~is_ood]))
    return OODMetrics(
        fpr95_ood_positive=float(fpr[np.argmax(tpr >= recall)]),
        auroc=float(_trapezoid(tpr, fpr)),
        aupr_in=_aupr(conf, ~is_ood),
        aupr_out=_aupr(-conf, is_ood),
        acc=acc,
        fpr95_id_positive=_fpr_at_tpr(conf, ~is_ood, recall),
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
