"""The report's figures as PNG bytes: ROC (linear and log-FPR, readable at low FPR), precision-recall in
both directions, and ID-vs-OOD score histograms. Every panel has labelled axes and a legend."""
from __future__ import annotations

import io
from typing import Sequence

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from sklearn.metrics import precision_recall_curve, roc_curve  # noqa: E402

#: a curve: (legend label, ID confidences, OOD confidences)
Series = tuple[str, np.ndarray, np.ndarray]


def _png(fig: plt.Figure, dpi: int = 110) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi)
    plt.close(fig)
    return buf.getvalue()


def _ood_positive(conf_id: np.ndarray, conf_ood: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """OpenOOD's convention: OOD is the positive class, scored by -conf."""
    return np.r_[np.zeros(conf_id.size, int), np.ones(conf_ood.size, int)], -np.r_[conf_id, conf_ood]


def curves(series: Sequence[Series], title: str) -> bytes:
    """2 x 2 panels: ROC, ROC with log FPR axis, PR with ID positive (AUPR-In), PR with OOD positive (AUPR-Out)."""
    fig, axes = plt.subplots(2, 2, figsize=(10.5, 8.6))
    (roc, roc_log), (pr_in, pr_out) = axes
    low = 1.0
    for label, cid, cood in series:
        y, s = _ood_positive(cid, cood)
        fpr, tpr, _ = roc_curve(y, s)
        line, = roc.plot(fpr, tpr, lw=1.4, label=label)
        pos = fpr > 0
        roc_log.plot(fpr[pos], tpr[pos], lw=1.4, color=line.get_color(), label=label)
        low = min(low, 1.0 / max(cid.size, 1))
        p, r, _ = precision_recall_curve(1 - y, -s)  # ID positive, scored by conf
        pr_in.plot(r, p, lw=1.4, color=line.get_color(), label=label)
        p, r, _ = precision_recall_curve(y, s)
        pr_out.plot(r, p, lw=1.4, color=line.get_color(), label=label)
    for ax in (roc, roc_log):
        ax.axhline(0.95, color="0.4", ls=":", lw=0.9, label="95 % of OOD caught")
        ax.set_xlabel("false positive rate = share of ID flagged OOD")
        ax.set_ylabel("true positive rate = share of OOD caught")
        ax.set_ylim(0, 1.01)
    roc.plot([0, 1], [0, 1], color="0.6", lw=0.8, ls="--", label="chance")
    roc.set_xlim(0, 1)
    roc.set_title("ROC (OOD = positive, as OpenOOD)", fontsize=10)
    roc_log.set_xscale("log")
    roc_log.set_xlim(max(low / 2, 1e-5), 1)
    roc_log.set_title("ROC, log FPR axis (the low-FPR end)", fontsize=10)
    pr_in.set_title("precision-recall, ID = positive (AUPR-In)", fontsize=10)
    pr_out.set_title("precision-recall, OOD = positive (AUPR-Out)", fontsize=10)
    for ax, what in ((pr_in, "ID"), (pr_out, "OOD")):
        ax.set_xlabel(f"recall = share of {what} found")
        ax.set_ylabel(f"precision = share of {what} among those found")
        ax.set_xlim(0, 1)
        ax.set_ylim(0, 1.01)
    for ax in axes.flat:
        ax.grid(alpha=0.25)
        ax.legend(fontsize=7, loc="lower right" if ax is not pr_out else "lower left")
    fig.suptitle(title, fontsize=11)
    fig.tight_layout()
    return _png(fig)


def histograms(panels: Sequence[tuple[str, np.ndarray, np.ndarray, str, str, float]]) -> bytes:
    """One panel per (title, ID conf, OOD conf, ID name, OOD name, threshold at 95 % ID recall)."""
    n = len(panels)
    cols = min(3, n)
    rows = (n + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(4.3 * cols, 3.1 * rows), squeeze=False)
    for ax, (title, cid, cood, id_name, ood_name, thr) in zip(axes.flat, panels):
        both = np.r_[cid, cood]
        both = both[np.isfinite(both)]
        bins = np.histogram_bin_edges(both, bins=40) if both.size else 10
        ax.hist(cid[np.isfinite(cid)], bins=bins, alpha=0.55, density=True, color="tab:blue", label=f"ID: {id_name}")
        ax.hist(cood[np.isfinite(cood)], bins=bins, alpha=0.55, density=True, color="tab:red", label=f"OOD: {ood_name}")
        if np.isfinite(thr):
            ax.axvline(thr, color="k", ls="--", lw=1, label="threshold: 95 % of ID accepted")
        ax.set_title(title, fontsize=9)
        ax.set_xlabel("confidence (higher = more ID)", fontsize=8)
        ax.set_ylabel("density", fontsize=8)
        ax.tick_params(labelsize=7)
        ax.legend(fontsize=6.5)
    for ax in list(axes.flat)[n:]:
        ax.axis("off")
    fig.tight_layout()
    return _png(fig)
