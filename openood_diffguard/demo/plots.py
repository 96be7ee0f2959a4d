"""Figures people look at: ROC curves, ID-vs-OOD score histograms, DiffGuard's input/inversion/synthesis grid.

Conventions as OpenOOD v1.5: OOD is the positive class (true positive rate = OOD caught, false positive rate =
ID flagged OOD), ``conf`` is higher = ID.
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Mapping, Sequence

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from sklearn.metrics import roc_auc_score, roc_curve  # noqa: E402

ID_COLOR, OOD_COLOR = "#1f77b4", "#d62728"


def _ood_positive(conf: np.ndarray, label: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    return (label == -1).astype(int), -conf  # OpenOOD: OOD is the positive class, scored by -conf


def _style(name: str, index: int) -> dict:
    """Baselines dashed, diffusion detectors solid, fusions dotted: the families stay apart even in grey."""
    kind = "fusion" if "+" in name else "diffusion" if name in ("DiffGuard", "DiffNB", "LFDN") else "baseline"
    return {"color": plt.get_cmap("tab10")(index % 10), "lw": 2.0 if kind == "fusion" else 1.4,
            "ls": {"baseline": "--", "diffusion": "-", "fusion": ":"}[kind]}


def roc_curves(scores: Mapping[str, tuple[np.ndarray, np.ndarray]], path: Path, title: str = "ROC (OOD = positive)") -> Path:
    """Two panels: the whole ROC curve and its low-FPR region (log axis), where methods differ."""
    fig, (full, low) = plt.subplots(1, 2, figsize=(11, 4.8))
    lowest = 1.0
    for i, (name, (conf, label)) in enumerate(scores.items()):
        y, s = _ood_positive(conf, label)
        fpr, tpr, _ = roc_curve(y, s)
        fpr95 = fpr[np.argmax(tpr >= 0.95)]
        style = _style(name, i)
        full.plot(fpr, tpr, label=f"{name}  {100 * roc_auc_score(y, s):.1f} / {100 * fpr95:.1f}", **style)
        low.step(fpr, tpr, where="post", **style)
        positive = fpr[fpr > 0]
        lowest = min(lowest, positive.min() if positive.size else 1.0)
    full.plot([0, 1], [0, 1], color="0.6", ls="-", lw=0.8)
    for ax in (full, low):
        ax.axhline(0.95, color="0.4", lw=0.8, ls="-.")
        ax.set_xlabel("false positive rate (ID flagged OOD)")
        ax.set_ylabel("true positive rate (OOD caught)")
        ax.grid(alpha=0.3)
    full.set(xlim=(0, 1), ylim=(0, 1.01), title="ROC")
    full.text(0.98, 0.93, "95 % of OOD caught", ha="right", va="top", fontsize=7, color="0.3")
    low.set_xscale("log")
    low.set(xlim=(max(min(lowest, 0.01) / 2, 1e-4), 1), ylim=(0.5, 1.005), title="low false-positive region (log x)")
    full.legend(fontsize=7, loc="lower right", title="method  AUROC / FPR@95_OpenOOD (%)", title_fontsize=7)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=130)
    plt.close(fig)
    return path


def histograms(scores: Mapping[str, tuple[np.ndarray, np.ndarray]], path: Path,
               thresholds: Mapping[str, float] | None = None) -> Path:
    """One panel per method: ID and OOD test confidences (densities on shared bins), with a legend on every panel;
    ``thresholds`` (optional, per method) are drawn as the line that keeps 95 % of ID validation data."""
    n = len(scores)
    cols = math.ceil(math.sqrt(n))
    rows = math.ceil(n / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(3.4 * cols, 2.7 * rows), squeeze=False)
    for ax, (name, (conf, label)) in zip(axes.flat, scores.items()):
        bins = np.histogram_bin_edges(conf, bins=30)
        ax.hist(conf[label >= 0], bins=bins, alpha=0.55, density=True, color=ID_COLOR, label="ID test")
        ax.hist(conf[label == -1], bins=bins, alpha=0.55, density=True, color=OOD_COLOR, label="OOD test")
        headroom = 1.3  # the legend sits above the bars
        if thresholds and name in thresholds:
            ax.axvline(thresholds[name], ymax=1 / headroom, color="k", lw=1, ls="--", label="95 % ID-val kept")
        ax.set_title(name, fontsize=9)
        ax.set_xlabel("confidence (higher = ID)", fontsize=8)
        ax.set_ylabel("density", fontsize=8)
        ax.tick_params(labelsize=7)
        ax.set_ylim(0, ax.get_ylim()[1] * headroom)
        ax.legend(fontsize=6, loc="upper center", ncol=3, frameon=False, handlelength=1.2, columnspacing=0.8)
    for ax in list(axes.flat)[n:]:
        fig.delaxes(ax)  # no empty panels
    fig.tight_layout()
    fig.savefig(path, dpi=130)
    plt.close(fig)
    return path


def synthesis_grid(rows: Mapping[str, np.ndarray], columns: Sequence[Mapping], path: Path, threshold: float,
                   score: str = "score") -> Path:
    """``rows``: name -> images [N, H, W] in [0, 1] (one column per sample); ``columns``: per sample ``true`` digit,
    ``ood`` flag, ``pred`` (the classifier's, which guides the synthesis), DiffGuard ``score`` and ``flagged``
    (score below ``threshold``); ``score`` says what the score is."""
    names = list(rows)
    n = len(columns)
    fig, axes = plt.subplots(len(names), n, figsize=(1.25 * n, 1.25 * len(names) + 1.3), squeeze=False)
    for c, col in enumerate(columns):
        for r, name in enumerate(names):
            ax = axes[r, c]
            ax.imshow(rows[name][c], cmap="gray", vmin=0, vmax=1)
            ax.set_xticks([]), ax.set_yticks([])
            if c == 0:
                ax.set_ylabel(name, fontsize=8)
        colour = OOD_COLOR if col["ood"] else ID_COLOR
        axes[0, c].set_title(f"{'OOD' if col['ood'] else 'ID'}: true {col['true']}\npredicted {col['pred']}",
                             fontsize=7, color=colour)
        axes[-1, c].set_xlabel(f"score {col['score']:.2f}\n{'flagged OOD' if col['flagged'] else 'kept as ID'}",
                               fontsize=7, color="k" if col["flagged"] == col["ood"] else "darkorange")
    fig.suptitle("DiffGuard: each digit is inverted and re-synthesised toward its predicted class.\n"
                 f"Score = {score}; below {threshold:.2f} "
                 "(95 % of ID validation digits kept) = flagged OOD; orange = wrong call.", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=130)
    plt.close(fig)
    return path
