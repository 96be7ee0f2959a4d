"""Figures people look at: ROC curves, ID-vs-OOD score histograms, DiffGuard's input/inversion/synthesis grid."""
from __future__ import annotations

from pathlib import Path
from typing import Mapping

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from sklearn.metrics import roc_auc_score, roc_curve  # noqa: E402


def _ood_positive(conf: np.ndarray, label: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    return (label == -1).astype(int), -conf  # OpenOOD: OOD is the positive class, scored by -conf


def roc_curves(scores: Mapping[str, tuple[np.ndarray, np.ndarray]], path: Path, title: str = "ROC (OOD = positive)") -> Path:
    fig, ax = plt.subplots(figsize=(5.5, 5))
    for name, (conf, label) in scores.items():
        y, s = _ood_positive(conf, label)
        fpr, tpr, _ = roc_curve(y, s)
        ax.plot(fpr, tpr, label=f"{name} ({100 * roc_auc_score(y, s):.1f})")
    ax.plot([0, 1], [0, 1], "k:", lw=0.8)
    ax.set(xlabel="false positive rate (ID flagged OOD)", ylabel="true positive rate (OOD caught)", title=title)
    ax.legend(fontsize=7, loc="lower right", title="method (AUROC %)", title_fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=130)
    plt.close(fig)
    return path


def histograms(scores: Mapping[str, tuple[np.ndarray, np.ndarray]], path: Path) -> Path:
    n = len(scores)
    cols = min(4, n)
    rows = (n + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(3.2 * cols, 2.4 * rows), squeeze=False)
    for ax, (name, (conf, label)) in zip(axes.flat, scores.items()):
        bins = np.histogram_bin_edges(conf, bins=30)
        ax.hist(conf[label >= 0], bins=bins, alpha=0.6, density=True, label="ID")
        ax.hist(conf[label == -1], bins=bins, alpha=0.6, density=True, label="OOD")
        ax.set_title(name, fontsize=9)
        ax.tick_params(labelsize=7)
    for ax in list(axes.flat)[n:]:
        ax.axis("off")
    axes.flat[0].legend(fontsize=7)
    fig.suptitle("confidence (higher = ID)", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=130)
    plt.close(fig)
    return path


def synthesis_grid(rows: Mapping[str, np.ndarray], captions: list[str], path: Path, title: str) -> Path:
    """``rows``: name -> images [N, H, W] in [0, 1] (one column per sample); ``captions`` per column."""
    names = list(rows)
    n = len(captions)
    fig, axes = plt.subplots(len(names), n, figsize=(1.1 * n, 1.2 * len(names)), squeeze=False)
    for r, name in enumerate(names):
        for c in range(n):
            ax = axes[r, c]
            ax.imshow(rows[name][c], cmap="gray", vmin=0, vmax=1)
            ax.set_xticks([]), ax.set_yticks([])
            if c == 0:
                ax.set_ylabel(name, fontsize=8)
            if r == 0:
                ax.set_title(captions[c], fontsize=7)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=130)
    plt.close(fig)
    return path
