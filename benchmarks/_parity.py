"""Shared parts of the parity scripts that run official code from a local checkout (never vendored here):
module stubs for imports the compared path never uses, varied test images, and the agreement statistics
(per-sample Spearman, AUROC of both sides on a fixed two-group labelling, max |difference|)."""
from __future__ import annotations

import sys
import types
from typing import Any

import numpy as np
import torch


def stub_module(name: str, **attrs: Any) -> types.ModuleType:
    """Install an empty module (with ``attrs``) under ``name``."""
    import importlib.machinery

    mod = types.ModuleType(name)
    mod.__spec__ = importlib.machinery.ModuleSpec(name, None)  # find_spec() probes (diffusers) need one
    mod.__dict__.update(attrs)
    sys.modules[name] = mod
    return mod


def stub_dist_util() -> None:
    """guided_diffusion.dist_util imports blobfile and mpi4py; the compared paths only need ``dev()``."""
    stub_module("guided_diffusion.dist_util", dev=lambda: torch.device("cpu"), load_state_dict=None)


def varied_images(n: int, side: int, seed: int = 0) -> tuple[torch.Tensor, np.ndarray]:
    """``n`` images in [0, 1] of two kinds, alternating so the groups interleave in any batch: group 1
    ("ID") smooth colour gradients with a blob, group 0 ("OOD") high-frequency textures; contrast and
    brightness vary across samples so the scores really vary. Returns (images, group labels)."""
    g = torch.Generator().manual_seed(seed)
    yy, xx = torch.meshgrid(torch.linspace(-1, 1, side), torch.linspace(-1, 1, side), indexing="ij")
    out, groups = [], []
    for i in range(n):
        contrast = 0.15 + 0.85 * torch.rand((), generator=g)
        base = 0.2 + 0.6 * torch.rand(3, 1, 1, generator=g)
        if i % 2 == 0:
            d = torch.rand(3, 2, 1, 1, generator=g) * 2 - 1
            c = torch.rand(2, generator=g) * 1.2 - 0.6
            r = 0.2 + 0.5 * torch.rand((), generator=g)
            blob = torch.exp(-((xx - c[0]) ** 2 + (yy - c[1]) ** 2) / r ** 2)
            img = base + contrast * (0.3 * (d[:, 0] * xx + d[:, 1] * yy) + 0.4 * blob * (torch.rand(3, 1, 1, generator=g) - 0.5))
        else:
            img = base + contrast * (torch.rand(3, side, side, generator=g) - 0.5)
        out.append(img.clamp(0, 1))
        groups.append(1 if i % 2 == 0 else 0)
    return torch.stack(out).float(), np.asarray(groups)


def spearman(a: np.ndarray, b: np.ndarray) -> float:
    from scipy.stats import spearmanr

    return float(spearmanr(a, b).statistic)


def auroc(groups: np.ndarray, scores: np.ndarray) -> float:
    """AUROC in % with group 1 as positive and higher score = group 1 (ID), as OpenOOD's confidence."""
    from sklearn.metrics import roc_auc_score

    return 100.0 * float(roc_auc_score(groups, scores))


def agreement(ours: np.ndarray, official: np.ndarray, groups: np.ndarray) -> dict[str, float]:
    ours, official = np.asarray(ours, dtype=np.float64), np.asarray(official, dtype=np.float64)
    return {"n": len(ours), "spearman": spearman(ours, official), "auroc_ours": auroc(groups, ours),
            "auroc_official": auroc(groups, official), "auroc_delta": auroc(groups, ours) - auroc(groups, official),
            "max_abs_diff": float(np.abs(ours - official).max()), "score_min": float(official.min()),
            "score_max": float(official.max()), "distinct_official": len(np.unique(np.round(official, 6)))}


def agreement_row(name: str, a: dict[str, float], *extra: str) -> str:
    cells = [name, str(a["n"]), f"{a['spearman']:.5f}", f"{a['auroc_ours']:.2f}", f"{a['auroc_official']:.2f}",
             f"{a['auroc_delta']:+.2f}", f"{a['max_abs_diff']:.2e}", *extra]
    return "| " + " | ".join(cells) + " |"


def agreement_header(*extra: str) -> str:
    cols = ["comparison", "samples", "Spearman", "AUROC ours", "AUROC official", "AUROC Δ (points)", "max abs diff", *extra]
    return "| " + " | ".join(cols) + " |\n" + "|---" * len(cols) + "|"


def write_report(out, title: str, script: str, argv: list[str] | None, setting: str, lines: list[str]) -> None:
    """A parity result file: title, date, hardware (CPU model, 1 thread), torch, the exact command, then ``lines``.
    Checkout paths in the command are the user's: the results say which official commit ran, not where."""
    import datetime

    from _speed import cpu_name

    head = [f"# {title}", "",
            f"- date: {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M UTC}; CPU ({cpu_name()}, 1 thread), "
            f"torch {torch.__version__}, {setting}",
            f"- command: `python benchmarks/{script} {' '.join(argv if argv is not None else sys.argv[1:])}`"]
    out.write_text("\n".join(head + [""] + lines) + "\n")
